"""Discovery rules for parameter-free tensor ops: element-wise maths, views, reshapes,
reductions, pooling, concatenation and indexing.

Shape-preserving and per-feature ops carry the permuted axis along; operands combined
element-wise share one permutation (residual streams); a parameter reaching one of
these ops through a view (``w.t()``, ``w.expand(...)``, ``w[None]``) is followed axis by
axis, and any other use of a parameter pins it.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import torch
from torch import Tensor

from ..trace import FIXED, Feature, OpCall, ParamRef, Stacked, Tracer, register_rule

__all__ = ["ELEMENTWISE", "normalize_dims"]

ELEMENTWISE = """
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


def normalize_dims(dim: Any, ndim: int) -> list[int] | None:
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return [d % ndim for d in dims] if ndim else []


def _broadcast_ref(tr: Tracer, call: OpCall) -> ParamRef | None:
    """The view of the single parameter operand of an op on unpermuted data, if the other
    operands only broadcast (``w * 2``, ``w.to(x.dtype)``); else pin every parameter."""
    out, tensors = call.out_tensors(), call.tensors()
    refs = [(t, ref) for t in tensors if (ref := tr.param(t)) is not None]
    others = [t for t in tensors if tr.param(t) is None]
    if len(refs) == 1 and len(out) == 1 and all(t.numel() == 1 for t in others):
        t, ref = refs[0]
        if out[0].dim() >= t.dim() and out[0].shape[out[0].dim() - t.dim() :] == t.shape:
            return ParamRef(ref.name, (None,) * (out[0].dim() - t.dim()) + ref.axes)
    for _, ref in refs:
        tr.fix_tensor(ref)
    return None


@register_rule(*ELEMENTWISE, params=True)
def _elementwise(tr: Tracer, call: OpCall) -> Feature | ParamRef | None:
    """Broadcasting element-wise ops: every operand varying along the axis shares it."""
    out, tensors = call.out_tensors(), call.tensors()
    permuted = [(t, s) for t in tensors if (s := tr.state(t)) is not None]
    if not out:
        return None
    if not permuted:
        return _broadcast_ref(tr, call)
    ndim = out[0].dim()
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
            for _, other in permuted:  # no common layout: every operand keeps its units in place
                tr.fix(other)
            for t in tensors:
                tr.fix_tensor(tr.param(t))
            return None
        var = tr.union(var, s.var)
    feature = Feature(axis, var, first.size, first.inner, first.outer)
    for t in tensors:
        if tr.state(t) is not None:
            continue
        local = axis - (ndim - t.dim())
        ref = tr.param(t)
        if local < 0 or t.shape[local] == 1:  # broadcast along the permuted axis
            tr.fix_tensor(ref)
        elif ref is not None:  # a per-feature parameter (e.g. a learned scale)
            tr.fix_tensor(ref, keep=(local,))
            tr.assign(ref, local, feature)
        else:  # a constant that varies along the axis cannot be permuted
            tr.fix(feature)
    return Feature(axis, tr.find(var), first.size, first.inner, first.outer)


@register_rule("__get__", params=True)
def _attribute(tr: Tracer, call: OpCall) -> Feature | ParamRef | None:
    """Tensor properties: ``.data`` keeps the layout; ``.T``/``.mT`` reverse axes."""
    x, out = call.args[0] if call.args else None, call.out
    prop = getattr(getattr(call.func, "__self__", None), "__name__", "")
    s, ref = tr.state(x), tr.param(x)
    if not isinstance(out, Tensor) or x is None or (s is None and ref is None):
        return None
    order = list(range(x.dim()))
    if prop in ("T", "mT", "H", "mH"):
        order = order[::-1] if prop in ("T", "H") else [*order[:-2], *order[-2:][::-1]]
    elif prop not in ("data", "real"):
        tr.fix(s)
        tr.fix_tensor(ref)
        if s is not None:
            tr.unsupported(call, f"the tensor property .{prop} of a permuted tensor")
        return None
    if ref is not None:
        return ParamRef(ref.name, tuple(ref.axes[k] for k in order))
    assert s is not None  # one of the two is known
    return s.moved(order.index(s.axis))


