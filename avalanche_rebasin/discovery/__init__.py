"""Which tensors share a permutation, found by tracing one forward pass.

:func:`discover_spec` is the entry point; :func:`register_rule` and the trace types
(:class:`Tracer`, :class:`OpCall`, :class:`Feature`) are for writing a rule of your own.
"""

from .driver import discover_spec
from .trace import FIXED, Feature, OpCall, Tracer, UnsupportedOperationError, UnsupportedPolicy, register_rule

__all__ = [
    "FIXED",
    "Feature",
    "OpCall",
    "Tracer",
    "UnsupportedOperationError",
    "UnsupportedPolicy",
    "discover_spec",
    "register_rule",
]
