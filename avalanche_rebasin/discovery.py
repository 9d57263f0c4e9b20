"""Automatic permutation discovery by tracing one forward pass.

The model runs once on an example input under a :class:`~torch.overrides.TorchFunctionMode`
that sees every torch call (``F.linear``, ``F.conv2d``, ``F.batch_norm``, ``x + y``,
``torch.flatten``, ...) with its real tensors, so Python control flow, nested
``nn.Sequential`` and functional code are all handled alike. Each activation carries
at most one *permuted feature axis*, tied to a union-find variable:

* a layer that mixes features (linear, conv, embedding) starts a new variable for its
  output axis and records which variable its input axis follows;
* shape-preserving and per-feature ops (activations, dropout, pooling, norms, softmax,
  reshapes, slicing of other axes) carry the variable along, and per-feature
  parameters (BatchNorm/LayerNorm weights, running statistics) follow it;
* tensors that are added, multiplied or concatenated element-wise must share one
  permutation, so their variables are merged (this is how residual streams form);
* anything that must stay unpermuted (the model's input and outputs, constants,
  parameters used by an op with no rule) is merged with the special variable FIXED.

Each variable class that is not FIXED becomes a group of the spec. Ops that see a
permuted tensor but have no rule raise :class:`UnsupportedOperationError` naming the
op and the module, or, with ``unsupported="freeze"``, leave the permutations that
reach them as identity (always function-preserving).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .spec import AxisPermutation, PermutationSpec

__all__ = [
    "Feature",
    "OpCall",
    "Tracer",
    "UnsupportedOperationError",
    "UnsupportedPolicy",
    "discover_spec",
    "register_rule",
]

UnsupportedPolicy = Literal["raise", "freeze"]
FIXED = 0


class UnsupportedOperationError(ValueError):
    """Raised when discovery meets an op it cannot permute through."""


@dataclass(frozen=True)
class Feature:
    """The permuted axis of an activation: ``shape[axis] == outer · size · inner``."""

    axis: int
    var: int
    size: int
    inner: int = 1
    outer: int = 1

    def moved(self, axis: int) -> Feature:
        return Feature(axis, self.var, self.size, self.inner, self.outer)


@dataclass
class OpCall:
    """One intercepted torch call."""

    name: str
    func: Callable
    args: tuple
    kwargs: dict
    out: Any
    module: str

    def arg(self, position: int, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[position] if len(self.args) > position else default

    def tensors(self) -> list[Tensor]:
        return [t for t in tree_leaves((self.args, self.kwargs)) if isinstance(t, Tensor)]

    def out_tensors(self) -> list[Tensor]:
        return [t for t in tree_leaves(self.out) if isinstance(t, Tensor)]


Rule = Callable[["Tracer", OpCall], "Feature | None"]
_RULES: dict[str, Rule] = {}


def register_rule(*names: str) -> Callable[[Rule], Rule]:
    """Register ``rule(tracer, call) -> Feature | None`` for torch functions by ``__name__``.

    Usable as a decorator; a user rule replaces the built-in one of the same name.
    """

    def decorate(rule: Rule) -> Rule:
        for name in names:
            _RULES[name] = rule
        return rule

    return decorate


class Tracer(TorchFunctionMode):
    """Union-find over feature variables, fed by the rules as the model runs."""

    def __init__(self, model: nn.Module, policy: UnsupportedPolicy) -> None:
        super().__init__()
        if policy not in ("raise", "freeze"):
            raise ValueError(f"unsupported must be 'raise' or 'freeze', got {policy!r}.")
        self.policy = policy
        self.parent: list[int] = [FIXED]
        self.var_names: list[str] = ["<fixed>"]
        self.tensor_names: dict[int, str] = {}
        self.shapes: dict[str, torch.Size] = {}
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            self.tensor_names.setdefault(id(tensor), name)
            self.shapes[name] = tensor.shape
        self._states: dict[int, tuple[Tensor, Feature | None]] = {}
        self.assignments: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
        self.module_stack: list[str] = []
        self.module_types: dict[str, str] = {n: type(m).__name__ for n, m in model.named_modules()}

    # -- union-find ---------------------------------------------------------------
    def find(self, var: int) -> int:
        while self.parent[var] != var:
            self.parent[var] = self.parent[self.parent[var]]
            var = self.parent[var]
        return var

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        keep, drop = (ra, rb) if ra < rb else (rb, ra)  # FIXED (0) and older vars win
        self.parent[drop] = keep
        return keep

    def new_var(self, name: str) -> int:
        self.parent.append(len(self.parent))
        self.var_names.append(name)
        return len(self.parent) - 1

    # -- tensors ------------------------------------------------------------------------
    def state(self, tensor: Any) -> Feature | None:
        if not isinstance(tensor, Tensor):
            return None
        entry = self._states.get(id(tensor))
        if entry is None or entry[0] is not tensor or entry[1] is None:
            return None
        f = entry[1]
        return Feature(f.axis, self.find(f.var), f.size, f.inner, f.outer)

    def set_state(self, tensor: Tensor, feature: Feature | None) -> None:
        self._states[id(tensor)] = (tensor, feature)

    def param(self, tensor: Any) -> str | None:
        return self.tensor_names.get(id(tensor)) if isinstance(tensor, Tensor) else None

    def assign(self, tensor: str | None, axis: int, feature: Feature | int | None) -> None:
        """Record that ``tensor``'s ``axis`` follows ``feature`` (``None``/FIXED: unpermuted)."""
        if tensor is None:
            return
        if isinstance(feature, Feature):
            entry = (feature.var, feature.inner, feature.outer)
        else:
            entry = (FIXED if feature is None else feature, 1, 1)
        self.assignments.setdefault((tensor, axis % len(self.shapes[tensor])), []).append(entry)

    def fix_tensor(self, tensor: str | None, *, keep: Sequence[int] = ()) -> None:
        """All axes of a parameter/buffer, except those in ``keep``, stay unpermuted."""
        if tensor is None:
            return
        ndim = len(self.shapes[tensor])
        kept = {axis % ndim for axis in keep}
        for axis in range(ndim):
            if axis not in kept:
                self.assign(tensor, axis, FIXED)

    def fix(self, feature: Feature | None) -> None:
        if feature is not None:
            self.union(feature.var, FIXED)

    @property
    def module_path(self) -> str:
        return self.module_stack[-1] if self.module_stack else ""

    def unsupported(self, call: OpCall, reason: str) -> None:
        """Raise, or (policy 'freeze') pin every permutation reaching ``call`` to identity."""
        if self.policy == "raise":
            where = (
                f"module '{call.module}' ({self.module_types.get(call.module, '?')})"
                if call.module
                else "the model's own forward"
            )
            raise UnsupportedOperationError(
                f"Permutation discovery cannot permute through `{call.name}` called in {where}: "
                f"{reason}. To proceed, pass unsupported='freeze' (the permutations reaching "
                f"this op stay identity), register a rule with "
                f"avalanche_rebasin.discovery.register_rule('{call.name}'), or write the spec "
                "by hand with PermutationSpec.from_groups(...)."
            )
        for tensor in call.tensors():
            self.fix(self.state(tensor))
            self.fix_tensor(self.param(tensor))

    # -- the mode ------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        call = OpCall(name, func, tuple(args), kwargs, out, self.module_path)
        outputs = call.out_tensors()
        rule = _RULES.get(name)
        if name in _METADATA and not outputs:
            return out
        if rule is None:
            feature = _no_rule(self, call)
        else:
            feature = rule(self, call)
        for tensor in outputs:
            self.set_state(tensor, feature)
        return out


