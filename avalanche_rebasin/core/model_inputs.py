"""How an example input or a data batch's ``x`` is fed to a model.

One convention everywhere a model is run on a user's input (discovery, alignment costs,
activation matching, LMC, the strategies):

* a tensor ``x`` (or any single object) is ``model(x)``;
* a tuple is positional arguments, ``model(*x)``;
* a mapping is keyword arguments, ``model(**x)`` (Hugging Face's
  ``{"input_ids": …, "attention_mask": …}`` or ``{"pixel_values": …}``);
* a pair ``(args, kwargs)`` whose first item is a tuple or list and second a mapping is
  ``model(*args, **kwargs)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["call_model", "call_with_state", "floating_to", "split_input", "to_device"]


def split_input(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of one input, by the convention of this module."""
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    if (
        isinstance(example_input, tuple)
        and len(example_input) == 2
        and isinstance(example_input[0], (tuple, list))
        and isinstance(example_input[1], Mapping)
    ):
        return tuple(example_input[0]), dict(example_input[1])
    if isinstance(example_input, tuple):
        return example_input, {}
    return (example_input,), {}


def call_model(model: nn.Module, example_input: Any) -> Any:
    """``model`` applied to ``example_input`` (see the module docstring)."""
    args, kwargs = split_input(example_input)
    return model(*args, **kwargs)


def call_with_state(model: nn.Module, state: Mapping[str, Any], example_input: Any) -> Any:
    """``model`` with its tensors replaced by ``state`` (``torch.func.functional_call``)."""
    args, kwargs = split_input(example_input)
    return functional_call(model, dict(state), args, kwargs)


def to_device(example_input: Any, device: Any) -> Any:
    """Every tensor of an input (tensor, tuple, list or mapping) moved to ``device``."""
    return _map_leaves(example_input, lambda leaf: leaf.to(device))


def floating_to(example_input: Any, dtype: torch.dtype) -> Any:
    """Every floating-point tensor of an input (or a batch) cast to ``dtype``; others unchanged."""
    return _map_leaves(
        example_input,
        lambda leaf: leaf.to(dtype) if isinstance(leaf, Tensor) and leaf.is_floating_point() else leaf,
    )


def _map_leaves(example_input: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to every object with a ``.to`` method inside tuples, lists and mappings."""
    if (
        hasattr(example_input, "to")
        and callable(example_input.to)
        and not isinstance(example_input, nn.Module)
    ):
        return fn(example_input)
    if isinstance(example_input, Mapping):
        return {k: _map_leaves(v, fn) for k, v in example_input.items()}
    if isinstance(example_input, (tuple, list)):
        return type(example_input)(_map_leaves(v, fn) for v in example_input)
    return example_input
