"""The trained layer ``W_mid = (1 − a)W + a·P_out W P_inᵀ + δ``, evaluated where it is cheap.

A linear layer of the network trained at a re-basin step computes

    W_mid x = (1 − a)·W x + a·P_out (W (P_inᵀ x)) + δ x,

which can be associated two ways (MACs per forward, ``R`` rows of ``x``, ``W`` of
``n_out × n_in``):

* **weight space**: form ``P_out W P_inᵀ`` (``n_out²·n_in + n_out·n_in²``), then one product
  with ``x`` (``R·n_in·n_out``);
* **activation space**: apply the plans to activations, ``((1 − a)W + δ) x + a·P_out(W(P_inᵀ x))``:
  two products with ``x`` plus ``R·(n_in² + n_out²)``.

Weight space wins for kernels (convolutions: the plans touch only the kernel) and large
batches; activation space wins for wide linear layers at small batches (a 784→512 layer
at batch 32: ~6× fewer MACs). :class:`MixedLinearWeight` stands in for ``W_mid`` in
``functional_call``: ``F.linear`` on it picks the cheaper order from the actual input
(:func:`activations_are_cheaper`, counting forward and backward); any other use forms
``W_mid`` in weight space, so no operation ever sees anything but ``W_mid``'s values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from ..core.spec import AxisEntry, PermutationSpec, axis_parts

__all__ = ["ASSOCIATIONS", "MixedLinearWeight", "activations_are_cheaper", "plain_linear_weights"]

Association = Literal["auto", "weight", "activation"]
#: how the trained network evaluates its soft-permuted linear layers
ASSOCIATIONS: tuple[Association, ...] = ("auto", "weight", "activation")

# read without forming W_mid: they describe θ's tensor, which has W_mid's shape, dtype and device
_METADATA: frozenset[Callable[..., Any]] = frozenset(
    {
        Tensor.shape.__get__,  # type: ignore[attr-defined]
        Tensor.dtype.__get__,  # type: ignore[attr-defined]
        Tensor.device.__get__,
        Tensor.ndim.__get__,  # type: ignore[attr-defined]
        Tensor.layout.__get__,  # type: ignore[attr-defined]
        Tensor.is_cuda.__get__,  # type: ignore[attr-defined]
        Tensor.size,
        Tensor.dim,
        Tensor.numel,
        Tensor.nelement,
        Tensor.element_size,
        Tensor.is_floating_point,
        Tensor.is_complex,
        Tensor.__len__,
    }
)


def activations_are_cheaper(rows: int, n_out: int, n_in: int, permutes_out: bool, permutes_in: bool) -> bool:
    """Whether activation space costs fewer MACs than weight space, forward plus backward.

    Weight space: forming ``P_out W P_inᵀ`` and its gradient, ``2(n_out²·n_in + n_out·n_in²)``,
    plus the product with ``x`` and its two gradients, ``3R·n_in·n_out``. Activation space:
    two products with ``x`` and their gradients (``x``'s and ``δ``'s, and the permuted path's
    input), ``5R·n_in·n_out``, plus each plan applied to the activations and its two
    gradients, ``3R·n²``.
    """
    weight = (
        2 * (permutes_out * n_out * n_out * n_in + permutes_in * n_out * n_in * n_in)
        + 3 * rows * n_in * n_out
    )
    activation = 5 * rows * n_in * n_out + 3 * rows * (
        permutes_out * n_out * n_out + permutes_in * n_in * n_in
    )
    return activation < weight


def _whole_axis_group(entry: AxisEntry, length: int, sizes: Mapping[str, int]) -> str | bool | None:
    """The one group that permutes the whole axis, None when none does, False when the axis is
    split between parts (heads, concatenations): then only weight space applies."""
    parts = list(axis_parts(entry))
    if not parts:
        return None
    if len(parts) > 1:
        return False
    part = parts[0]
    whole = part.offset == 0 and part.outer == 1 and part.inner == 1 and sizes[part.group] == length
    return part.group if whole else False


def plain_linear_weights(
    model: nn.Module, spec: PermutationSpec, trainable: set[str]
) -> dict[str, tuple[str | None, str | None]]:
    """Weight name → (output group, input group) for the layers activation space can evaluate:
    modules whose forward is ``nn.Linear``'s own (so the weight's only use is ``F.linear``),
    with a trainable weight whose two axes are each permuted whole by one group, or not at all."""
    sizes = spec.group_sizes
    out: dict[str, tuple[str | None, str | None]] = {}
    for path, module in model.named_modules():
        name = f"{path}.weight" if path else "weight"
        if type(module).forward is not nn.Linear.forward or name not in trainable or name not in spec.axes:
            continue
        weight = module.weight
        entries = spec.axes[name]
        if weight.dim() != 2 or len(entries) != 2:
            continue
        groups = [_whole_axis_group(entries[axis], weight.shape[axis], sizes) for axis in (0, 1)]
        if any(g is False for g in groups) or groups == [None, None]:
            continue
        out[name] = (groups[0] or None, groups[1] or None)  # type: ignore[assignment]
    return out


class MixedLinearWeight(Tensor):
    """``W_mid = (1 − a)W + a·P_out W P_inᵀ + δ`` without forming it.

    It carries θ's tensor ``W`` (its shape, dtype and device); ``F.linear(x, W_mid, b)``
    evaluates in the cheaper association order for ``x`` (or in ``order``), and every other
    operation on it sees the formed ``W_mid``, built once by ``materialise``.
    """

    theta: Tensor
    delta: Tensor
    alpha: float
    plan_out: Tensor | None
    plan_in: Tensor | None
    order: Association
    _materialise: Callable[[], Tensor]
    _formed: Tensor | None

    @staticmethod
    def __new__(
        cls,
        theta: Tensor,
        delta: Tensor,
        alpha: float,
        plans: tuple[Tensor | None, Tensor | None],
        materialise: Callable[[], Tensor],
        order: Association = "auto",
    ) -> MixedLinearWeight:
        self = Tensor._make_subclass(cls, theta, False)
        self.theta, self.delta, self.alpha = theta, delta, alpha
        self.plan_out, self.plan_in = plans
        self._materialise, self._formed, self.order = materialise, None, order
        return self

    def formed(self) -> Tensor:
        """``W_mid`` in weight space (the values any other operation reads)."""
        if self._formed is None:
            self._formed = self._materialise()
        return self._formed

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        n_out, n_in = self.theta.shape
        rows = x.numel() // max(n_in, 1)
        permutes = (self.plan_out is not None, self.plan_in is not None)
        cheaper = activations_are_cheaper(rows, n_out, n_in, *permutes)
        if self.order == "weight" or (self.order == "auto" and not cheaper):
            return F.linear(x, self.formed(), bias)
        direct = F.linear(x, torch.add(self.delta, self.theta, alpha=1 - self.alpha), bias)
        moved = x if self.plan_in is None else x @ self.plan_in.to(x.dtype)  # (P_inᵀ x) as rows
        permuted = F.linear(moved, self.theta)
        if self.plan_out is not None:
            permuted = permuted @ self.plan_out.to(permuted.dtype).T
        return torch.add(direct, permuted, alpha=self.alpha)

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], cls):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if not isinstance(args[0], cls) and not isinstance(bias, cls):
                return args[1].linear(args[0], bias)
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args, kwargs = tree_map_only(cls, lambda t: t.formed(), (args, kwargs))
        return func(*args, **kwargs)
