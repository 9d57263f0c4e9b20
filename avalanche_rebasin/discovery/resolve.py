"""From the tracer's constraints to a :class:`PermutationSpec`.

1. Every use of one tensor axis must permute it the same way: the variables of its
   recorded layouts are merged part by part.
2. Concatenations (composite variables) are resolved: a pinned concatenation pins its
   inputs; two concatenations known to be equal are equal input by input.
3. Each remaining class of variables is a group; each tensor axis gets its parts, a
   concatenation expanding into one segment per input.
"""

from __future__ import annotations

from ..core.spec import AxisPermutation, PermutationSpec
from .trace import FIXED, Part, Tracer, UnsupportedOperationError

__all__ = ["resolve"]

_PIN = ((FIXED, 1, 1, 0),)


def _check_sizes(tr: Tracer) -> None:
    """Variables merged into one group must have one size (a rule bug otherwise)."""
    fixed = tr.find(FIXED)
    for var in range(1, len(tr.vars.parent)):
        root = tr.find(var)
        if root != fixed and tr.vars.sizes[var] != tr.vars.sizes[root]:
            raise UnsupportedOperationError(
                f"Units of '{tr.vars.names[var]}' ({tr.vars.sizes[var]}) were tied to those of "
                f"'{tr.vars.names[root]}' ({tr.vars.sizes[root]}); write the spec by hand with "
                "PermutationSpec.from_groups(...)."
            )


def _merge_layouts(tr: Tracer) -> None:
    for (tensor, axis), layouts in tr.assignments.items():
        first = layouts[0]
        for layout in layouts[1:]:
            if [p[1:] for p in layout] == [p[1:] for p in first]:
                for a, b in zip(first, layout):
                    tr.union(a[0], b[0])
            elif tr.policy == "freeze" or _PIN in (first, layout):
                tr.fix_vars(first + layout)  # one use pins the axis: all of it stays put
            else:
                raise UnsupportedOperationError(
                    f"Tensor '{tensor}' axis {axis} is used with different layouts; pass "
                    "unsupported='freeze' to leave it unpermuted, or write the spec by hand with "
                    "PermutationSpec.from_groups(...)."
                )


def _definitions_by_class(tr: Tracer) -> dict[int, list[int]]:
    classes: dict[int, list[int]] = {}
    for var in tr.vars.definitions:
        classes.setdefault(tr.find(var), []).append(var)
    return classes


def _shape(tr: Tracer, parts: tuple[Part, ...]) -> list[tuple[int, int, int, int]]:
    return [(tr.vars.sizes[v], inner, outer, offset) for v, inner, outer, offset in parts]


def _pin_defined(tr: Tracer, defined: list[int]) -> bool:
    changed = False
    for var in defined:
        for part in tr.vars.definitions[var]:
            changed |= tr.find(part[0]) != tr.find(FIXED)
            tr.union(part[0], FIXED)
        changed |= tr.find(var) != tr.find(FIXED)
        tr.union(var, FIXED)
    return changed


def _settle_definitions(tr: Tracer) -> None:
    """Pin the parts of pinned definitions; equate the parts of equal definitions."""
    changed = True
    while changed:
        changed = False
        for root, defined in _definitions_by_class(tr).items():
            first = tr.vars.definitions[defined[0]]
            pinned = root == tr.find(FIXED) or tr.vars.blocks[root] > 1
            for other in defined[1:]:
                parts = tr.vars.definitions[other]
                if _shape(tr, parts) != _shape(tr, first):
                    pinned = True
                    break
                for a, b in zip(first, parts):
                    changed |= tr.find(a[0]) != tr.find(b[0])
                    tr.union(a[0], b[0])
            if pinned:
                changed |= _pin_defined(tr, defined)


def _expand(tr: Tracer, part: Part, defined: dict[int, list[int]]) -> list[Part] | None:
    """The group parts of one recorded part (None: a definition seen with ``outer > 1``)."""
    var, inner, outer, offset = part
    root = tr.find(var)
    if root == tr.find(FIXED):
        return []
    if root not in defined:
        return [(root, inner, outer, offset)]
    if outer != 1:
        return None
    out: list[Part] = []
    for sub, sub_inner, sub_outer, sub_offset in tr.vars.definitions[defined[root][0]]:
        expanded = _expand(tr, (sub, inner * sub_inner, sub_outer, offset + sub_offset * inner), defined)
        if expanded is None:
            return None
        out += expanded
    return out


def _expanded_assignments(tr: Tracer) -> dict[tuple[str, int], list[Part]]:
    """Each tensor axis's group parts, after settling concatenations (repeated until stable)."""
    while True:
        _settle_definitions(tr)
        defined = _definitions_by_class(tr)
        result: dict[tuple[str, int], list[Part]] = {}
        retry = False
        for key, layouts in tr.assignments.items():
            parts: list[Part] = []
            for part in layouts[0]:
                expanded = _expand(tr, part, defined)
                if expanded is None:
                    tr.union(part[0], FIXED)
                    retry = True
                    break
                parts += expanded
            result[key] = parts
        if not retry:
            return result


def resolve(tr: Tracer) -> PermutationSpec:
    _merge_layouts(tr)
    assignments = _expanded_assignments(tr)
    _check_sizes(tr)
    names: dict[int, str] = {}
    for var in range(1, len(tr.vars.parent)):
        root = tr.find(var)
        if root != tr.find(FIXED) and var not in tr.vars.definitions:
            names.setdefault(root, tr.vars.names[var])
    sizes: dict[str, int] = {}
    axes: dict[str, list] = {}
    for (tensor, axis), parts in sorted(assignments.items()):
        if not parts:
            continue
        length = tr.shapes[tensor][axis]
        entry = []
        for root, inner, outer, offset in parts:
            group, size = names[root], tr.vars.sizes[root]
            if sizes.setdefault(group, size) != size or offset + outer * size * inner > length:
                raise UnsupportedOperationError(
                    f"Group '{group}' has inconsistent sizes ({sizes[group]} units vs tensor "
                    f"'{tensor}' axis {axis} of length {length}); write the spec by hand with "
                    "PermutationSpec.from_groups(...)."
                )
            entry.append(AxisPermutation(group, inner, outer, offset))
        single = len(entry) == 1 and entry[0].offset == 0 and length == size * inner * outer
        axes.setdefault(tensor, [None] * len(tr.shapes[tensor]))[axis] = entry[0] if single else tuple(entry)
    sizes = {g: sizes[g] for g in dict.fromkeys(names[r] for r in sorted(names)) if g in sizes}
    blocks = {names[r]: tr.vars.blocks[r] for r in names if names[r] in sizes}
    spec = PermutationSpec(sizes, {k: tuple(v) for k, v in axes.items()}, blocks)
    trivial = [g for g, n in sizes.items() if n < 2 or n == blocks.get(g, 1)]
    return spec.without_groups(*trivial) if trivial else spec