@register_rule("type_as", params=True)
def _type_as(tr: Tracer, call: OpCall) -> Feature | ParamRef | None:
    """``x.type_as(other)``: ``x``'s values in ``other``'s dtype (``other`` only lends its type)."""
    x = call.args[0]
    return tr.param(x) or tr.state(x)


@register_rule("topk", "sort", "argsort", "kthvalue")
def _order(tr: Tracer, call: OpCall) -> Feature | None:
    """Ordering along another axis keeps the units; ordering along the units (Mixtral's
    router picks its top experts) depends on where they are, so they stay in place."""
    x = call.args[0]
    s = tr.state(x)
    if s is None:
        return None
    dim = call.arg(2 if call.name in ("topk", "kthvalue") else 1, "dim", -1) % x.dim()
    if dim == s.axis:
        tr.fix(s)
        return None
    return s


@register_rule("index_add", "index_add_", "index_copy", "index_copy_")
def _index_add(tr: Tracer, call: OpCall) -> Feature | None:
    """``out.index_add_(dim, index, source)`` along another axis than the units' (Mixtral
    scatters each expert's tokens back): ``out`` and ``source`` share the units."""
    target, dim, index, source = call.args[0], call.arg(1, "dim"), call.arg(2, "index"), call.arg(3, "source")
    s_t, s_s = tr.state(target), tr.state(source)
    if tr.state(index) is not None:
        tr.unsupported(call, "its index is computed from a permuted tensor")
        return None
    dim = dim % target.dim()
    ref = s_t or s_s
    if ref is None:
        return None
    if ref.axis == dim:
        tr.unsupported(
            call, "it scatters along the permuted axis (scattering along another axis is supported)"
        )
        return None
    for s in (s_t, s_s):
        if s is not None and s.layout != ref.layout:
            tr.fix(s_t)
            tr.fix(s_s)
            return None
    if s_t is None and bool(target.count_nonzero()):
        tr.fix(s_s)  # added onto a constant that is not zero: it cannot move
        return None
    var = tr.union(s_t.var, s_s.var) if s_t is not None and s_s is not None else ref.var
    return Feature(ref.axis, tr.find(var), ref.size, ref.inner, ref.outer)


@register_rule("softmax", "log_softmax", "softmin", "normalize")
def _equivariant(tr: Tracer, call: OpCall) -> Feature | None:
    return tr.state(call.args[0])


def _reshape_target(shape_in: torch.Size, shape_out: torch.Size, s: Feature) -> int | None:
    """Output axis holding the unit index after a row-major reshape, or None if split."""
    pre = s.outer * _prod(shape_in[: s.axis])
    post = s.inner * _prod(shape_in[s.axis + 1 :])
    before = 1
    for b, length in enumerate(shape_out):
        after = _prod(shape_out[b + 1 :])
        if pre % before == 0 and post % after == 0 and (pre // before) * s.size * (post // after) == length:
            return b
        before *= length
    return None


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _reshape_ref(tr: Tracer, ref: ParamRef, shape_in: torch.Size, shape_out: torch.Size) -> ParamRef | None:
    """A reshape of a parameter view, group by group of axes whose sizes multiply alike:
    an axis kept is followed; axes merged into one become a merged axis, and a merged axis
    split back into the parameter's own axes is followed again (weight standardisation
    normalises ``w.reshape(1, out, -1)`` and reshapes it back); any other split or merge of
    a parameter axis keeps that axis in place."""
    own = tr.shapes[ref.name]
    followed = [a for e in ref.axes if e is not None for a in (e if isinstance(e, tuple) else (e,))]
    if tuple(shape_out) == tuple(own) and [a for a in followed if own[a] != 1] == [
        a for a in range(len(own)) if own[a] != 1
    ]:
        return ParamRef(ref.name, tuple(range(len(own))))  # back to the parameter's own layout
    out: list[int | tuple[int, ...] | None] = []
    for ins, outs in _reshape_groups(list(shape_in), list(shape_out)):
        entries = [ref.axes[k] for k in ins if shape_in[k] != 1]
        real = [e for e in entries if e is not None]
        sizes_out = [shape_out[k] for k in outs]
        if not real:
            out += [None] * len(outs)
        elif len(entries) == 1 and len(outs) == 1:
            out.append(entries[0])
        elif len(outs) == 1 and all(isinstance(e, int) for e in entries) and _consecutive(entries):
            out.append(tuple(entries))  # type: ignore[arg-type]
        elif (
            len(entries) == 1
            and isinstance(entries[0], tuple)
            and [tr.shapes[ref.name][a] for a in entries[0]] == [d for d in sizes_out if d != 1]
        ):
            split = iter(entries[0])
            out += [next(split) if d != 1 else None for d in sizes_out]
        else:
            for entry in real:
                tr.pin_axes(ref.name, entry)
            out += [None] * len(outs)
    return ParamRef(ref.name, tuple(out))


def _consecutive(axes: list) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(axes))