_METADATA = {
    "size",
    "dim",
    "numel",
    "__get__",
    "is_contiguous",
    "is_floating_point",
    "__len__",
    "stride",
    "element_size",
    "get_device",
    "data_ptr",
    "is_complex",
    "nelement",
    "_set_grad_enabled",
    "__format__",
    "__repr__",
}


def _no_rule(tr: Tracer, call: OpCall) -> Feature | None:
    tensors = call.tensors()
    if any(tr.state(t) is not None for t in tensors):
        tr.unsupported(call, "there is no rule for this op")
        return None
    for tensor in tensors:  # an op on unpermuted data: its parameters must stay put
        tr.fix_tensor(tr.param(tensor))
    return None


# --------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------
def _normalize_dims(dim: Any, ndim: int) -> list[int] | None:
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return [d % ndim for d in dims] if ndim else []


@register_rule("linear")
def _linear(tr: Tracer, call: OpCall) -> Feature | None:
    x, weight, bias = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    s, w_name, b_name = tr.state(x), tr.param(weight), tr.param(bias)
    if s is not None and s.axis != x.dim() - 1:  # mixes another axis: features pass through
        tr.fix_tensor(w_name)
        tr.fix_tensor(b_name)
        return s
    if w_name is None:  # a computed weight cannot be permuted
        tr.fix(s)
        tr.fix_tensor(b_name)
        return None
    tr.assign(w_name, 1, s)
    var = tr.new_var(w_name.rsplit(".", 1)[0])
    tr.assign(w_name, 0, var)
    tr.assign(b_name, 0, var)
    return Feature(call.out.dim() - 1, var, weight.shape[0])


