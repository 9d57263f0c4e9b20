"""Input validation shared by the public entry points: clear errors, nothing mutated."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .spec import PermutationSpec

__all__ = ["check_compatible", "check_finite", "resolve_spec"]


def resolve_spec(model: nn.Module, spec: PermutationSpec | None, example_input: Any) -> PermutationSpec:
    """The given spec, or one discovered from ``example_input``; one of them is required."""
    if spec is not None:
        return spec
    if example_input is None:
        raise ValueError(
            "Pass example_input= (a batch the model accepts) so the permutation spec can be "
            "discovered, or pass spec= explicitly."
        )
    return PermutationSpec.from_model(model, example_input)


def check_finite(state: Mapping[str, Tensor], label: str) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"{label} has NaN or infinite values in '{name}'; re-basin needs finite weights "
                "(check the training run that produced them)."
            )


def check_compatible(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec) -> None:
    """Same parameter/buffer names and shapes in both models, fitting the spec, all finite."""
    sa = {k: v for k, v in [*model_a.named_parameters(), *model_a.named_buffers()]}
    sb = {k: v for k, v in [*model_b.named_parameters(), *model_b.named_buffers()]}
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
    spec.validate(sa)
    check_finite(sa, "model_a")
    check_finite(sb, "model_b")
