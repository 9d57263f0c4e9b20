"""Small helpers shared by the benchmark scripts: models, timing, output."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torchvision
from torch import nn


def mlp(hidden_layers: int, width: int, in_features: int, out_features: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, width), nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, out_features))


def vgg11_bn_small(num_classes: int = 10) -> nn.Module:
    """torchvision's vgg11_bn with its 4096-wide head replaced by 2048→64→classes.

    The 102M-parameter first classifier layer would make one soft-permutation step
    cost about a teraflop on a CPU; the convolutional trunk is unchanged.
    """
    model = torchvision.models.vgg11_bn(num_classes=num_classes)
    model.avgpool = nn.AdaptiveAvgPool2d(2)
    model.classifier = nn.Sequential(nn.Linear(512 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))
    return model


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
