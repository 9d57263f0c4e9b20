"""Every tensor an object holds: what a model returned or stored, through any container."""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["reachable_tensors"]

_MAX_REACHABLE = 200_000


def reachable_tensors(root: Any) -> list[Tensor]:
    """Every tensor inside ``root``: through sequences, sets, mappings and the attributes of
    any object (a ``SimpleNamespace``, a dataclass, a custom output class), not modules."""
    found: list[Tensor] = []
    seen: set[int] = set()
    stack = [root]
    while stack and len(seen) < _MAX_REACHABLE:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _OPAQUE):
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            found.append(obj)
        elif isinstance(obj, Mapping):
            stack.extend([*obj.keys(), *obj.values()])
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, Iterable) and not isinstance(obj, Iterator):  # deque, dict views
            stack.extend(_items(obj))
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
            slots = [s for cls in type(obj).__mro__ for s in getattr(cls, "__slots__", ())]
            stack.extend(getattr(obj, s) for s in slots if isinstance(s, str) and hasattr(obj, s))
    return found


def _items(container: Iterable) -> list[Any]:
    try:
        return list(container)
    except Exception:
        return []


_OPAQUE = (nn.Module, type, types.ModuleType, types.FunctionType, types.MethodType, str, bytes, int, float)
