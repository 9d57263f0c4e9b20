"""Discovery rules for layers that own parameters: linear, convolutions, norms, embeddings.

A layer that mixes features starts a new variable for its output units and records
which variable its input axis follows; per-channel parameters (norm weights, running
statistics) follow their input's variable.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..trace import FIXED, Feature, OpCall, ParamRef, Tracer, register_rule

__all__: list[str] = []


def _plain(tr: Tracer, tensor: Tensor | None) -> ParamRef | None:
    """The parameter ``tensor`` is, when it is one with its own axis order (else None)."""
    ref = tr.param(tensor)
    if ref is not None and tensor is not None and ref.axes == tuple(range(len(ref.axes))) and (
        len(ref.axes) == tensor.dim()
    ):
        return ref
    return None


def _computed_weight(tr: Tracer, call: OpCall, s: Feature | None, bias: ParamRef | None) -> None:
    """A weight computed at run time cannot be permuted: pin what it touches."""
    weight = call.arg(1, "weight")
    if tr.state(weight) is not None:
        tr.unsupported(call, "its weight is computed from a permuted activation")
        return None
    tr.fix(s)
    tr.fix_tensor(tr.param(weight))
    tr.fix_tensor(bias)
    return None


@register_rule("linear", params=True)
def _linear(tr: Tracer, call: OpCall) -> Feature | None:
    x, weight, bias = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    s, w, b = tr.state(x), tr.param(weight), tr.param(bias)
    if tr.state(bias) is not None:
        tr.unsupported(call, "its bias is a permuted activation")
        return None
    if s is not None and s.axis != x.dim() - 1:  # mixes another axis: features pass through
        tr.fix_tensor(w)
        tr.fix_tensor(b)
        return s
    if w is None or weight.dim() != 2:
        _computed_weight(tr, call, s, b)
        return None
    tr.assign(w, 1, s)  # through the view: `F.linear(h, enc.weight.t())` ties enc's axes
    var = tr.new_var(w.name.rsplit(".", 1)[0], weight.shape[0])
    tr.assign(w, 0, var)
    tr.fix_tensor(b, keep=(0,))
    tr.assign(b, 0, var)
    _pin_computed(tr, var, bias)
    return Feature(call.out.dim() - 1, var, weight.shape[0])


def _pin_computed(tr: Tracer, var: int, *tensors: Tensor | None) -> None:
    """Per-unit operands computed at run time (BEiT's ``cat((q_bias, k_bias, v_bias))``)
    are constants to the spec: the units they vary along stay in place."""
    for t in tensors:
        if isinstance(t, Tensor) and tr.param(t) is None and t.numel() > 1:
            tr.pin(t)
            tr.union(var, FIXED)


def _conv_parts(
    tr: Tracer, call: OpCall
) -> tuple[Tensor, Feature | None, ParamRef | None, ParamRef | None, int]:
    x, weight, bias = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    channel = 1 if x.dim() == weight.dim() else 0
    return x, tr.state(x), _plain(tr, weight), tr.param(bias), channel


def _convolution(tr: Tracer, call: OpCall, w_in: int, w_out: int) -> Feature | None:
    """Convolutions whose weight holds input channels on axis ``w_in``, outputs on ``w_out``."""
    x, s, w, b, channel = _conv_parts(tr, call)
    weight, groups = call.arg(1, "weight"), call.arg(6, "groups", 1)
    if s is not None and (s.axis != channel or s.inner != 1 or s.outer != 1):
        tr.fix(s)  # units on a spatial axis, or in blocks: the convolution sees them in place
        s = None
    if w is None:
        _computed_weight(tr, call, s, b)
        return None
    if groups == 1:
        tr.fix_tensor(w, keep=(0, 1))  # kernel axes
        tr.assign(w, w_in, s)
        var = tr.new_var(w.name.rsplit(".", 1)[0], weight.shape[w_out])
        tr.assign(w, w_out, var)
        tr.assign(b, 0, var)
        _pin_computed(tr, var, call.arg(2, "bias"))
        return Feature(channel, var, weight.shape[w_out])
    depthwise = groups == x.shape[channel] == weight.shape[0] and weight.shape[1] == 1
    if s is not None and depthwise:
        tr.fix_tensor(w, keep=(0,))  # depthwise: channel c only sees channel c
        tr.assign(w, 0, s)
        tr.assign(b, 0, s)
        _pin_computed(tr, s.var, call.arg(2, "bias"))
        return s
    tr.fix(s)  # grouped convolution: units cannot move between groups
    tr.fix_tensor(w)
    tr.fix_tensor(b)
    return None


@register_rule("conv1d", "conv2d", "conv3d", params=True)
def _conv(tr: Tracer, call: OpCall) -> Feature | None:
    return _convolution(tr, call, w_in=1, w_out=0)


@register_rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d", params=True)
def _conv_transpose(tr: Tracer, call: OpCall) -> Feature | None:
    """Transposed convolution: weight ``(in, out / groups, *kernel)``."""
    return _convolution(tr, call, w_in=0, w_out=1)


def _per_channel(tr: Tracer, call: OpCall, refs: Sequence[ParamRef | None]) -> Feature | None:
    s = tr.state(call.arg(0, "input"))
    if s is None:
        for ref in refs:
            tr.fix_tensor(ref)
        return None
    if s.axis != 1:
        tr.unsupported(call, "its per-channel statistics run over axis 1, not the permuted axis")
        return None
    for ref in refs:
        tr.fix_tensor(ref, keep=(0,))
        tr.assign(ref, 0, s)
    _pin_computed(tr, s.var, *[t for t in call.tensors()[1:] if t.dim() == 1])
    return s


@register_rule("batch_norm", "instance_norm", params=True)
def _batch_norm(tr: Tracer, call: OpCall) -> Feature | ParamRef | None:
    keys = ("running_mean", "running_var", "weight", "bias")
    refs = [tr.param(call.arg(i + 1, key)) for i, key in enumerate(keys)]
    weight_view = tr.param(call.arg(0, "input"))
    if weight_view is not None:
        return _standardised_weight(tr, call, weight_view, refs)
    return _per_channel(tr, call, refs)


def _standardised_weight(
    tr: Tracer, call: OpCall, view: ParamRef, refs: Sequence[ParamRef | None]
) -> ParamRef | None:
    """Weight standardisation (timm's ``StdConv2d``/``ScaledStdConv2d``, NF-ResNets):
    ``batch_norm(W.reshape(1, out, -1), weight=gain)`` normalises each output channel over
    its fan-in, which no permutation of the fan-in changes. The result is followed as ``W``
    itself, with the gain tied to the output channels."""
    x = call.arg(0, "input")
    if x.dim() != 3 or x.shape[0] != 1 or not isinstance(view.axes[1], int) or refs[0] or refs[1]:
        tr.fix_tensor(view)
        for ref in refs:
            tr.fix_tensor(ref)
        return None
    channels = tr.new_var(view.name.rsplit(".", 1)[0] + ".standardised", x.shape[1])
    tr.assign(view, 1, channels)
    for ref in refs[2:]:
        tr.fix_tensor(ref, keep=(0,))
        tr.assign(ref, 0, channels)
    return view


@register_rule("group_norm", params=True)
def _group_norm(tr: Tracer, call: OpCall) -> Feature | None:
    """GroupNorm with G groups: units may only move inside their normalisation group."""
    x, groups = call.arg(0, "input"), call.arg(1, "num_groups")
    refs = [tr.param(call.arg(2, "weight")), tr.param(call.arg(3, "bias"))]
    s = tr.state(x)
    if s is not None and groups not in (1, x.shape[1]):
        if s.inner != 1 or s.outer != 1 or tr.is_composite(s.var):
            tr.unsupported(call, "units cannot move between normalisation groups")
            return None
        tr.vars.restrict(s.var, groups)
    return _per_channel(tr, call, refs)


@register_rule("layer_norm", "rms_norm", params=True)
def _layer_norm(tr: Tracer, call: OpCall) -> Feature | None:
    x, shape = call.arg(0, "input"), call.arg(1, "normalized_shape")
    refs = [tr.param(call.arg(2, "weight"))]
    if call.name == "layer_norm":
        refs.append(tr.param(call.arg(3, "bias")))
    k = 1 if isinstance(shape, int) else len(shape)
    first = x.dim() - k
    s = tr.state(x)
    for ref in refs:
        if s is not None and s.axis >= first:  # statistics are invariant, weights follow
            tr.fix_tensor(ref, keep=(s.axis - first,))
            tr.assign(ref, s.axis - first, s)
        else:
            tr.fix_tensor(ref)
    if s is not None and s.axis >= first:
        _pin_computed(tr, s.var, *call.tensors()[1:])
    return s


@register_rule("embedding", params=True)
def _embedding(tr: Tracer, call: OpCall) -> Feature | None:
    indices, weight = call.arg(0, "input"), call.arg(1, "weight")
    w = _plain(tr, weight)
    if tr.state(indices) is not None:
        tr.unsupported(call, "its indices are permuted")
        return None
    if w is None:
        tr.fix_tensor(tr.param(weight))
        return None
    tr.assign(w, 0, FIXED)
    var = tr.new_var(w.name.rsplit(".", 1)[0], weight.shape[1])
    tr.assign(w, 1, var)
    return Feature(call.out.dim() - 1, var, weight.shape[1])


@register_rule("embedding_renorm_", params=True)
def _embedding_renorm(tr: Tracer, call: OpCall) -> None:
    """``max_norm`` renormalises rows by their norm over units: permutation-equivariant."""
    return None
