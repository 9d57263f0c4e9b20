"""Discovery rules for sequence models: recurrent layers, attention, and products of
activations (``matmul``, ``einsum``).

* ``nn.RNN``/``nn.LSTM``/``nn.GRU``: the hidden units of every layer and direction are
  one group, permuted consistently across the gates (rows ``outer = gates``), the
  recurrent weights (both axes) and the next layer's input (the directions' units
  concatenated); ``proj_size`` adds a group for the projected units.
* ``nn.MultiheadAttention``: a group permutes whole heads (q, k, v rows and the output
  projection's columns); within each head, one group permutes the query/key dimensions
  (shared by q and k) and one the value dimensions; the input and output units follow
  their streams.
* Hand-written attention: splitting a permuted axis into ``heads × head_dim`` permutes
  whole heads; ``scaled_dot_product_attention``, ``matmul`` and ``einsum`` follow a
  permuted axis that is batched over, kept, or contracted consistently.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..trace import FIXED, Feature, OpCall, Part, Stacked, Tracer, register_rule

__all__: list[str] = []

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _rnn_arguments(call: OpCall) -> tuple[Tensor, Any, list, bool, int, bool]:
    """``(input, hx, weights, has_biases, num_layers, bidirectional)`` of both call forms."""
    packed = isinstance(call.args[1], Tensor) and not call.args[1].is_floating_point()
    a = call.args[1:] if not packed else call.args[2:]  # packed form: (data, batch_sizes, hx, ...)
    return call.args[0], a[0], list(a[1]), bool(a[2]), int(a[3]), bool(a[6])


def _initial_state(tr: Tracer, call: OpCall, hx: Tensor | None, out_vars: list[int]) -> None:
    """A given initial state must be zero or carry the same units; otherwise pin them."""
    if hx is None:
        return
    s = tr.state(hx)
    if s is not None and len(out_vars) == 1 and s.axis == hx.dim() - 1:
        tr.union(s.var, out_vars[0])
    elif s is not None or tr.stacked(hx) is not None:
        tr.unsupported(call, "its initial state is a permuted activation of another layout")
    elif tr.param(hx) is not None or bool(hx.count_nonzero()):
        tr.fix_tensor(tr.param(hx))
        for var in out_vars:
            tr.union(var, FIXED)


@register_rule("lstm", "gru", "rnn_tanh", "rnn_relu", params=True)
def _recurrent(tr: Tracer, call: OpCall) -> list[Any] | None:
    x, hx, weights, has_biases, layers, bidirectional = _rnn_arguments(call)
    s, gates, directions = tr.state(x), _GATES[call.name], 2 if bidirectional else 1
    if s is not None and (s.axis != x.dim() - 1 or s.inner != 1 or s.outer != 1):
        tr.unsupported(call, "the permuted axis of its input is not the feature axis")
        return None
    per = len(weights) // (layers * directions)
    cells, outs, inputs = [], [], [(FIXED if s is None else s.var, 1, 1, 0)]
    for layer in range(layers):
        layer_outs = []
        for direction in range(directions):
            w = [tr.param(t) for t in weights[(layer * directions + direction) * per :][:per]]
            hidden = weights[(layer * directions + direction) * per].shape[0] // gates
            name = f"{call.module or call.name}.l{layer}" + ("_reverse" if direction else "")
            cell = tr.new_var(name, hidden)
            rows = ((cell, 1, gates, 0),)
            out = cell
            if per - (4 if has_biases else 2) == 1:  # LSTM proj_size: h = W_hr (o ⊙ tanh c)
                out = tr.new_var(
                    name + ".proj", weights[(layer * directions + direction) * per + per - 1].shape[0]
                )
                tr.assign(w[-1], 0, out)
                tr.assign(w[-1], 1, cell)
            tr.assign_parts(w[0], 0, rows)
            tr.assign_parts(w[0], 1, tuple(inputs))
            tr.assign_parts(w[1], 0, rows)
            tr.assign(w[1], 1, out)
            for bias in w[2:4] if has_biases else ():
                tr.assign_parts(bias, 0, rows)
            cells.append(cell)
            layer_outs.append(out)
        size = tr.vars.sizes[layer_outs[0]]
        inputs = [(v, 1, 1, k * size) for k, v in enumerate(layer_outs)]
        outs += layer_outs
    _initial_state(tr, call, hx[0] if isinstance(hx, (tuple, list)) else hx, outs)
    if isinstance(hx, (tuple, list)):
        _initial_state(tr, call, hx[1], cells)
    size = tr.vars.sizes[outs[-1]]
    final = outs[-1] if directions == 1 else tr.vars.new_defined("bidirectional", 2 * size, inputs)
    output = Feature(call.out_tensors()[0].dim() - 1, final, size * directions)
    ndim = call.out_tensors()[-1].dim()
    states = [_final_states(outs, size, ndim), _final_states(cells, tr.vars.sizes[cells[-1]], ndim)]
    return [output, *states[: len(call.out_tensors()) - 1]]


def _final_states(variables: list[int], size: int, ndim: int) -> Feature | Stacked:
    if len(variables) == 1:
        return Feature(ndim - 1, variables[0], size)
    return Stacked(0, tuple(variables), size)


def _head_parts(within: int, heads: int, head_dim: int, offset: int) -> tuple[Part, ...]:
    """A q/k/v row segment: dimensions permuted within each head, then whole heads."""
    return ((within, 1, 1, offset), (heads, head_dim, 1, offset))


def _attention_inputs(tr: Tracer, call: OpCall) -> list[Feature | None] | None:
    inputs = [call.arg(i, k) for i, k in enumerate(("query", "key", "value"))]
    states = [tr.state(t) for t in inputs]
    if any(
        s is not None and (s.axis != t.dim() - 1 or s.inner != 1 or s.outer != 1)
        for s, t in zip(states, inputs)
    ):
        tr.unsupported(call, "the permuted axis of a query/key/value is not its feature axis")
        return None
    for key in ("key_padding_mask", "attn_mask", "static_k", "static_v"):
        if tr.state(call.kwargs.get(key)) is not None or tr.stacked(call.kwargs.get(key)) is not None:
            tr.unsupported(call, f"its {key} is a permuted activation")
            return None
    if call.kwargs.get("static_k") is not None or call.kwargs.get("static_v") is not None:
        tr.unsupported(call, "static keys/values are not supported")
        return None
    return states


@register_rule("multi_head_attention_forward", params=True)
def _multi_head_attention(tr: Tracer, call: OpCall) -> list[Feature | None] | None:
    states = _attention_inputs(tr, call)
    if states is None:
        return None
    query, heads = call.arg(0, "query"), call.arg(4, "num_heads")
    out_weight = call.arg(11, "out_proj_weight")
    embed = out_weight.shape[1]
    head_dim = embed // heads
    name = call.module or "attention"
    head = tr.new_var(name + ".heads", heads)
    qk, vd = tr.new_var(name + ".qk", embed), tr.new_var(name + ".v", embed)
    tr.vars.restrict(qk, heads)
    tr.vars.restrict(vd, heads)
    q_rows, k_rows, v_rows = (_head_parts(w, head, head_dim, 0) for w in (qk, qk, vd))
    columns = [(FIXED if s is None else s.var, 1, 1, 0) for s in states]
    if call.kwargs.get("use_separate_proj_weight"):
        for key, rows, col in zip(
            ("q_proj_weight", "k_proj_weight", "v_proj_weight"), (q_rows, k_rows, v_rows), columns
        ):
            ref = tr.param(call.kwargs[key])
            tr.assign_parts(ref, 0, rows)
            tr.assign_parts(ref, 1, (col,))
    else:
        for col in columns[1:]:
            tr.union(columns[0][0], col[0])  # one weight matrix projects all three inputs
        ref = tr.param(call.arg(5, "in_proj_weight"))
        tr.assign_parts(ref, 0, q_rows + _shift(k_rows, embed) + _shift(v_rows, 2 * embed))
        tr.assign_parts(ref, 1, (columns[0],))
    rows = q_rows + _shift(k_rows, embed) + _shift(v_rows, 2 * embed)
    tr.assign_parts(tr.param(call.arg(6, "in_proj_bias")), 0, rows)
    tr.assign_parts(tr.param(call.arg(7, "bias_k")), 2, k_rows)
    tr.assign_parts(tr.param(call.arg(8, "bias_v")), 2, v_rows)
    output = tr.new_var(name + ".out_proj", out_weight.shape[0])
    out_ref = tr.param(out_weight)
    tr.assign(out_ref, 0, output)
    tr.assign_parts(out_ref, 1, v_rows)
    tr.assign(tr.param(call.arg(12, "out_proj_bias")), 0, output)
    attn_mask = call.kwargs.get("attn_mask")
    if attn_mask is not None and attn_mask.dim() == 3:  # one mask per head: heads stay put
        tr.union(head, FIXED)
    result: list[Feature | None] = [Feature(query.dim() - 1, output, out_weight.shape[0])]
    for weights in call.out_tensors()[1:]:  # averaged over heads, or per head (N, H, L, S)
        per_head = weights.dim() == query.dim() + 1
        result.append(Feature(weights.dim() - 3, head, heads) if per_head else None)
    return result


def _shift(parts: tuple[Part, ...], offset: int) -> tuple[Part, ...]:
    return tuple((v, inner, outer, o + offset) for v, inner, outer, o in parts)


def _operand_letters(a: Tensor, b: Tensor) -> tuple[str, str, str]:
    """``matmul`` broadcasting as einsum subscripts (batch axes aligned from the right)."""
    na, nb = a.dim(), b.dim()
    batch = "abcdefgh"[: max(na, nb) - 2] if min(na, nb) >= 2 else "abcdefgh"[: max(na, nb) - 1]
    if na == 1 and nb == 1:
        return "k", "k", ""
    if na == 1:
        return "k", batch[len(batch) - (nb - 2) :] + "kj", batch + "j"
    if nb == 1:
        return batch[len(batch) - (na - 2) :] + "ik", "k", batch + "i"
    return batch[len(batch) - (na - 2) :] + "ik", batch[len(batch) - (nb - 2) :] + "kj", batch + "ij"


def _einsum_subscripts(equation: str, operands: list[Tensor]) -> tuple[list[str], str]:
    """Subscripts per operand and of the output, with ``...`` spelled out as digits."""
    inputs, _, output = equation.replace(" ", "").partition("->")
    subs = inputs.split(",")
    width = max(
        (t.dim() - len(s.replace("...", "")) for s, t in zip(subs, operands) if "..." in s), default=0
    )
    ellipsis = "".join(str(k) for k in range(width))
    spelled = [s.replace("...", ellipsis[width - (t.dim() - len(s) + 3) :]) for s, t in zip(subs, operands)]
    if not _:
        counts = "".join(spelled)
        output = ellipsis + "".join(sorted(c for c in set(counts) if counts.count(c) == 1 and c.isalpha()))
    return spelled, output.replace("...", ellipsis)


def _letter_variables(tr: Tracer, call: OpCall, operands: list, subs: list[str]) -> dict[str, Feature] | None:
    """Which subscript each permuted operand carries its units on (one variable per letter)."""
    found: dict[str, Feature] = {}
    for t, sub in zip(operands, subs):
        s = tr.state(t)
        if s is None:
            continue
        letter = sub[s.axis]
        if letter in found and found[letter].layout[1:] != s.layout[1:]:
            coarse = _coarsened(tr, found[letter], s)
            if coarse is None:
                tr.unsupported(
                    call,
                    "its operands carry one index with different layouts (one index must carry "
                    "the same units, or whole blocks of them as after repeat_kv, in every operand)",
                )
                return None
            found[letter] = coarse
            continue
        merged = s.var if letter not in found else tr.union(found[letter].var, s.var)
        found[letter] = Feature(s.axis, merged, s.size, s.inner, s.outer)
    return found


def _coarsened(tr: Tracer, a: Feature, b: Feature) -> Feature | None:
    """Two layouts of one index where one moves blocks of the other's units (grouped-query
    attention: a key/value head repeated for ``r`` query heads is ``(kv_heads, inner r)``
    against the queries' ``(heads, inner 1)``): the finer units are tied to move in those
    blocks, and the coarser layout is the index's. None if neither refines the other."""
    fine, coarse = (a, b) if a.inner <= b.inner else (b, a)
    ratio, rem = divmod(coarse.inner, fine.inner)
    if rem or fine.outer != coarse.outer or fine.size != coarse.size * ratio:
        return None
    name = tr.vars.names[coarse.var] + ".groups"
    tr.union(fine.var, tr.vars.new_defined(name, fine.size, [(coarse.var, ratio, 1, 0)]))
    return coarse