@register_rule("conv1d", "conv2d", "conv3d")
def _conv(tr: Tracer, call: OpCall) -> Feature | None:
    x, weight, bias = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    groups = call.arg(6, "groups", 1)
    s, w_name, b_name = tr.state(x), tr.param(weight), tr.param(bias)
    channel = 1 if x.dim() == weight.dim() else 0
    if s is not None and (s.axis != channel or s.inner != 1 or s.outer != 1):
        tr.unsupported(call, "the permuted axis of its input is not the channel axis")
        return None
    if w_name is None:
        tr.fix(s)
        tr.fix_tensor(b_name)
        return None
    if groups == 1:
        tr.fix_tensor(w_name, keep=(0, 1))  # kernel axes
        tr.assign(w_name, 1, s)
        var = tr.new_var(w_name.rsplit(".", 1)[0])
        tr.assign(w_name, 0, var)
        tr.assign(b_name, 0, var)
        return Feature(channel, var, weight.shape[0])
    if s is not None and groups == x.shape[channel] == weight.shape[0] and weight.shape[1] == 1:
        tr.fix_tensor(w_name, keep=(0,))  # depthwise: channel c only sees channel c
        tr.assign(w_name, 0, s)
        tr.assign(b_name, 0, s)
        return s
    tr.fix(s)  # grouped convolution: units cannot move between groups
    tr.fix_tensor(w_name)
    tr.fix_tensor(b_name)
    return None


def _per_channel(tr: Tracer, call: OpCall, names: Sequence[str | None]) -> Feature | None:
    s = tr.state(call.arg(0, "input"))
    if s is None:
        for name in names:
            tr.fix_tensor(name)
        return None
    if s.axis != 1:
        tr.unsupported(call, "its per-channel statistics run over axis 1, not the permuted axis")
        return None
    for name in names:
        tr.assign(name, 0, s)
    return s


@register_rule("batch_norm", "instance_norm")
def _batch_norm(tr: Tracer, call: OpCall) -> Feature | None:
    names = [
        tr.param(call.arg(i, key))
        for i, key in enumerate(("input", "running_mean", "running_var", "weight", "bias"))
        if i > 0
    ]
    return _per_channel(tr, call, names)


@register_rule("group_norm")
def _group_norm(tr: Tracer, call: OpCall) -> Feature | None:
    x, groups = call.arg(0, "input"), call.arg(1, "num_groups")
    names = [tr.param(call.arg(2, "weight")), tr.param(call.arg(3, "bias"))]
    s = tr.state(x)
    if s is not None and not (groups in (1, x.shape[1]) and s.inner == 1 and s.outer == 1):
        tr.unsupported(call, "units cannot move between normalisation groups")
        return None
    return _per_channel(tr, call, names)


