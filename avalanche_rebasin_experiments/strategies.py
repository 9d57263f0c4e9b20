"""The strategy registry: a token ``NAME[:PRESET][+key=value...]`` → an Avalanche strategy.

Adding a strategy is one :class:`StrategyEntry` in :data:`STRATEGIES`: a builder and the
settings a token may override (``replay+mem_size=2000``, ``ewc-tuned+ewc_lambda=100``,
``rebasin:midpoint+alpha=0.5``). Every strategy gets the harness's model, optimiser, batch
size, epochs and evaluator, so budgets are equal unless a token says otherwise.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from avalanche.models import SimpleMLP, SlimResNet18
from avalanche.training import AGEM, EWC, JointTraining, LwF, Naive
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.storage_policy import ExperienceBalancedBuffer
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from avalanche_rebasin.avalanche.interpolation_plugin import InterpolationStrategy
from avalanche_rebasin.avalanche.strategy import RebasinStrategy
from avalanche_rebasin.continual.config import PRESETS, RebasinConfig

from .benchmarks import BENCHMARKS

__all__ = ["MODELS", "OPTIMIZERS", "STRATEGIES", "Context", "StrategyEntry", "build", "parse_strategy"]

PER_CLASS_PER_EXP = 5  # the replay budget of the authors' protocol: 5 images per class per experience
REBASIN_FAMILY = ("rebasin", "rebasin-noreplay", "rebasin-nopermute")
RESERVED_OVERRIDES = ("model", "optimizer", "plugins", "permute", "seed")  # set by the name or the harness
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}


def digits_cnn(num_classes: int = 10) -> nn.Sequential:
    """Two 3×3 conv–BN–ReLU–pool blocks (16, 32 channels) and a linear head, for 28×28 images."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, 16), *block(16, 32), nn.Flatten(), nn.Linear(32 * 7 * 7, num_classes))


def _mlp(layers: int) -> Callable[[int], nn.Module]:
    return lambda n: SimpleMLP(
        num_classes=n, input_size=28 * 28, hidden_size=256, hidden_layers=layers, drop_rate=0
    )


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "mlp1": _mlp(1),
    "mlp2": _mlp(2),
    "mlp3": _mlp(3),
    "cnn": digits_cnn,
    "slimresnet18": lambda n: SlimResNet18(nclasses=n),  # 32×32×3 inputs (Split CIFAR-100)
}