def _contract(tr: Tracer, call: OpCall, operands: list, subs: list[str], out: str) -> Feature | None:
    """A product of tensors written as einsum subscripts: a letter's permutation must be
    carried by every operand with that letter (parameters follow it, constants pin it)."""
    found = _letter_variables(tr, call, operands, subs)
    if found is None:
        return None
    kept: dict[int, list[int]] = {}
    for k, (t, sub) in enumerate(zip(operands, subs)):
        own = sub[state.axis] if (state := tr.state(t)) is not None else None
        for letter, feature in found.items():
            if letter not in sub or letter == own:
                continue
            axis = sub.index(letter)
            if tr.param(t) is not None:
                tr.assign(tr.param(t), axis, feature)
                kept.setdefault(k, []).append(axis)
            elif t.shape[axis] != 1:
                tr.union(feature.var, FIXED)  # an operand that is not permuted along this index
    carried = [(letter, f) for letter, f in found.items() if letter in out and tr.find(f.var) != FIXED]
    if len(carried) > 1:
        tr.unsupported(call, "its output would carry two permuted axes")
        return None
    result = None
    if carried:
        letter, f = carried[0]
        result = Feature(out.index(letter), tr.find(f.var), f.size, f.inner, f.outer)
    else:
        result = _projection(tr, operands, subs, out, kept)
    for k, t in enumerate(operands):
        tr.fix_tensor(tr.param(t), keep=kept.get(k, []))
    return result