@register_rule("layer_norm", "rms_norm")
def _layer_norm(tr: Tracer, call: OpCall) -> Feature | None:
    x, shape = call.arg(0, "input"), call.arg(1, "normalized_shape")
    names = [tr.param(call.arg(2, "weight"))]
    if call.name == "layer_norm":
        names.append(tr.param(call.arg(3, "bias")))
    k = 1 if isinstance(shape, int) else len(shape)
    first = x.dim() - k
    s = tr.state(x)
    for name in names:
        if s is not None and s.axis >= first:  # statistics are invariant, weights follow
            tr.fix_tensor(name, keep=(s.axis - first,))
            tr.assign(name, s.axis - first, s)
        else:
            tr.fix_tensor(name)
    return s


@register_rule("embedding")
def _embedding(tr: Tracer, call: OpCall) -> Feature | None:
    indices, weight = call.arg(0, "input"), call.arg(1, "weight")
    w_name = tr.param(weight)
    if tr.state(indices) is not None:
        tr.unsupported(call, "its indices are permuted")
        return None
    if w_name is None:
        return None
    tr.assign(w_name, 0, FIXED)
    var = tr.new_var(w_name.rsplit(".", 1)[0])
    tr.assign(w_name, 1, var)
    return Feature(call.out.dim() - 1, var, weight.shape[1])


_ELEMENTWISE = """
relu relu_ relu6 gelu silu sigmoid tanh elu elu_ selu celu leaky_relu leaky_relu_ hardtanh hardtanh_
hardswish hardsigmoid mish softplus softsign tanhshrink logsigmoid
exp log log1p abs neg sqrt rsqrt square pow sin cos sign erf reciprocal clamp clamp_ clip
dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout
contiguous clone detach float double half bfloat16 to type cpu cuda requires_grad_
zeros_like ones_like empty_like full_like rand_like randn_like
add sub mul div true_divide maximum minimum where lerp addcmul addcdiv
add_ sub_ mul_ div_ __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__
__truediv__ __rtruediv__ __itruediv__ __neg__ __pow__ __rpow__ __abs__
gt lt ge le eq ne __gt__ __lt__ __ge__ __le__ __eq__ __ne__ logical_and logical_or logical_not
__and__ __or__ __invert__ masked_fill masked_fill_
""".split()


@register_rule(*_ELEMENTWISE)
def _elementwise(tr: Tracer, call: OpCall) -> Feature | None:
    """Broadcasting element-wise ops: every operand varying along the axis shares it."""
    out = call.out_tensors()
    tensors = call.tensors()
    permuted = [(t, tr.state(t)) for t in tensors if tr.state(t) is not None]
    if not out:
        return None
    ndim = out[0].dim()
    if not permuted:
        for tensor in tensors:
            tr.fix_tensor(tr.param(tensor))
        return None
    first_t, first = permuted[0]
    axis = first.axis + ndim - first_t.dim()
    var = first.var
    for t, s in permuted[1:]:
        if (s.axis + ndim - t.dim(), s.size, s.inner, s.outer) != (
            axis,
            first.size,
            first.inner,
            first.outer,
        ):
            tr.unsupported(call, "its operands are permuted along different axes or layouts")
            return None
        var = tr.union(var, s.var)
    feature = Feature(axis, var, first.size, first.inner, first.outer)
    for t in tensors:
        if tr.state(t) is not None:
            continue
        local = axis - (ndim - t.dim())
        name = tr.param(t)
        if local < 0 or t.shape[local] == 1:  # broadcast along the permuted axis
            tr.fix_tensor(name)
        elif name is not None:  # a per-feature parameter (e.g. a learned scale)
            tr.fix_tensor(name, keep=(local,))
            tr.assign(name, local, feature)
        else:  # a constant that varies along the axis cannot be permuted
            tr.fix(feature)
    return Feature(axis, tr.find(var), first.size, first.inner, first.outer)


@register_rule("__get__")
def _attribute(tr: Tracer, call: OpCall) -> Feature | None:
    """Tensor properties: ``.data`` and the like keep the layout; ``.T``/``.mT`` do not."""
    x, out = call.args[0] if call.args else None, call.out
    s = tr.state(x)
    if s is None:
        return None
    if isinstance(out, Tensor) and out.shape == x.shape:
        return s
    tr.unsupported(call, "a tensor property that changes the layout of a permuted tensor")
    return None


