"""Release 0.1's import paths keep working for one release, each with a DeprecationWarning
naming the new path; old pickles (a checkpoint's objects) load."""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import avalanche_rebasin
from avalanche_rebasin import discover_spec
from avalanche_rebasin._moved import MOVED_MODULES, MOVED_NAMES
from avalanche_rebasin.core.spec import PermutationSpec

README_OLD_PATHS = {
    "avalanche_rebasin.datasets": "prepare_embedded_mnist",
    "avalanche_rebasin.interpolation_plugin": "InterpolationStrategy",
    "avalanche_rebasin.strategy": "RebasinStrategy",
    "avalanche_rebasin.sinkhorn": "sinkhorn",
    "avalanche_rebasin.matching": "activation_matching",
}


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_every_old_module_path_warns_and_gives_the_new_module(old):
    with pytest.warns(DeprecationWarning, match=f"avalanche_rebasin.{old} has moved to {MOVED_MODULES[old]}"):
        sys.modules.pop(f"avalanche_rebasin.{old}", None)
        module = importlib.import_module(f"avalanche_rebasin.{old}")
    assert module is importlib.import_module(MOVED_MODULES[old])


def test_the_readme_old_imports_work_in_a_fresh_interpreter():
    code = "import warnings; warnings.simplefilter('always')\n" + "".join(
        f"from {old} import {name}; print({name}.__module__)\n" for old, name in README_OLD_PATHS.items()
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    homes = done.stdout.split()
    for (old, _), home in zip(README_OLD_PATHS.items(), homes, strict=True):
        assert home == MOVED_MODULES[old.rpartition(".")[2]]
        assert f"{old} has moved to {home}" in done.stderr


@pytest.mark.parametrize("name", sorted(MOVED_NAMES))
def test_internal_names_left_the_face_but_resolve_with_a_warning(name):
    assert name not in avalanche_rebasin.__all__
    with pytest.warns(DeprecationWarning, match=f"import it from {MOVED_NAMES[name]}"):
        value = getattr(avalanche_rebasin, name)
    assert value is getattr(importlib.import_module(MOVED_NAMES[name]), name)


def test_from_model_is_discover_spec_with_a_warning():
    model, x = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 3)
    with pytest.warns(DeprecationWarning, match="discover_spec"):
        spec = PermutationSpec.from_model(model, x)
    assert spec == discover_spec(model, x)


def test_an_object_pickled_under_an_old_path_loads():
    from avalanche_rebasin.continual.config import RebasinConfig

    data = pickle.dumps(RebasinConfig()).replace(
        b"avalanche_rebasin.continual.config", b"avalanche_rebasin.continual_config"
    )
    assert b"avalanche_rebasin.continual_config" in data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert pickle.loads(data) == RebasinConfig()


def test_release_0_1_align_keywords_warn_and_solve_the_same():
    from avalanche_rebasin import Sinkhorn, Stopping, align

    torch.manual_seed(0)
    a, b = (
        nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)),
        nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)),
    )
    x = torch.randn(2, 3)
    with pytest.warns(DeprecationWarning, match=r"align\(steps=, tau=, patience=\) is deprecated"):
        old = align(a, b, example_input=x, steps=5, tau=0.5, patience=None, progress=False, init="random")
    new = align(
        a, b, example_input=x, solver=Sinkhorn(tau=0.5), stopping=Stopping(max_steps=5, patience=None),
        progress=False, init="random",
    )  # fmt: skip
    assert old.history == new.history and len(new.history) == 5
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
        align(a, b, example_input=x, stepz=5)
    with pytest.raises(TypeError, match="solver must be a Sinkhorn"):
        align(a, b, example_input=x, solver=0.5)


def test_renamed_convergence_flags_warn():
    from avalanche_rebasin import Sinkhorn

    out = Sinkhorn().solve(torch.randn(4, 4))
    with pytest.warns(DeprecationWarning, match="read balanced"):
        assert out.converged == out.balanced


def test_old_paths_never_shadow_the_package_functions():
    for old in MOVED_MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            importlib.import_module(f"avalanche_rebasin.{old}")
    assert callable(avalanche_rebasin.align) and callable(avalanche_rebasin.permute)
    assert not any(
        hasattr(avalanche_rebasin, name) and not callable(getattr(avalanche_rebasin, name))
        for name in ("align", "permute", "interpolate", "lmc_curve")
    )


def test_an_interpolation_plugin_pickled_by_release_0_1_loads_with_its_settings():
    from avalanche_rebasin import InterpolationConfig, WeightInterpolationPlugin

    plugin = WeightInterpolationPlugin(alpha=0.3, alignment="none", align_data="experience")
    old_state = {k: v for k, v in vars(plugin).items() if k != "config"}
    old_state.update(alpha=0.3, alignment="none", align_data="experience", align_steps=7, restart=0.0)
    loaded = WeightInterpolationPlugin.__new__(WeightInterpolationPlugin)
    loaded.__setstate__(old_state)
    assert loaded.config == InterpolationConfig(
        alpha=0.3, alignment="none", align_data="experience", align_steps=7
    )
    assert not hasattr(loaded, "alignment")