def _projection(
    tr: Tracer, operands: list, subs: list[str], out: str, kept: dict[int, list[int]]
) -> Feature | None:
    """``x @ W``: an index of a 2-d parameter that only the output shares starts new units."""
    refs = [k for k, t in enumerate(operands) if tr.param(t) is not None and t.dim() == 2]
    if len(refs) != 1:
        return None
    k = refs[0]
    fresh = [c for c in subs[k] if c in out and all(c not in s for i, s in enumerate(subs) if i != k)]
    if len(fresh) != 1:
        return None
    ref, axis = tr.param(operands[k]), subs[k].index(fresh[0])
    assert ref is not None  # k indexes a parameter operand
    var = tr.new_var(ref.name.rsplit(".", 1)[0], operands[k].shape[axis])
    tr.assign(ref, axis, var)
    kept.setdefault(k, []).append(axis)
    return Feature(out.index(fresh[0]), var, operands[k].shape[axis])


@register_rule("matmul", "__matmul__", "__rmatmul__", "mm", "bmm", params=True)
def _matmul(tr: Tracer, call: OpCall) -> Feature | None:
    a, b = call.args[0], call.args[1]
    if call.name == "__rmatmul__":
        a, b = b, a
    sa, sb, out = _operand_letters(a, b)
    return _contract(tr, call, [a, b], [sa, sb], out)


