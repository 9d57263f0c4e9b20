"""The safety net of discovery: a discovered spec must keep the function on the example.

Tracing sees every op that goes through torch's Python dispatch; code it cannot see
(TorchScript functions, ``torch.func.vmap``, work done on another thread, C++
extensions) would otherwise be taken for constants. So after tracing, a perturbed copy
of the model (parameters moved by noise, so that a zero-initialised layer still shows
a difference) and a randomly permuted copy of it run on ``example_input`` in eval and
in train mode, with dropout and sampling made
deterministic (they are only equivariant in distribution). If their outputs differ,
discovery refuses, or with ``unsupported="freeze"`` leaves out the groups that change
the output on their own (all groups if that is not enough).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.overrides import TorchFunctionMode

from ..core.model_inputs import call_model
from ..core.permute import permute, random_permutation
from ..core.spec import PermutationSpec
from .reachable import reachable_tensors

__all__ = ["check_spec"]

_DROPOUT = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}
_SAMPLING: dict[str, Callable[..., Tensor]] = {
    "randn_like": lambda x, *a, **k: torch.zeros_like(x),
    "rand_like": lambda x, *a, **k: torch.full_like(x, 0.5),
    "randint_like": lambda x, *a, **k: torch.zeros_like(x),
    "bernoulli": lambda p, *a, **k: (p > 0.5).to(p.dtype),
    "normal": lambda mean, *a, **k: mean if isinstance(mean, Tensor) else torch.as_tensor(mean),
}
_DROPOUT_ARGUMENT = {"multi_head_attention_forward": 10, "scaled_dot_product_attention": 4}


class _Deterministic(TorchFunctionMode):
    """Dropout off and sampling replaced by its mean, so two runs differ only by the spec."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in _DROPOUT:
            return args[0] if args else kwargs["input"]
        if name in _SAMPLING and args and isinstance(args[0], Tensor):
            return _SAMPLING[name](*args, **kwargs)
        if name in _DROPOUT_ARGUMENT:
            position = _DROPOUT_ARGUMENT[name]
            if len(args) > position:
                args = (*args[:position], 0.0, *args[position + 1 :])
            elif "dropout_p" in kwargs:
                kwargs["dropout_p"] = 0.0
        return func(*args, **kwargs)


def _outputs(module: nn.Module, args: tuple, train: bool) -> list[Tensor]:
    module.train(train)
    for m in module.modules():
        if isinstance(m, _NormBase):
            m.eval()
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.no_grad(), torch.random.fork_rng(devices=devices), _Deterministic():
        torch.manual_seed(0)
        return [t for t in reachable_tensors(call_model(module, args)) if isinstance(t, Tensor)]


def _difference(a: list[Tensor], b: list[Tensor]) -> float:
    """Largest change of an output relative to its scale (inf for a different structure)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if not x.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
        elif x.numel():
            scale = max(float(x.abs().max()), 1e-3)
            worst = max(worst, float((x.double() - y.double()).abs().max()) / scale)
    return worst


def _perturb_(module: nn.Module) -> None:
    """Move every floating parameter by noise (in place, deterministic)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                noise = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
                p.add_(noise * (0.5 * float(p.abs().mean()) + 1e-2))


def _tolerance(module: nn.Module) -> float:
    """Relative change allowed for rounding: sums taken in another order."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    return 1e-2 if dtypes & {torch.float16, torch.bfloat16} else 1e-4


class _Check:
    """Runs the perturbed model and permuted copies of it on the example."""

    def __init__(self, module: nn.Module, args: tuple, keep: bool) -> None:
        _perturb_(module)  # the private traced copy: nobody else sees it
        self.module, self.args = module, args
        self.tolerance = _tolerance(module)
        self.pristine = copy.deepcopy(module) if keep else None  # for further checks (freeze)
        self.expected: list[list[Tensor]] | None = None

    def _run(self, module: nn.Module) -> list[list[Tensor]]:
        """Outputs in eval then train mode (in sequence: state carried between calls counts)."""
        return [_outputs(module, self.args, train) for train in (False, True)]

    def change(self, spec: PermutationSpec, perms: dict[str, Tensor]) -> float:
        source = self.pristine if self.pristine is not None else self.module
        permuted = permute(source, spec, perms)  # before the original runs: state it carries counts
        if self.expected is None:
            self.expected = self._run(self.module)
        return max(_difference(a, b) for a, b in zip(self.expected, self._run(permuted)))


def check_spec(
    module: nn.Module, args: tuple, spec: PermutationSpec, freeze: bool
) -> PermutationSpec:
    """``spec`` if a random permutation keeps ``module``'s outputs on ``args``; otherwise
    raise, or (``freeze``) the spec without the groups that change them. ``module`` is a
    private copy: its parameters are perturbed in place."""
    from .trace import UnsupportedOperationError

    if not spec.groups:
        return spec
    check = _Check(module, args, keep=freeze)
    perms = random_permutation(spec, torch.Generator().manual_seed(0))
    change = check.change(spec, perms)
    if change <= check.tolerance:
        return spec
    if not freeze:
        raise UnsupportedOperationError(
            f"Permutation discovery traced the model, but a random permutation of the spec it "
            f"found changes the output on example_input (relative change {change:.3g}): the "
            "model computes something the tracer cannot see (TorchScript, torch.func.vmap, work "
            "on another thread, a C++ extension). Pass unsupported='freeze' to leave out the "
            "groups that change the output, or write the spec by hand with "
            "PermutationSpec.from_groups(...)."
        )
    identity = {g: torch.arange(n) for g, n in spec.group_sizes.items()}
    bad = [g for g in spec.groups if check.change(spec, {**identity, g: perms[g]}) > check.tolerance]
    kept = spec.without_groups(*bad)
    if kept.groups and check.change(kept, {g: perms[g] for g in kept.groups}) > check.tolerance:
        return spec.without_groups(*spec.groups)
    return kept
