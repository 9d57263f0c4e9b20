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

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="device of the device-agnostic tests (tests/test_devices.py), e.g. cuda",
    )


@pytest.fixture
def device(request) -> torch.device:
    chosen = torch.device(request.config.getoption("--device"))
    if chosen.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device cuda was asked for, and torch sees no CUDA device")
    return chosen