@register_rule("addmm", "baddbmm", "addbmm", params=True)
def _add_product(tr: Tracer, call: OpCall) -> Feature | None:
    """``input + a @ b`` (Hugging Face's ``Conv1D``: ``addmm(bias, x, W)`` with ``W`` stored
    ``(in, out)``; Bloom's ALiBi ``baddbmm``): the product as ``matmul``, then ``input``
    added element-wise to it."""
    bias, a, b = (
        call.arg(0, "input"),
        call.arg(1, "mat1" if call.name == "addmm" else "batch1"),
        call.arg(2, "mat2" if call.name == "addmm" else "batch2"),
    )
    if call.name == "addbmm":
        subs, out = ["bik", "bkj"], "ij"
    else:
        sa, sb, out = _operand_letters(a, b)
        subs = [sa, sb]
    product = _contract(tr, call, [a, b], subs, out)
    out_tensor = call.out
    s_bias, ref = tr.state(bias), tr.param(bias)
    if product is None:
        if s_bias is not None:
            tr.fix(s_bias)
        tr.fix_tensor(ref)
        return None
    local = product.axis - (out_tensor.dim() - bias.dim())
    if s_bias is not None:
        if s_bias.layout != (local, *product.layout[1:]):
            tr.fix(s_bias)
            tr.fix(product)
            return None
        return Feature(
            product.axis, tr.union(product.var, s_bias.var), product.size, product.inner, product.outer
        )
    if local < 0 or bias.shape[local] == 1:
        tr.fix_tensor(ref)
    elif ref is not None:
        tr.fix_tensor(ref, keep=(local,))
        tr.assign(ref, local, product)
    else:
        tr.fix(product)
        return None
    return Feature(product.axis, tr.find(product.var), product.size, product.inner, product.outer)