@dataclass
class Context:
    """What every builder receives: a fresh model and optimiser and the shared template arguments."""

    args: argparse.Namespace
    model: nn.Module
    optimizer: torch.optim.Optimizer
    common: dict[str, Any]
    seed: int

    def replay(self, mem_size: int | None = None) -> ReplayPlugin:
        """Avalanche's replay, one equal share per experience; by default the authors' budget."""
        entry, n = BENCHMARKS[self.args.benchmark], self.args.experiences
        if mem_size is None:
            mem_size = self.args.mem_size
        if mem_size is None:
            mem_size = (
                PER_CLASS_PER_EXP * (entry.classes // n if entry.class_incremental else entry.classes) * n
            )
        policy = ExperienceBalancedBuffer(max_size=mem_size, adaptive_size=False, num_experiences=n)
        return ReplayPlugin(mem_size=mem_size, storage_policy=policy)


@dataclass(frozen=True)
class StrategyEntry:
    """``build(context, overrides)`` → strategy; ``settings`` are the keys a token may override."""

    build: Callable[[Context, dict[str, Any]], SupervisedTemplate]
    settings: tuple[str, ...] = ()
    presets: bool = False  # NAME:PRESET picks one of avalanche_rebasin's PRESETS
    defaults: dict[str, Any] = field(default_factory=dict)
    validates: bool = False  # the strategy checks its own settings (else: numbers, checked here)


def _ewc_published(ctx: Context, kw: dict[str, Any]) -> SupervisedTemplate:
    """EWC as published in the paper's comparison: lambda 100, SGD lr 0.01, batch 10 (fixed)."""
    common = {**ctx.common, "train_mb_size": 10}
    sgd = torch.optim.SGD(ctx.model.parameters(), lr=0.01)
    return EWC(model=ctx.model, optimizer=sgd, ewc_lambda=kw["ewc_lambda"], mode="separate", **common)


def _rebasin(name: str) -> Callable[[Context, dict[str, Any]], SupervisedTemplate]:
    def build(ctx: Context, kw: dict[str, Any]) -> SupervisedTemplate:
        kw = {"rebasin_epochs": ctx.args.epochs, "diagnostic_samples": 1000, **kw}
        plugins = [] if name == "rebasin-noreplay" else [ctx.replay()]
        return RebasinStrategy(
            model=ctx.model, optimizer=ctx.optimizer, plugins=plugins, permute=name != "rebasin-nopermute",
            seed=ctx.seed, **kw, **ctx.common,
        )  # fmt: skip

    return build


INTERPOLATION_SETTINGS = ("alpha", "alignment", "align_data", "align_samples", "align_steps", "bn_reestimate")
INTERPOLATION_SETTINGS += ("restart", "head_alpha", "mem_size")


def _interpolation(ctx: Context, kw: dict[str, Any]) -> SupervisedTemplate:
    """Replay, then align the trained network to the previous weights and interpolate;
    ``head_alpha`` is the output layer's own α (the model's last ``nn.Linear``)."""
    replay = ctx.replay(kw.pop("mem_size", None))
    if "head_alpha" in kw:
        head = [name for name, m in ctx.model.named_modules() if isinstance(m, nn.Linear)][-1]
        kw["layer_alpha"] = {head: kw.pop("head_alpha")}
    return InterpolationStrategy(
        model=ctx.model, optimizer=ctx.optimizer, plugins=[replay], seed=ctx.seed, **kw, **ctx.common
    )


def _rebasin_settings() -> tuple[str, ...]:
    return tuple(sorted(set(RebasinConfig.setting_names()) - {"sinkhorn"} - set(RESERVED_OVERRIDES)))


STRATEGIES: dict[str, StrategyEntry] = {
    "naive": StrategyEntry(lambda c, kw: Naive(model=c.model, optimizer=c.optimizer, **c.common)),
    "replay": StrategyEntry(
        lambda c, kw: Naive(
            model=c.model, optimizer=c.optimizer, plugins=[c.replay(kw.get("mem_size"))], **c.common
        ),
        ("mem_size",),
    ),
    "ewc": StrategyEntry(_ewc_published, ("ewc_lambda",), defaults={"ewc_lambda": 100.0}),
    "ewc-tuned": StrategyEntry(
        lambda c, kw: EWC(
            model=c.model, optimizer=c.optimizer, ewc_lambda=kw.get("ewc_lambda", c.args.ewc_tuned_lambda),
            mode="separate", **c.common,
        ),
        ("ewc_lambda",),
    ),
    "lwf": StrategyEntry(
        lambda c, kw: LwF(model=c.model, optimizer=c.optimizer, **kw, **c.common),
        ("alpha", "temperature"), defaults={"alpha": 1.0, "temperature": 2.0},
    ),
    "agem": StrategyEntry(
        lambda c, kw: AGEM(model=c.model, optimizer=c.optimizer, **kw, **c.common),
        ("patterns_per_exp", "sample_size"), defaults={"patterns_per_exp": None, "sample_size": 256},
    ),
    "joint": StrategyEntry(lambda c, kw: JointTraining(model=c.model, optimizer=c.optimizer, **c.common)),
    **{
        name: StrategyEntry(_rebasin(name), _rebasin_settings(), presets=True, validates=True)
        for name in REBASIN_FAMILY
    },
    "interp": StrategyEntry(_interpolation, INTERPOLATION_SETTINGS, validates=True),
}  # fmt: skip


def parse_strategy(token: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:PRESET][+key=value...]`` → (name, keyword arguments for its builder)."""
    head, *overrides = token.split("+")
    name, _, preset = head.partition(":")
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r} in {token!r}; choose from {list(STRATEGIES)}")
    entry = STRATEGIES[name]
    if preset and not entry.presets:
        raise ValueError(f"{token!r}: presets apply only to {REBASIN_FAMILY}")
    if overrides and not entry.settings:
        raise ValueError(f"{token!r}: {name} has no settings to override")
    kwargs = dict(entry.defaults)
    if entry.presets:
        preset = preset or "paper"
        if preset not in PRESETS:
            raise ValueError(f"{token!r}: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        # Every strategy gets the harness's --epochs (equal budgets), unless a token overrides it.
        kwargs.update({k: v for k, v in PRESETS[preset].items() if k != "rebasin_epochs"})
    seen: set[str] = set()
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(
                f"{token!r}: override {item!r} is not key=value ('+' separates settings, so numbers are "
                "written without one: 1e0, not 1e+0)"
            )
        if key in RESERVED_OVERRIDES and entry.presets:
            raise ValueError(
                f"{token!r}: {key!r} is set by the harness "
                "(use rebasin-nopermute / rebasin-noreplay / --seeds)"
            )
        if key not in entry.settings:
            raise ValueError(
                f"{token!r}: unknown setting {key!r}; {name} overrides one of {list(entry.settings)}"
            )
        if key in seen:
            raise ValueError(f"{token!r}: {key!r} is set twice; keep one {key}=value")
        seen.add(key)
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a bare string such as adam
        if not entry.validates or key == "mem_size":
            _check_number(token, key, kwargs[key])
    return name, kwargs


def _check_number(token: str, key: str, value: Any) -> None:
    """Baseline settings are numbers: counts are integers >= 1, the rest finite and >= 0."""
    counts = ("mem_size", "patterns_per_exp", "sample_size")
    if key in counts:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{token!r}: {key} must be an integer >= 1, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise ValueError(f"{token!r}: {key} must be a finite number >= 0, got {value!r}")


def build(token: str, args: argparse.Namespace, seed: int, evaluator: EvaluationPlugin) -> SupervisedTemplate:
    """A fresh model, optimiser and strategy for ``token``, every random generator seeded first."""
    name, kwargs = parse_strategy(token)
    RNGManager.set_random_seeds(seed)  # torch, NumPy and Python's random (A-GEM samples its memory with it)
    entry = BENCHMARKS[args.benchmark]
    model = MODELS[args.model](entry.classes)
    optimizer = OPTIMIZERS[args.optimizer](model.parameters(), lr=args.lr)
    common = dict(
        criterion=nn.CrossEntropyLoss(), train_mb_size=args.batch_size, train_epochs=args.epochs,
        eval_mb_size=1000, evaluator=evaluator, device=args.device,
    )  # fmt: skip
    if name == "agem" and kwargs.get("patterns_per_exp") is None:
        kwargs["patterns_per_exp"] = (
            args.mem_size // args.experiences if args.mem_size else PER_CLASS_PER_EXP * entry.classes
        )
    return STRATEGIES[name].build(Context(args, model, optimizer, common, seed), kwargs)