def _reshape_groups(shape_in: list[int], shape_out: list[int]) -> list[tuple[list[int], list[int]]]:
    """The input and output axes of a row-major reshape in minimal groups of equal product
    (axes of length 1 are groups of their own on one side)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(shape_in) or j < len(shape_out):
        if i < len(shape_in) and shape_in[i] == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(shape_out) and shape_out[j] == 1:
            groups.append(([], [j]))
            j += 1
            continue
        ins: list[int] = []
        outs: list[int] = []
        p, q = 1, 1
        while True:
            if p <= q and i < len(shape_in):
                p, ins = p * shape_in[i], [*ins, i]
                i += 1
            elif j < len(shape_out):
                q, outs = q * shape_out[j], [*outs, j]
                j += 1
            else:
                break
            if p == q and ins and outs:
                break
        groups.append((ins, outs))
    return groups


@register_rule(
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "ravel",
    "squeeze_", "unsqueeze_", "expand", "expand_as", "broadcast_to", params=True,
)  # fmt: skip
def _reshape(tr: Tracer, call: OpCall) -> Feature | ParamRef | None:
    x, out = call.args[0], call.out
    s, ref = tr.state(x), tr.param(x)
    if ref is not None:
        if call.name in ("expand", "expand_as", "broadcast_to"):
            return ParamRef(ref.name, (None,) * (out.dim() - x.dim()) + ref.axes)
        return _reshape_ref(tr, ref, x.shape, out.shape)
    if s is None:
        return None
    if call.name in ("expand", "expand_as", "broadcast_to"):
        return s.moved(s.axis + out.dim() - x.dim())
    axis = _reshape_target(x.shape, out.shape, s)
    if axis is None:
        return _split(tr, call, s)
    outer = s.outer * _prod(x.shape[: s.axis]) // _prod(out.shape[:axis])
    return Feature(axis, s.var, s.size, out.shape[axis] // (outer * s.size), outer)


def _split(tr: Tracer, call: OpCall, s: Feature) -> Feature | None:
    """An axis of units split into factors (multi-head attention: ``(heads, head_dim)``;
    timm's fused ``(3, heads, head_dim)``; heads merged into the batch axis): the units are
    regrouped so that whole blocks of them land on one output axis.

    The ``size`` units are written ``hi × f × lo`` (row-major): a new group of ``f`` units
    acts alike on every ``hi`` and moves blocks of ``lo`` consecutive units, so on the input
    it is the feature ``(size f, inner lo·inner, outer hi·outer)``, which the reshape keeps on
    one axis. Of the regroupings the reshape keeps, one whose block index is a whole output
    axis is preferred, with the smallest ``lo > 1`` (the heads of ``(…, heads, head_dim)``
    and of ``(…, 3, heads, head_dim)``: the innermost factor is where rotary embeddings and
    per-head norms act), then ``lo = 1``; a block index merged with other axes (heads folded
    into the batch axis) comes last."""
    x, out = call.args[0], call.out
    candidates = []
    for f in range(2, s.size + 1):
        if s.size % f:
            continue
        for lo in range(1, s.size // f + 1):
            if (s.size // f) % lo:
                continue
            hi = s.size // (f * lo)
            regrouped = Feature(s.axis, s.var, f, lo * s.inner, hi * s.outer)
            axis = _reshape_target(x.shape, out.shape, regrouped)
            if axis is not None:
                exact = out.shape[axis] == f  # the block index is a whole output axis
                candidates.append(((not exact, lo == 1, lo, -f), f, lo, hi, regrouped, axis))
    if not candidates:
        tr.unsupported(
            call,
            f"reshaping {tuple(x.shape)} -> {tuple(out.shape)} splits the permuted axis so that no "
            "block of its units stays on one axis (a split into factors such as (heads, head_dim) "
            "is supported)",
        )
        return None
    _, f, lo, hi, regrouped, axis = min(candidates, key=lambda c: c[0])
    name = tr.vars.names[s.var] + ".heads"
    head = tr.new_var(name, f)
    tr.union(s.var, tr.vars.new_defined(name, s.size, [(head, lo, hi, 0)]))
    moved = Feature(regrouped.axis, head, f, regrouped.inner, regrouped.outer)
    outer = moved.outer * _prod(x.shape[: s.axis]) // _prod(out.shape[:axis])
    return Feature(axis, head, f, out.shape[axis] // (outer * f), outer)


def _axis_order(call: OpCall, ndim: int) -> list[int]:
    """``order[k]``: the input axis that becomes output axis ``k``."""
    order = list(range(ndim))
    if call.name == "permute":
        dims = call.arg(1, "dims") if "dims" in call.kwargs or not isinstance(call.args[1], int) else None
        dims = call.args[1:] if dims is None else dims
        return [d % ndim for d in dims]
    if call.name == "t":
        return order[::-1]
    if call.name in ("movedim", "moveaxis"):
        src = normalize_dims(call.arg(1, "source"), ndim) or []
        dst = normalize_dims(call.arg(2, "destination"), ndim) or []
        rest = iter(d for d in order if d not in src)
        placed = dict(zip(dst, src))
        return [placed[k] if k in placed else next(rest) for k in range(ndim)]
    d0, d1 = call.arg(1, "dim0") % ndim, call.arg(2, "dim1") % ndim
    order[d0], order[d1] = order[d1], order[d0]
    return order


@register_rule("transpose", "swapaxes", "permute", "t", "movedim", "moveaxis", params=True)
def _transpose(tr: Tracer, call: OpCall) -> Feature | ParamRef | None:
    x = call.args[0] if call.args else call.kwargs["input"]
    s, ref = tr.state(x), tr.param(x)
    if s is None and ref is None:
        return None
    order = _axis_order(call, x.dim())
    if ref is not None:
        return ParamRef(ref.name, tuple(ref.axes[k] for k in order))
    assert s is not None  # one of the two is known
    return s.moved(order.index(s.axis))


_REDUCTIONS = "sum mean amax amin std var logsumexp prod nansum nanmean norm max min median".split()


@register_rule(*_REDUCTIONS, "argmax", "argmin")
def _reduce(tr: Tracer, call: OpCall) -> Feature | None:
    x = call.args[0]
    s = tr.state(x)
    if s is None:
        return None
    dim = call.arg(2 if call.name == "norm" else 1, "dim")
    if isinstance(dim, Tensor):  # torch.max(a, b) is element-wise
        return _elementwise(tr, call)
    dims = normalize_dims(dim, x.dim())
    gives_indices = call.name in ("argmax", "argmin") or (call.name in ("max", "min", "median") and dims)
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


def _spatial(tr: Tracer, call: OpCall, spatial: int) -> Feature | None:
    x = call.args[0]
    s = tr.state(x)
    if s is None:
        return None
    if s.axis >= x.dim() - spatial:
        tr.unsupported(call, "it acts along the permuted axis")
        return None
    if call.out_tensors()[0].dim() != x.dim():
        tr.unsupported(call, "it changes the number of axes")
        return None
    return s


_POOLS = [
    f"{kind}{d}d{suffix}"
    for kind in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool")
    for d in (1, 2, 3)
    for suffix in ("", "_with_indices")
]


@register_rule(*_POOLS)
def _pool(tr: Tracer, call: OpCall) -> Feature | None:
    match = re.search(r"(\d)d", call.name)
    return _spatial(tr, call, int(match.group(1)) if match else 2)


@register_rule("pad")
def _pad(tr: Tracer, call: OpCall) -> Feature | None:
    """``F.pad``: padding other axes (Swin pads height and width of ``(B, H, W, C)``) keeps
    the units; a non-zero padding of the permuted axis would add units that do not exist."""
    x, pad = call.args[0], list(call.arg(1, "pad"))
    s = tr.state(x)
    if s is None:
        return None
    from_end = x.dim() - 1 - s.axis
    if any(pad[2 * from_end : 2 * from_end + 2]):
        tr.fix(s)  # padded positions along the units: they stay in place
        return None
    return s


@register_rule("roll")
def _roll(tr: Tracer, call: OpCall) -> Feature | None:
    """``torch.roll`` over other axes (Swin's cyclic shift) keeps the units."""
    x = call.args[0]
    s = tr.state(x)
    if s is None:
        return None
    dims = normalize_dims(call.arg(2, "dims"), x.dim())
    if dims is None or s.axis in dims:
        tr.unsupported(call, "it rolls the permuted axis (rolling other axes is supported)")
        return None
    return s


@register_rule("repeat", "tile")
def _repeat(tr: Tracer, call: OpCall) -> Feature | None:
    """``x.repeat(r_0, …)``: copies along other axes keep the units; ``r`` copies along the
    permuted axis are the same units ``r`` times (``outer × r``)."""
    x, out = call.args[0], call.out
    s = tr.state(x)
    if s is None:
        return None
    given = call.kwargs.get("repeats") or call.kwargs.get("dims") or ()
    reps = call.args[1:] if len(call.args) > 1 else given
    reps = list(reps[0]) if len(reps) == 1 and not isinstance(reps[0], int) else list(reps)
    if len(reps) < x.dim():
        reps = [1] * (x.dim() - len(reps)) + reps
    axis = s.axis + out.dim() - x.dim()
    r = reps[len(reps) - x.dim() + s.axis]
    return Feature(axis, s.var, s.size, s.inner, s.outer * r)


@register_rule("interpolate", "upsample", "upsample_nearest", "upsample_bilinear")
def _resize(tr: Tracer, call: OpCall) -> Feature | None:
    return _spatial(tr, call, call.args[0].dim() - 2)


@register_rule("cat", "concat", "concatenate", "stack", params=True)
def _cat(tr: Tracer, call: OpCall) -> Feature | None:
    """Along another axis, inputs share the permutation (a parameter such as ViT's class
    token follows it); along the permuted axis, the output is their concatenation."""
    parts = list(call.arg(0, "tensors"))
    states = [tr.state(t) for t in parts]
    if all(s is None for s in states):
        for t in parts:
            tr.fix_tensor(tr.param(t))
        return None
    out = call.out
    dim = call.arg(1, "dim", 0) % out.dim()
    ref = next(s for s in states if s is not None)
    if call.name != "stack" and dim == ref.axis:
        return _concatenate(tr, call, parts, states)
    axis = ref.axis + (1 if call.name == "stack" and dim <= ref.axis else 0)
    var = ref.var
    for t, s in zip(parts, states):
        if s is None:
            view = tr.param(t)
            if view is not None and t.shape[ref.axis] == ref.size * ref.inner * ref.outer:
                tr.fix_tensor(view, keep=(ref.axis,))
                tr.assign(view, ref.axis, ref)
            else:
                var = tr.union(var, FIXED)
        elif s.layout != ref.layout:
            tr.unsupported(call, "its inputs are permuted along different axes")
            return None
        else:
            var = tr.union(var, s.var)
    return Feature(axis, tr.find(var), ref.size, ref.inner, ref.outer)


@register_rule("chunk", "split", "split_with_sizes", "tensor_split", "unbind")
def _split_op(tr: Tracer, call: OpCall) -> list[Feature] | None:
    """Pieces along another axis keep the units; pieces along the permuted axis are the
    segments of a concatenation (each its own group, as ``torch.cat`` would make them)."""
    x, outputs = call.args[0], call.out_tensors()
    s = tr.state(x)
    if s is None:
        return None
    dim = call.arg(1 if call.name == "unbind" else 2, "dim", 0) % x.dim()
    if dim != s.axis:
        axis = s.axis - (1 if call.name == "unbind" and dim < s.axis else 0)
        return [s.moved(axis)] * len(outputs)
    if call.name == "unbind" or s.inner != 1 or s.outer != 1:
        tr.fix(s)  # single units or blocks of another layout picked out: they stay in place
        return None
    pieces, offset, states = [], 0, []
    for k, t in enumerate(outputs):
        var = tr.new_var(f"{tr.vars.names[s.var]}.{k}", t.shape[dim])
        pieces.append((var, 1, 1, offset))
        states.append(Feature(dim, var, t.shape[dim]))
        offset += t.shape[dim]
    tr.union(s.var, tr.vars.new_defined(tr.vars.names[s.var], s.size, pieces))
    return states


def _concatenate(
    tr: Tracer, call: OpCall, parts: list[Tensor], states: list[Feature | None]
) -> Feature | None:
    """Concatenation along the permuted axis: a composite variable of the inputs' units."""
    axis = next(s for s in states if s is not None).axis
    pieces, offset = [], 0
    for t, s in zip(parts, states):
        tr.fix_tensor(tr.param(t))
        if s is not None and (s.inner != 1 or s.outer != 1 or s.axis != axis):
            tr.unsupported(call, "it concatenates inputs with different layouts along the permuted axis")
            return None
        pieces.append((FIXED if s is None else s.var, 1, 1, offset))
        offset += t.shape[axis]
    var = tr.vars.new_defined("cat", offset, pieces)
    return Feature(axis, var, offset)


def _index_items(index: Any) -> tuple:
    return index if isinstance(index, tuple) else (index,)


def _consumed(item: Any) -> int:
    if item is None or item is Ellipsis:
        return 0
    if isinstance(item, Tensor) and item.dtype == torch.bool:
        return item.dim()
    return 1


def _index_map(x: Tensor, items: tuple) -> list[tuple[int, Any, int]] | None:
    """Basic indexing as ``(input axis, item, output axis or -1)``; None for advanced indexing."""
    if any(isinstance(i, (Tensor, list)) for i in items):
        return None
    rows, in_dim, out_dim = [], 0, 0
    for item in items:
        if item is Ellipsis:
            width = x.dim() - sum(_consumed(i) for i in items)
            rows += [(in_dim + k, slice(None), out_dim + k) for k in range(width)]
            in_dim, out_dim = in_dim + width, out_dim + width
        elif item is None:
            out_dim += 1
        else:
            rows.append((in_dim, item, -1 if isinstance(item, int) else out_dim))
            in_dim, out_dim = in_dim + 1, out_dim + (0 if isinstance(item, int) else 1)
    rows += [(in_dim + k, slice(None), out_dim + k) for k in range(x.dim() - in_dim)]
    return rows


def _index_ref(tr: Tracer, call: OpCall, ref: ParamRef) -> ParamRef | None:
    x, out = call.args[0], call.out
    rows = _index_map(x, _index_items(call.args[1]))
    if rows is None:
        return _gathered_ref(tr, x, _index_items(call.args[1]), ref)
    axes: list = [None] * out.dim()
    for axis, item, target in rows:
        whole = isinstance(item, slice) and item == slice(None)
        if whole and target >= 0:
            axes[target] = ref.axes[axis]
        else:  # this parameter axis is indexed into: it stays put
            tr.pin_axes(ref.name, ref.axes[axis])
    return ParamRef(ref.name, tuple(axes))


def _gathered_ref(tr: Tracer, x: Tensor, items: tuple, ref: ParamRef) -> ParamRef | None:
    """``table[index]`` with one integer index tensor on the leading axis (Swin's and BEiT's
    relative-position bias ``table[index]``, one column per head): that axis is read at
    fixed positions and stays put; the other axes are followed."""
    index = items[0] if len(items) == 1 else None
    if isinstance(index, Tensor) and not index.is_floating_point() and index.dtype != torch.bool:
        tr.pin_axes(ref.name, ref.axes[0])
        return ParamRef(ref.name, (None,) * index.dim() + ref.axes[1:])
    tr.fix_tensor(ref)
    return None


@register_rule("__getitem__", params=True)
def _getitem(tr: Tracer, call: OpCall) -> Feature | ParamRef | None:
    x, items = call.args[0], _index_items(call.args[1])
    if any(isinstance(i, Tensor) and tr.state(i) is not None for i in items):
        tr.unsupported(call, "its index is computed from a permuted tensor")
        return None
    for item in items:
        if isinstance(item, Tensor):
            tr.fix_tensor(tr.param(item))
    ref, s, stacked = tr.param(x), tr.state(x), tr.stacked(x)
    if ref is not None:
        return _index_ref(tr, call, ref)
    if stacked is not None:
        return _stacked_slice(tr, x, items, stacked)
    if s is None:
        return None
    rows = _index_map(x, items)
    if rows is None:
        return _advanced_getitem(tr, call, s)
    for axis, item, target in rows:
        if axis == s.axis:
            if isinstance(item, slice) and item == slice(None) and target >= 0:
                return s.moved(target)
            if isinstance(item, slice) and target >= 0:
                return _slice(tr, s, item, x.shape[s.axis], target)
            if isinstance(item, int):  # one unit picked out: it must stay where it is
                tr.fix(s)
                return None
            tr.unsupported(call, "it indexes into the permuted axis")
            return None
    tr.unsupported(call, "could not follow the permuted axis through this indexing")
    return None


def _slice(tr: Tracer, s: Feature, item: slice, length: int, target: int) -> Feature | None:
    """``x[..., a:b]`` on the permuted axis (GhostNet's ``cat(...)[:, :out]``, RexNet's
    ``x[:, :C]``, DPN's dual path): the units become segments ``[0, a)``, ``[a, b)``,
    ``[b, n)``, each permuted within itself, and the slice carries the middle one. A slice
    that is already a run of whole segments of a concatenation carries those. Strided slices
    and blocked layouts keep the units in place."""
    start, stop, step = item.indices(length)
    if step != 1 or s.inner != 1 or s.outer != 1 or stop <= start:
        tr.fix(s)
        return None
    if (start, stop) == (0, length):
        return s.moved(target)
    definition = tr.vars.definition(s.var)
    if definition is not None:
        inside = [p for p in definition if start <= p[3] and p[3] + _part_length(tr, p) <= stop]
        if sum(_part_length(tr, p) for p in inside) == stop - start and all(p[1:3] == (1, 1) for p in inside):
            parts = [(v, 1, 1, offset - start) for v, _, _, offset in inside]
            return Feature(target, tr.vars.new_defined("slice", stop - start, parts), stop - start)
        tr.fix(s)  # a slice cutting a segment of a concatenation: keep it all in place
        return None
    name = tr.vars.names[s.var]
    pieces, middle = [], FIXED
    for lo, hi in ((0, start), (start, stop), (stop, length)):
        if hi > lo:
            var = tr.new_var(f"{name}[{lo}:{hi}]", hi - lo)
            pieces.append((var, 1, 1, lo))
            middle = var if lo == start else middle
    tr.union(s.var, tr.vars.new_defined(name, length, pieces))
    return Feature(target, middle, stop - start)


def _part_length(tr: Tracer, part: tuple[int, int, int, int]) -> int:
    var, inner, outer, _ = part
    return tr.vars.sizes[var] * inner * outer


def _stacked_slice(tr: Tracer, x: Tensor, items: tuple, stacked: Stacked) -> Feature | None:
    """``h_n[k]`` (e.g. ``h_n[-1]``): one layer's slice carries that layer's units."""
    rows = _index_map(x, items)
    picked = [(axis, item) for axis, item, _ in rows or [] if item != slice(None)]
    if rows is not None and len(picked) == 1 and picked[0][0] == stacked.axis:
        _, item = picked[0]
        if isinstance(item, int):
            return Feature(x.dim() - 2, stacked.vars[item], stacked.size)
    tr.pin(x)
    return None


def _advanced_getitem(tr: Tracer, call: OpCall, s: Feature) -> Feature | None:
    """Indexing with one index tensor on an axis before the permuted one (e.g. ``h[rows]``)."""
    x, items, out = call.args[0], _index_items(call.args[1]), call.out
    tensors = [k for k, i in enumerate(items) if isinstance(i, (Tensor, list))]
    before = items[: tensors[0]] if len(tensors) == 1 else None
    if before is None or any(i is Ellipsis or i is None for i in items) or tensors[0] >= s.axis:
        tr.fix(s)  # a gather that reads the units at fixed positions: they stay in place
        return None
    index = items[tensors[0]]
    removed = _consumed(index) if isinstance(index, Tensor) else 1
    added = (1 if index.dtype == torch.bool else index.dim()) if isinstance(index, Tensor) else 1
    axis = s.axis - removed + added
    if axis >= out.dim() or out.shape[axis] != x.shape[s.axis]:
        tr.unsupported(call, "could not follow the permuted axis through this indexing")
        return None
    return s.moved(axis)


@register_rule("__setitem__")
def _setitem(tr: Tracer, call: OpCall) -> None:
    """``target[index] = value``: the written part must carry the target's permutation."""
    target, index, value = call.args[0], call.args[1], call.args[2]
    if any(isinstance(i, Tensor) and tr.state(i) is not None for i in _index_items(index)):
        tr.unsupported(call, "its index is computed from a permuted tensor")
        return None
    s_t, s_v = tr.state(target), tr.state(value)
    if s_t is not None and s_v is not None:
        written = _written_part(tr, target, index, s_t)
        if written is not None:
            feature, ndim = written
            if feature.layout == (s_v.axis + ndim - value.dim(), *s_v.layout[1:]):
                tr.union(feature.var, s_v.var)
                return None
    tr.fix(s_t)  # partly permuted content cannot be permuted as a whole
    tr.fix(s_v)
    return None


def _written_part(tr: Tracer, target: Tensor, index: Any, s: Feature) -> tuple[Feature, int] | None:
    """The feature of ``target[index]`` and its number of axes (RexNet's ``x[:, :C] += shortcut``
    writes a segment)."""
    items = _index_items(index)
    rows = _index_map(target, items)
    if rows is None:
        return None
    ndim = sum(out_axis >= 0 for _, _, out_axis in rows) + sum(i is None for i in items)
    for axis, item, out_axis in rows:
        if axis == s.axis and isinstance(item, slice) and out_axis >= 0:
            feature = _slice(tr, s, item, target.shape[s.axis], out_axis)
            return (feature, ndim) if feature is not None else None
    return None
