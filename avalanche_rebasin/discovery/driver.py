"""Automatic permutation discovery by tracing the forward pass.

The model runs under a :class:`~torch.overrides.TorchFunctionMode` that sees every
torch call (``F.linear``, ``F.conv2d``, ``F.batch_norm``, ``x + y``, ``torch.cat``, ...)
with its real tensors, so Python control flow, nested ``nn.Sequential`` and functional
code are all handled alike (engine: :mod:`avalanche_rebasin.discovery.trace`; rules by family in
:mod:`avalanche_rebasin.discovery.rules`, one module per family). Each activation carries at
most one permuted feature axis tied to a union-find variable:

* a layer that mixes features (linear, conv, embedding, recurrent, attention) starts
  new variables for its output units and records which variable its input follows;
* shape-preserving and per-feature ops carry the variable along, and per-feature
  parameters (norm weights, running statistics) follow it;
* tensors added, multiplied or concatenated along another axis share one permutation
  (residual streams); a concatenation along the permuted axis permutes each input's
  segment by its own group;
* anything that must stay unpermuted (the model's inputs and everything reachable from
  its outputs, tensors it stores on its modules, constants, parameters used in a form
  no rule follows) is pinned to the identity.

The model runs twice, in eval and in train mode (normalisation layers kept in eval
mode), on a deep copy, so branches taken only in training are covered and the user's
model is never modified. Ops that see a permuted tensor but have no rule raise
:class:`UnsupportedOperationError` naming the op and the module, or, with
``unsupported="freeze"``, leave the permutations that reach them as identity.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ..core.model_inputs import call_model
from ..core.spec import PermutationSpec
from ..core.state import private_copy
from . import rules  # noqa: F401 - importing the rules registers them
from .reachable import reachable_tensors
from .resolve import resolve
from .trace import (
    Tracer,
    UnsupportedOperationError,
    UnsupportedPolicy,
    module_types,
)
from .verify import check_spec

__all__ = ["discover_spec"]

def _stored_tensors(model: nn.Module) -> list[Tensor]:
    """Plain tensor attributes a forward left on the modules (feature caches and the like)."""
    out = []
    for module in model.modules():
        for key, value in vars(module).items():
            if key not in ("_parameters", "_buffers", "_modules") and "hook" not in key:
                out.extend(reachable_tensors(value))
    return out


def _unwrap_compiled(model: nn.Module) -> tuple[nn.Module, str]:
    """A ``torch.compile``d module is traced through its original module."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        return inner, "_orig_mod."
    return model, ""


def _run(tracer: Tracer, model: nn.Module, example_input: Any, train: bool) -> None:
    """One traced forward pass; pins its outputs and the tensors it stored."""
    model.train(train)
    for module in model.modules():
        if isinstance(module, _NormBase):
            module.eval()  # batch statistics change nothing about permutations; batch 1 must work

    def leave(_module: nn.Module, _args: Any, _output: Any) -> None:
        tracer.module_stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(
            module.register_forward_pre_hook(lambda _m, _a, name=name: tracer.module_stack.append(name))
        )
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad(), tracer:
            output = call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    for tensor in [*reachable_tensors(output), *_stored_tensors(model)]:
        tracer.pin(tensor)


def _refuse_opaque(model: nn.Module) -> None:
    """Compiled code cannot be traced op by op: name the submodule and the way out."""
    for name, module in model.named_modules():
        compiled = type(module).__name__ == "OptimizedModule" and name
        if isinstance(module, torch.jit.ScriptModule) or compiled:
            kind = "a TorchScript module" if not compiled else "a torch.compile'd submodule"
            raise UnsupportedOperationError(
                f"Permutation discovery traces the model's Python code, and '{name or 'the model'}' is "
                f"{kind}; discover the spec on the eager module (before scripting or compiling it), "
                "or write the spec by hand with PermutationSpec.from_groups(...)."
            )


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Restore every parameter, buffer and train flag of ``model`` afterwards (a hook of the
    copy that closes over the original module could otherwise change it)."""
    saved = {id(t): (t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()]}
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in saved.values():
                if not torch.equal(tensor, value):
                    tensor.copy_(value)
        for module, mode in modes.items():
            module.train(mode)


def _trace(runner: nn.Module, example_input: Any, unsupported: UnsupportedPolicy) -> PermutationSpec:
    named = [*runner.named_parameters(), *runner.named_buffers()]
    tracer = Tracer({id(t): n for n, t in named}, {n: t.shape for n, t in named}, unsupported)
    tracer.module_types = module_types(runner)
    devices = sorted({t.device.index or 0 for _, t in named if t.device.type == "cuda"})
    for train in (False, True):
        try:
            with torch.random.fork_rng(devices=devices):  # dropout must not move the user's RNG
                _run(tracer, runner, example_input, train)
        except UnsupportedOperationError:
            raise
        except Exception as error:
            mode = "train" if train else "eval"
            raise RuntimeError(
                f"Permutation discovery could not run the model in {mode} mode on example_input "
                f"({type(error).__name__}: {error}). Pass an example_input the model accepts in "
                "both modes (e.g. a batch of 2 or more samples), or write the spec by hand with "
                "PermutationSpec.from_groups(...)."
            ) from error
    return resolve(tracer)


def _prefixed(spec: PermutationSpec, prefix: str) -> PermutationSpec:
    if not prefix:
        return spec
    return PermutationSpec(spec.group_sizes, {prefix + k: v for k, v in spec.axes.items()}, spec.group_blocks)


def discover_spec(
    model: nn.Module, example_input: Any, *, unsupported: UnsupportedPolicy = "raise", verify: bool = True
) -> PermutationSpec:
    """Trace ``model(example_input)`` and return its :class:`PermutationSpec`.

    ``example_input`` is a tensor, a tuple of positional arguments, a dict of keyword
    arguments or an ``(args, kwargs)`` pair (see :mod:`avalanche_rebasin.core.model_inputs`). The forward runs
    under ``torch.no_grad`` on a deep copy of the model, once in eval and once in train
    mode, with the random number generators restored afterwards; the model's parameters,
    buffers and train flags are left as they were. Its inputs and outputs are never
    permuted. A ``torch.compile``d model is traced through its original module. With
    ``verify`` (the default) a perturbed copy and a randomly permuted copy of it must give
    the same outputs on ``example_input`` (see :mod:`avalanche_rebasin.discovery.verify`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"discover_spec needs an nn.Module, got {type(model).__name__}.")
    target, prefix = _unwrap_compiled(model)
    _refuse_opaque(target)
    with _untouched(target):
        runner = private_copy(target)
        spec = _trace(runner, example_input, unsupported)
        if verify:
            spec = check_spec(runner, example_input, spec, unsupported == "freeze")
    return _prefixed(spec, prefix)


def _from_model(
    cls: type[PermutationSpec],
    model: nn.Module,
    example_input: Any,
    *,
    unsupported: UnsupportedPolicy = "raise",
    verify: bool = True,
) -> PermutationSpec:
    """Deprecated spelling of :func:`discover_spec`."""
    warnings.warn(
        "PermutationSpec.from_model is deprecated and goes in the next release; "
        "call avalanche_rebasin.discover_spec(model, example_input).",
        DeprecationWarning,
        stacklevel=2,
    )
    return discover_spec(model, example_input, unsupported=unsupported, verify=verify)


# The old spelling, for one release. It is attached here rather than written in core/spec.py,
# so the core never imports discovery (the layers stay one-way).
PermutationSpec.from_model = classmethod(_from_model)  # type: ignore[assignment]
