"""Strategies that take their method's settings as keywords, declared for Avalanche."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

__all__ = ["declare_setting_keywords"]


def declare_setting_keywords(cls: type, defaults: Mapping[str, Any]) -> None:
    """Show ``defaults``' names as keyword-only arguments of ``cls.__init__``, before its
    ``**base_kwargs``: Avalanche rejects keywords that no ``__init__`` signature declares,
    and the strategy hands these to its method's config."""
    init = vars(cls)["__init__"]
    signature = inspect.signature(init)
    params = list(signature.parameters.values())
    declared = {p.name for p in params}
    settings = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value)
        for name, value in defaults.items()
        if name not in declared
    ]
    init.__signature__ = signature.replace(parameters=[*params[:-1], *settings, params[-1]])
