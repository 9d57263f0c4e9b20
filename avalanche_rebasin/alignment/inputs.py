"""What alignment checks of its inputs: two models of one architecture, a spec (given or
discovered), and a stream of batches that never hangs."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import Any

from torch import Tensor, nn

from ..core.spec import PermutationSpec
from ..core.validation import check_finite
from ..discovery import discover_spec

__all__ = ["batch_stream", "check_compatible", "check_same_architecture", "known_empty", "resolve_spec"]


def resolve_spec(model: nn.Module, spec: PermutationSpec | None, example_input: Any) -> PermutationSpec:
    """The given spec, or one discovered from ``example_input``; one of them is required."""
    if spec is not None:
        return spec
    if example_input is None:
        raise ValueError(
            "Pass example_input= (a batch the model accepts) so the permutation spec can be "
            "discovered, or pass spec= explicitly."
        )
    return discover_spec(model, example_input)


def check_same_architecture(sa: Mapping[str, Tensor], sb: Mapping[str, Tensor]) -> None:
    """Raise ``ValueError`` naming the first tensor whose name or shape differs between two states."""
    if sa.keys() != sb.keys():
        only_a = sorted(sa.keys() - sb.keys())[:3]
        only_b = sorted(sb.keys() - sa.keys())[:3]
        raise ValueError(
            "The two models have different architectures: tensors only in model_a "
            f"{only_a}, only in model_b {only_b}. Re-basin needs two instances of one architecture."
        )
    for name, tensor in sa.items():
        if tensor.shape != sb[name].shape:
            raise ValueError(
                f"The two models have different architectures: '{name}' has shape "
                f"{tuple(tensor.shape)} in model_a and {tuple(sb[name].shape)} in model_b."
            )


def check_compatible(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec) -> None:
    """Same parameter/buffer names and shapes in both models, fitting the spec, all finite."""
    sa = {k: v for k, v in [*model_a.named_parameters(), *model_a.named_buffers()]}
    sb = {k: v for k, v in [*model_b.named_parameters(), *model_b.named_buffers()]}
    check_same_architecture(sa, sb)
    spec.validate(sa)
    buffers = {k for k, _ in model_a.named_buffers()}
    check_finite(sa, "model_a", buffers)
    check_finite(sb, "model_b", buffers)


def batch_stream(data: Iterable, name: str = "data") -> Iterator[Any]:
    """Batches of ``data``: a re-iterable (list, DataLoader) is cycled, a one-shot iterator
    (generator) is read once. Empty data raises ``ValueError`` before anything is consumed
    from a sized ``data``, or at the first batch otherwise; the stream ends (never hangs)
    when an iterator runs out or a pass yields nothing.
    """
    if known_empty(data):
        raise ValueError(f"{name} is empty; pass at least one (x, y) batch.")
    stream = _cycle(data)
    first = next(stream, _END)
    if first is _END:
        raise ValueError(f"{name} yielded no batches; pass at least one (x, y) batch.")
    return itertools.chain([first], stream)


_END = object()


def known_empty(data: Iterable) -> bool:
    try:
        return isinstance(data, Sized) and len(data) == 0
    except TypeError:  # e.g. a DataLoader over an IterableDataset has no length
        return False


def _cycle(data: Iterable) -> Iterator[Any]:
    one_shot = isinstance(data, Iterator)
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if one_shot or empty:
            return
