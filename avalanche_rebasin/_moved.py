"""The module paths of release 0.1, kept importable for one release with a ``DeprecationWarning``.

``import avalanche_rebasin.align`` (say) loads :mod:`avalanche_rebasin.alignment.align`
and registers it under the old name too, so objects pickled under an old path (a
checkpoint's strategy, its reports) still load.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence

__all__ = ["MOVED_MODULES", "MOVED_NAMES", "install", "moved_name"]

#: old module (under ``avalanche_rebasin.``) → where it lives now. Not ``align`` and
#: ``permute``: importing a module of that name would overwrite the package's functions
#: ``avalanche_rebasin.align`` and ``avalanche_rebasin.permute``.
MOVED_MODULES = {
    "blocks": "avalanche_rebasin.core.blocks",
    "checkpointing": "avalanche_rebasin.avalanche.checkpointing",
    "continual_config": "avalanche_rebasin.continual.config",
    "costs": "avalanche_rebasin.core.costs",
    "datasets": "avalanche_rebasin_experiments.datasets",
    "grouped_optimizer": "avalanche_rebasin.continual.grouped_optimizer",
    "interpolation": "avalanche_rebasin.continual.interpolation",
    "interpolation_plugin": "avalanche_rebasin.avalanche.interpolation_plugin",
    "lmc": "avalanche_rebasin.alignment.lmc",
    "matching": "avalanche_rebasin.alignment.matching",
    "model_inputs": "avalanche_rebasin.core.model_inputs",
    "plugin": "avalanche_rebasin.avalanche.plugin",
    "plugin_compat": "avalanche_rebasin.avalanche.compatibility",
    "plugin_inputs": "avalanche_rebasin.avalanche.inputs",
    "reachable": "avalanche_rebasin.discovery.reachable",
    "restart": "avalanche_rebasin.continual.restart",
    "sinkhorn": "avalanche_rebasin.core.sinkhorn",
    "spec": "avalanche_rebasin.core.spec",
    "strategy": "avalanche_rebasin.avalanche.strategy",
    "transaction": "avalanche_rebasin.avalanche.transaction",
}

#: names that left ``avalanche_rebasin.__all__`` (internals) → the module that holds them
MOVED_NAMES = {
    "GroupedOptimizer": "avalanche_rebasin.continual.grouped_optimizer",
    "PermutationLogits": "avalanche_rebasin.core.logits",
    "continual_cost": "avalanche_rebasin.core.costs",
    "functional_loss": "avalanche_rebasin.core.state",
    "interpolate_state": "avalanche_rebasin.core.state",
    "marginal_error": "avalanche_rebasin.core.sinkhorn",
    "model_state": "avalanche_rebasin.core.state",
    "permutation_matrix": "avalanche_rebasin.core.sinkhorn",
    "soft_permute_state": "avalanche_rebasin.core.permute",
}

_PACKAGE = "avalanche_rebasin"


def moved_name(name: str) -> object:
    """``avalanche_rebasin.<name>`` for a name that left the public face, with a warning."""
    home = MOVED_NAMES[name]
    warnings.warn(
        f"avalanche_rebasin.{name} is internal and leaves the top level in the next release; "
        f"import it from {home}.",
        DeprecationWarning,
        stacklevel=3,  # the user's line: moved_name ← the package's __getattr__ ← the caller
    )
    return getattr(importlib.import_module(home), name)


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        warnings.warn(
            f"{module.__name__} has moved to {self.new_name}; the old path goes in the next release.",
            DeprecationWarning,
            stacklevel=2,  # the import statement (warnings skips the import machinery's frames)
        )
        sys.modules[module.__name__] = importlib.import_module(self.new_name)


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, old = fullname.rpartition(".")
        if package != _PACKAGE or old not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(MOVED_MODULES[old]))


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
