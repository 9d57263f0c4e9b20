"""Test-session setup: Avalanche's deprecation notices are filtered by the ini settings.

Avalanche 0.6's ``@deprecated`` wrapper runs ``warnings.simplefilter("once",
DeprecationWarning)`` before every warning, which puts its filter ahead of pytest's and of
``setup.cfg``'s; its module gets a ``warnings`` whose ``simplefilter`` does nothing, so the
``ignore::DeprecationWarning:avalanche`` line applies (third-party notices about Avalanche's
own internals, e.g. the replay plugin's ``update``; not ours to fix).
"""

import warnings
from types import SimpleNamespace

import avalanche._annotations as avalanche_annotations

avalanche_annotations.warnings = SimpleNamespace(
    warn=warnings.warn, simplefilter=lambda *args, **kwargs: None
)