@register_rule("softmax", "log_softmax", "softmin")
def _equivariant(tr: Tracer, call: OpCall) -> Feature | None:
    return tr.state(call.args[0])


def _reshape_target(shape_in: torch.Size, shape_out: torch.Size, s: Feature) -> int | None:
    """Output axis holding the unit index after a row-major reshape, or None if split."""
    pre = s.outer
    for d in shape_in[: s.axis]:
        pre *= d
    post = s.inner
    for d in shape_in[s.axis + 1 :]:
        post *= d
    before = 1
    for b, length in enumerate(shape_out):
        after = 1
        for d in shape_out[b + 1 :]:
            after *= d
        if pre % before == 0 and post % after == 0 and (pre // before) * s.size * (post // after) == length:
            return b
        before *= length
    return None


@register_rule(
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
    "ravel",
    "squeeze_",
    "unsqueeze_",
)
def _reshape(tr: Tracer, call: OpCall) -> Feature | None:
    x = call.args[0]
    s = tr.state(x)
    if s is None:
        return None
    out = call.out
    axis = _reshape_target(x.shape, out.shape, s)
    if axis is None:
        tr.unsupported(call, f"reshaping {tuple(x.shape)} -> {tuple(out.shape)} splits the permuted axis")
        return None
    length = out.shape[axis]
    pre = s.outer
    for d in x.shape[: s.axis]:
        pre *= d
    before = 1
    for d in out.shape[:axis]:
        before *= d
    outer = pre // before
    return Feature(axis, s.var, s.size, length // (outer * s.size), outer)


@register_rule("transpose", "swapaxes", "permute", "t", "movedim", "moveaxis")
def _transpose(tr: Tracer, call: OpCall) -> Feature | None:
    x = call.args[0]
    s = tr.state(x)
    if s is None:
        return None
    ndim = x.dim()
    order = list(range(ndim))
    if call.name == "permute":
        dims = call.args[1:] if len(call.args) > 2 or isinstance(call.args[1], int) else call.args[1]
        order = [d % ndim for d in dims]
    elif call.name == "t":
        order = order[::-1]
    elif call.name in ("movedim", "moveaxis"):
        src, dst = call.arg(1, "source"), call.arg(2, "destination")
        src, dst = _normalize_dims(src, ndim), _normalize_dims(dst, ndim)
        rest = [d for d in order if d not in src]
        order = [None] * ndim
        for a, b in zip(src, dst):
            order[b] = a
        it = iter(rest)
        order = [d if d is not None else next(it) for d in order]
    else:
        d0, d1 = call.arg(1, "dim0") % ndim, call.arg(2, "dim1") % ndim
        order[d0], order[d1] = order[d1], order[d0]
    return s.moved(order.index(s.axis))


_REDUCTIONS = {
    "sum",
    "mean",
    "amax",
    "amin",
    "std",
    "var",
    "logsumexp",
    "prod",
    "nansum",
    "nanmean",
    "norm",
    "max",
    "min",
    "median",
}


@register_rule(*_REDUCTIONS, "argmax", "argmin")
def _reduce(tr: Tracer, call: OpCall) -> Feature | None:
    x = call.args[0]
    s = tr.state(x)
    if s is None:
        return None
    dim = call.arg(2 if call.name == "norm" else 1, "dim")
    if isinstance(dim, Tensor):  # torch.max(a, b) is element-wise
        return _elementwise(tr, call)
    dims = _normalize_dims(dim, x.dim())
    gives_indices = call.name in ("argmax", "argmin") or (
        call.name in ("max", "min", "median") and dims is not None
    )
    if dims is None or s.axis in dims:
        if gives_indices:
            tr.unsupported(call, "its indices along the permuted axis depend on the permutation")
        return None
    out = call.out_tensors()[0]
    axis = s.axis if out.dim() == x.dim() else s.axis - sum(d < s.axis for d in dims)
    if out.shape[axis] != x.shape[s.axis]:
        tr.unsupported(call, "could not follow the permuted axis through this reduction")
        return None
    return s.moved(axis)


def _pooled_dims(call: OpCall) -> int:
    match = re.search(r"(\d)d", call.name)
    return int(match.group(1)) if match else 2


def _spatial(tr: Tracer, call: OpCall, spatial: int) -> Feature | None:
    x = call.args[0]
    s = tr.state(x)
    if s is None:
        return None
    if s.axis >= x.dim() - spatial:
        tr.unsupported(call, "it acts along the permuted axis")
        return None
    out = call.out_tensors()[0]
    if out.dim() != x.dim():
        tr.unsupported(call, "it changes the number of axes")
        return None
    return s


@register_rule(
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "max_pool1d_with_indices",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "adaptive_max_pool1d_with_indices",
    "adaptive_max_pool2d_with_indices",
    "lp_pool1d",
    "lp_pool2d",
)
def _pool(tr: Tracer, call: OpCall) -> Feature | None:
    return _spatial(tr, call, _pooled_dims(call))


@register_rule("pad")
def _pad(tr: Tracer, call: OpCall) -> Feature | None:
    return _spatial(tr, call, len(call.arg(1, "pad")) // 2)


@register_rule("interpolate", "upsample", "upsample_nearest", "upsample_bilinear")
def _resize(tr: Tracer, call: OpCall) -> Feature | None:
    return _spatial(tr, call, call.args[0].dim() - 2)


@register_rule("cat", "concat", "concatenate", "stack")
def _cat(tr: Tracer, call: OpCall) -> Feature | None:
    parts = list(call.arg(0, "tensors"))
    states = [tr.state(t) for t in parts]
    if all(s is None for s in states):
        return None
    out = call.out
    dim = call.arg(1, "dim", 0) % out.dim()
    ref = next(s for s in states if s is not None)
    if call.name == "stack":
        axis = ref.axis + (1 if dim <= ref.axis else 0)
    else:
        axis = ref.axis
        if dim == axis:
            tr.unsupported(call, "it concatenates along the permuted axis")
            return None
    var = ref.var
    for s in states:
        if s is None:
            var = tr.union(var, FIXED)
        elif (s.axis, s.size, s.inner, s.outer) != (ref.axis, ref.size, ref.inner, ref.outer):
            tr.unsupported(call, "its inputs are permuted along different axes")
            return None
        else:
            var = tr.union(var, s.var)
    return Feature(axis, tr.find(var), ref.size, ref.inner, ref.outer)


@register_rule("__getitem__")
def _getitem(tr: Tracer, call: OpCall) -> Feature | None:
    x, index = call.args[0], call.args[1]
    s = tr.state(x)
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, Tensor) and tr.state(i) is not None for i in items):
        tr.unsupported(call, "its index is computed from a permuted tensor")
        return None
    if s is None:
        return None
    if sum(isinstance(i, Tensor) for i in items) > 1:
        tr.unsupported(call, "advanced indexing with several index tensors")
        return None

    def consumed(item: Any) -> int:
        if item is None or item is Ellipsis:
            return 0
        if isinstance(item, Tensor) and item.dtype == torch.bool:
            return item.dim()
        return 1

    in_dim = out_dim = 0
    new_axis = None
    for item in items:
        width = x.dim() - sum(consumed(i) for i in items) if item is Ellipsis else consumed(item)
        produced = {type(None): 1}.get(type(item), width)
        if isinstance(item, Tensor):
            produced = 1 if item.dtype == torch.bool else item.dim()
        elif isinstance(item, int):
            produced = 0
        if in_dim <= s.axis < in_dim + width:
            full = isinstance(item, slice) and item == slice(None)
            if item is Ellipsis:
                new_axis = out_dim + s.axis - in_dim
            elif full:
                new_axis = out_dim
            else:
                tr.unsupported(call, "it indexes into the permuted axis")
                return None
        in_dim += width
        out_dim += produced
    if new_axis is None:
        new_axis = out_dim + s.axis - in_dim
    if new_axis >= call.out.dim() or call.out.shape[new_axis] != x.shape[s.axis]:
        tr.unsupported(call, "could not follow the permuted axis through this indexing")
        return None
    return s.moved(new_axis)


@register_rule("__setitem__")
def _setitem(tr: Tracer, call: OpCall) -> Feature | None:
    """``target[index] = value``: the written part must carry the target's permutation."""
    target, index, value = call.args[0], call.args[1], call.args[2]
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, Tensor) and tr.state(i) is not None for i in items):
        tr.unsupported(call, "its index is computed from a permuted tensor")
        return None
    s_t, s_v = tr.state(target), tr.state(value)
    tr.fix_tensor(tr.param(value))
    if (
        s_t is not None
        and s_v is not None
        and (s_t.axis, s_t.size)
        == (
            s_v.axis + target.dim() - value.dim(),
            s_v.size,
        )
    ):
        tr.union(s_t.var, s_v.var)
        return None
    tr.fix(s_t)  # partly permuted content cannot be permuted as a whole
    tr.fix(s_v)
    return None


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------
def _resolve(tr: Tracer) -> PermutationSpec:
    for entries in tr.assignments.values():  # one tensor axis, one permutation
        for var, _, _ in entries[1:]:
            tr.union(entries[0][0], var)
    fixed = tr.find(FIXED)
    group_of_root: dict[int, str] = {}
    for var in range(1, len(tr.parent)):
        root = tr.find(var)
        if root != fixed and root not in group_of_root:
            group_of_root[root] = tr.var_names[var]
    sizes: dict[str, int] = dict.fromkeys(group_of_root.values(), 0)  # creation order
    axes: dict[str, list[AxisPermutation | None]] = {}
    for (tensor, axis), entries in sorted(tr.assignments.items(), key=lambda kv: kv[0]):
        root = tr.find(entries[0][0])
        if root == fixed:
            continue
        layouts = {(inner, outer) for var, inner, outer in entries}
        if len(layouts) > 1:
            raise UnsupportedOperationError(
                f"Tensor '{tensor}' axis {axis} is used with different layouts {sorted(layouts)}; "
                "write the spec by hand with PermutationSpec.from_groups(...)."
            )
        inner, outer = layouts.pop()
        group = group_of_root[root]
        length = tr.shapes[tensor][axis]
        size = length // (inner * outer)
        if not sizes[group]:
            sizes[group] = size
        if size * inner * outer != length or sizes[group] != size:
            raise UnsupportedOperationError(
                f"Group '{group}' has inconsistent sizes ({sizes.get(group)} vs tensor '{tensor}' "
                f"axis {axis} of length {length}); write the spec by hand."
            )
        axes.setdefault(tensor, [None] * len(tr.shapes[tensor]))[axis] = AxisPermutation(group, inner, outer)
    trivial = {g for g, n in sizes.items() if n < 2}  # size 0: no tensor left to permute
    spec = PermutationSpec(sizes, {k: tuple(v) for k, v in axes.items()})
    return spec.without_groups(*trivial) if trivial else spec


def discover_spec(
    model: nn.Module, example_input: Any, *, unsupported: UnsupportedPolicy = "raise"
) -> PermutationSpec:
    """Trace ``model(example_input)`` once and return its :class:`PermutationSpec`.

    ``example_input`` is a tensor, or a tuple of positional arguments. The model runs
    in eval mode under ``torch.no_grad`` and is restored to its previous mode; its
    parameters and buffers are not modified. The model's inputs and outputs are never
    permuted.
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    tracer = Tracer(model, unsupported)
    modes = {m: m.training for m in model.modules()}

    def leave(_module: nn.Module, _args: Any, _output: Any) -> None:
        tracer.module_stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(
            module.register_forward_pre_hook(lambda _m, _a, name=name: tracer.module_stack.append(name))
        )
        handles.append(module.register_forward_hook(leave))
    try:
        model.eval()
        with torch.no_grad(), tracer:
            output = model(*args)
        for tensor in tree_leaves(output):
            tracer.fix(tracer.state(tensor))
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)
    return _resolve(tracer)