@register_rule("einsum", params=True)
def _einsum(tr: Tracer, call: OpCall) -> Feature | None:
    operands = (
        list(call.args[1])
        if len(call.args) == 2 and isinstance(call.args[1], (list, tuple))
        else list(call.args[1:])
    )
    if not isinstance(call.args[0], str) or not all(isinstance(t, Tensor) for t in operands):
        tr.unsupported(call, "only the equation form einsum('ij,jk->ik', a, b) is followed")
        return None
    subs, out = _einsum_subscripts(call.args[0], operands)
    return _contract(tr, call, operands, subs, out)


@register_rule("scaled_dot_product_attention", params=True)
def _sdpa(tr: Tracer, call: OpCall) -> Feature | None:
    """``softmax(q kᵀ · scale + mask) v``: q and k share their last index, k and v their
    sequence index; batch and head axes are shared by all three."""
    q, k, v = (call.arg(i, n) for i, n in enumerate(("query", "key", "value")))
    mask = call.arg(3, "attn_mask")
    n = max(q.dim(), k.dim(), v.dim())
    batch = "abcdefgh"[: n - 2]
    subs = [batch[n - t.dim() :] + tail for t, tail in ((q, "LD"), (k, "SD"), (v, "SE"))]
    operands = [q, k, v]
    if mask is not None:
        operands.append(mask)
        subs.append(batch[len(batch) - (mask.dim() - 2) :] + "LS" if mask.dim() >= 2 else "S")
    positional = call.arg(5, "is_causal", False) or mask is not None
    for t, sub in zip(operands, subs):
        s = tr.state(t)
        if s is not None and positional and sub[s.axis] in "LS":
            tr.union(s.var, FIXED)  # masks depend on positions
    if bool(call.kwargs.get("enable_gqa", False)) and q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        subs = _grouped_heads(tr, q, k, v, subs)
    return _contract(tr, call, operands, subs, subs[0][:-2] + "LE")


def _grouped_heads(tr: Tracer, q: Tensor, k: Tensor, v: Tensor, subs: list[str]) -> list[str]:
    """``enable_gqa``: key/value head ``g`` serves query heads ``g·r … g·r + r − 1``. The
    query heads get their own letter, tied to move in blocks of ``r`` with the key/value
    heads (whose letter stays shared by k and v)."""
    r = q.shape[-3] // k.shape[-3]
    head_q = tr.state(q)
    heads_kv = [s for s in (tr.state(k), tr.state(v)) if s is not None and s.axis == s_axis(k, -3)]
    if head_q is not None and head_q.axis == s_axis(q, -3) and heads_kv:
        tr.union(head_q.var, tr.vars.new_defined("gqa", head_q.size, [(heads_kv[0].var, r, 1, 0)]))
    else:
        tr.fix(head_q if head_q is not None and head_q.axis == s_axis(q, -3) else None)
        for s in heads_kv:
            tr.fix(s)
    renamed = [sub[:-3] + "H" + sub[-2:] if n in (0,) else sub for n, sub in enumerate(subs)]
    return renamed


def s_axis(t: Tensor, axis: int) -> int:
    return axis % t.dim()
