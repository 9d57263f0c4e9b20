"""The strategy registry: a token ``NAME[:PRESET][+key=value...]`` → an Avalanche strategy.

Adding a strategy is one :class:`StrategyEntry` in :data:`STRATEGIES`: a builder and the
settings a token may override (``replay+mem_size=2000``, ``ewc-tuned+ewc_lambda=100``,
``rebasin:midpoint+alpha=0.5``). Every strategy gets the harness's model, optimiser, batch
size, epochs and evaluator, and every memory-based one the same memory size
(:meth:`Context.mem_size`), so budgets are equal unless a token says otherwise.
"""

from __future__ import annotations

import argparse
import ast
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from avalanche.models import SimpleMLP, SlimResNet18
from avalanche.training import (
    AGEM,
    DER,
    ER_ACE,
    ER_AML,
    EWC,
    GEM,
    MAS,
    GDumb,
    ICaRL,
    JointTraining,
    LwF,
    Naive,
    SynapticIntelligence,
)
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.storage_policy import ExperienceBalancedBuffer
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from avalanche_rebasin.avalanche.interpolation_plugin import InterpolationStrategy, WeightInterpolationPlugin
from avalanche_rebasin.avalanche.plugin import RebasinPlugin
from avalanche_rebasin.avalanche.strategy import RebasinStrategy
from avalanche_rebasin.continual.config import PRESETS, RebasinConfig

from .benchmarks import BENCHMARKS, Problem

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

    def mem_size(self, override: int | None = None) -> int:
        """The memory of every memory-based strategy: the token's ``mem_size``, else
        ``--mem-size``, else the authors' budget (5 images per class per experience)."""
        if override is not None:
            return override
        if self.args.mem_size is not None:
            return int(self.args.mem_size)
        entry, n = BENCHMARKS[self.args.benchmark], self.args.experiences
        return PER_CLASS_PER_EXP * (entry.classes // n if entry.class_incremental else entry.classes) * n

    def replay(self, mem_size: int | None = None) -> ReplayPlugin:
        """Avalanche's replay of :meth:`mem_size` images, one equal share per experience."""
        size, n = self.mem_size(mem_size), self.args.experiences
        policy = ExperienceBalancedBuffer(max_size=size, adaptive_size=False, num_experiences=n)
        return ReplayPlugin(mem_size=size, storage_policy=policy)


@dataclass(frozen=True)
class StrategyEntry:
    """``build(context, overrides)`` → strategy; ``settings`` are the keys a token may override."""

    build: Callable[[Context, dict[str, Any]], SupervisedTemplate]
    settings: tuple[str, ...] = ()
    presets: bool = False  # NAME:PRESET picks one of avalanche_rebasin's PRESETS
    defaults: dict[str, Any] = field(default_factory=dict)
    validates: bool = False  # the strategy checks its own settings (else: numbers, checked here)
    problem: Callable[[argparse.Namespace], Problem] = lambda args: None  # checked before anything is built
    swept_by_default: bool = True  # in the harness's default --strategies


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
INTERPOLATION_SETTINGS += ("holdout_samples", "restart", "head_alpha", "mem_size")
HELD_OUT_SHARE = 10  # alpha "auto": a tenth of the memory budget holds the held-out samples


def _split_memory(ctx: Context, kw: dict[str, Any], mem_size: int) -> tuple[dict[str, Any], int]:
    """The settings and the replay memory, so that replay and held-out samples together fill
    ``mem_size``: with ``alpha`` "auto" (the default) every experience keeps
    ``holdout_samples`` (default: a tenth of its share, at least one) and replay the rest."""
    if kw.get("alpha", "auto") != "auto":
        return kw, mem_size
    n = ctx.args.experiences
    held = kw.setdefault("holdout_samples", max(1, mem_size // (HELD_OUT_SHARE * n)))
    replay = mem_size - held * n
    if replay < n:
        raise ValueError(
            f"alpha 'auto' keeps holdout_samples={held} per experience out of a memory of {mem_size}, "
            f"leaving {replay} for replay (fewer than one per experience); raise mem_size or lower "
            "holdout_samples"
        )
    return kw, replay


def _with_head_alpha(model: nn.Module, kw: dict[str, Any]) -> dict[str, Any]:
    """``head_alpha`` as the output layer's own α (the model's last ``nn.Linear``)."""
    if "head_alpha" in kw:
        head = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        kw["layer_alpha"] = {head: kw.pop("head_alpha")}
    return kw


def _interpolation(ctx: Context, kw: dict[str, Any]) -> SupervisedTemplate:
    """Replay, then align the trained network to the previous weights and interpolate;
    ``head_alpha`` is the output layer's own α (the model's last ``nn.Linear``)."""
    kw, replay_size = _split_memory(ctx, dict(kw), ctx.mem_size(kw.pop("mem_size", None)))
    replay = ctx.replay(replay_size)
    kw = _with_head_alpha(ctx.model, kw)
    return InterpolationStrategy(
        model=ctx.model, optimizer=ctx.optimizer, plugins=[replay], seed=ctx.seed, **kw, **ctx.common
    )


FEATURE_MODELS = ("mlp1", "mlp2", "mlp3", "cnn")  # a feature extractor, then one linear classifier


def _needs_features(args: argparse.Namespace) -> Problem:
    if args.model in FEATURE_MODELS:
        return None
    return (
        f"needs the model split into a feature extractor and a classifier: --model one of "
        f"{list(FEATURE_MODELS)}, not {args.model}"
    )


def _icarl_problem(args: argparse.Namespace) -> Problem:
    if not BENCHMARKS[args.benchmark].class_incremental:
        usable = [name for name, entry in BENCHMARKS.items() if entry.class_incremental]
        return (
            f"iCaRL learns the classes each experience adds: it needs a class-incremental benchmark "
            f"(one of {usable}), and {args.benchmark} brings the same classes in every experience"
        )
    return _needs_features(args)


def _features_and_classifier(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """One of :data:`FEATURE_MODELS` as (feature extractor, classifier), sharing its parameters."""
    if isinstance(model, SimpleMLP):
        return nn.Sequential(nn.Flatten(), model.features), model.classifier
    assert isinstance(model, nn.Sequential), type(model)  # digits_cnn
    return model[:-1], model[-1]


def _class_balanced(
    strategy: type[DER | ER_ACE | ER_AML],
) -> Callable[[Context, dict[str, Any]], SupervisedTemplate]:
    """DER, ER-ACE or ER-AML on Avalanche's class-balanced memory of :meth:`Context.mem_size` images.

    Unless the token sets ``batch_size_mem``, Avalanche's default (the training batch for DER, 10 for
    ER-ACE and ER-AML) is capped at the memory, so a small memory replays all of itself per step; an
    explicit ``batch_size_mem`` larger than the memory is refused (Avalanche would never replay)."""
    avalanche_default = inspect.signature(strategy).parameters["batch_size_mem"].default

    def build(ctx: Context, kw: dict[str, Any]) -> SupervisedTemplate:
        kw["mem_size"] = ctx.mem_size(kw.get("mem_size"))
        if "batch_size_mem" not in kw:
            default = ctx.args.batch_size if avalanche_default is None else avalanche_default
            kw["batch_size_mem"] = min(default, kw["mem_size"])
        if strategy is ER_AML:
            kw["feature_extractor"] = _features_and_classifier(ctx.model)[0]
        built = strategy(model=ctx.model, optimizer=ctx.optimizer, **kw, **ctx.common)
        if built.batch_size_mem > built.mem_size:
            raise ValueError(
                f"mem_size {built.mem_size} never fills one replay batch of batch_size_mem "
                f"{built.batch_size_mem}, so it would never replay; set +batch_size_mem={built.mem_size} "
                "or less, or a larger mem_size"
            )
        classes = BENCHMARKS[ctx.args.benchmark].classes
        if strategy is ER_AML and built.mem_size // classes < built.train_mb_size:
            raise ValueError(
                f"ER-AML draws a batch of --batch-size {built.train_mb_size} from every class's share of "
                f"the memory and waits forever on a share that cannot fill one: mem_size "
                f"{built.mem_size} over {classes} classes; give +mem_size={built.train_mb_size * classes} "
                "or more, or a smaller --batch-size"
            )
        return built

    return build


MEMORY_TEMPLATES: dict[str, tuple[type[DER | ER_ACE], tuple[str, ...]]] = {
    "der": (DER, ("mem_size", "batch_size_mem", "der_alpha", "der_beta")),
    "er-ace": (ER_ACE, ("mem_size", "batch_size_mem")),
}  # the templates our methods compose with, and the settings of each (DER's α, β renamed)


def _composed(method: str, template: str) -> Callable[[Context, dict[str, Any]], SupervisedTemplate]:
    """``method`` (``interp`` or ``rebasin``) as a plugin on DER++ or ER-ACE: the template trains
    with its own memory, which the plugin reads as its buffer."""
    strategy, own_settings = MEMORY_TEMPLATES[template]

    def build(ctx: Context, kw: dict[str, Any]) -> SupervisedTemplate:
        own = {key.removeprefix("der_"): kw.pop(key) for key in own_settings if key in kw}
        if method == "interp":
            kw, own["mem_size"] = _split_memory(ctx, kw, ctx.mem_size(own.pop("mem_size", None)))
            plugin: Any = WeightInterpolationPlugin(seed=ctx.seed, **_with_head_alpha(ctx.model, kw))
        else:
            kw = {"rebasin_epochs": ctx.args.epochs, "diagnostic_samples": 1000, **kw}
            plugin = RebasinPlugin(seed=ctx.seed, **kw)
        return _class_balanced(strategy)(ctx, {**own, "plugins": [plugin]})

    return build


def _composed_entries() -> dict[str, StrategyEntry]:
    entries = {}
    for template, (_, own_settings) in MEMORY_TEMPLATES.items():
        entries[f"interp-{template}"] = StrategyEntry(
            _composed("interp", template),
            tuple(dict.fromkeys((*INTERPOLATION_SETTINGS, *own_settings))), validates=True,
            swept_by_default=False,
        )  # fmt: skip
        entries[f"rebasin-{template}"] = StrategyEntry(
            _composed("rebasin", template), (*_rebasin_settings(), *own_settings), presets=True,
            validates=True, swept_by_default=False,
        )  # fmt: skip
    return entries


def _gem(ctx: Context, kw: dict[str, Any]) -> SupervisedTemplate:
    """GEM with :meth:`Context.mem_size` patterns split evenly over the experiences, unless
    ``patterns_per_exp`` sets the share itself."""
    mem_size, n = kw.pop("mem_size", None), ctx.args.experiences
    if mem_size is not None and "patterns_per_exp" in kw:
        raise ValueError("set mem_size (split over the experiences) or patterns_per_exp, not both")
    if "patterns_per_exp" not in kw:
        budget = ctx.mem_size(mem_size)
        if budget < n:
            raise ValueError(f"mem_size {budget} leaves no pattern for each of {n} experiences")
        kw["patterns_per_exp"] = budget // n
    return GEM(model=ctx.model, optimizer=ctx.optimizer, **kw, **ctx.common)


def _icarl(ctx: Context, kw: dict[str, Any]) -> SupervisedTemplate:
    """iCaRL on the model's features and classifier, its exemplar memory of :meth:`Context.mem_size`
    images shared by the classes seen (``fixed_memory``); iCaRL brings its own loss."""
    features, classifier = _features_and_classifier(ctx.model)
    common = {key: value for key, value in ctx.common.items() if key != "criterion"}
    return ICaRL(
        feature_extractor=features, classifier=classifier, optimizer=ctx.optimizer,
        memory_size=ctx.mem_size(kw.get("mem_size")), buffer_transform=None, fixed_memory=True, **common,
    )  # fmt: skip


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
    # Avalanche's strong baselines, asked for by name (not in the default sweep).
    "der": StrategyEntry(
        _class_balanced(DER), ("mem_size", "batch_size_mem", "alpha", "beta"), swept_by_default=False
    ),
    "er-ace": StrategyEntry(_class_balanced(ER_ACE), ("mem_size", "batch_size_mem"), swept_by_default=False),
    "er-aml": StrategyEntry(
        _class_balanced(ER_AML), ("mem_size", "batch_size_mem", "temp", "base_temp"),
        problem=_needs_features, swept_by_default=False,
    ),
    "gdumb": StrategyEntry(
        lambda c, kw: GDumb(
            model=c.model, optimizer=c.optimizer, mem_size=c.mem_size(kw.get("mem_size")), **c.common
        ),
        ("mem_size",), swept_by_default=False,
    ),
    "gem": StrategyEntry(
        _gem, ("mem_size", "patterns_per_exp", "memory_strength"), swept_by_default=False
    ),
    # Our methods on top of DER++ and ER-ACE (their memory is the buffer the plugin reads).
    **_composed_entries(),
    "icarl": StrategyEntry(_icarl, ("mem_size",), problem=_icarl_problem, swept_by_default=False),
    "si": StrategyEntry(
        lambda c, kw: SynapticIntelligence(model=c.model, optimizer=c.optimizer, **kw, **c.common),
        ("si_lambda",), defaults={"si_lambda": 1.0}, swept_by_default=False,
    ),  # Avalanche has no default lambda; 1 as its own Split MNIST baseline
    "mas": StrategyEntry(
        lambda c, kw: MAS(model=c.model, optimizer=c.optimizer, **kw, **c.common),
        ("lambda_reg", "alpha"), swept_by_default=False,
    ),
}  # fmt: skip


def parse_strategy(token: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:PRESET][+key=value...]`` → (name, keyword arguments for its builder)."""
    head, *overrides = token.split("+")
    name, _, preset = head.partition(":")
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r} in {token!r}; choose from {list(STRATEGIES)}")
    entry = STRATEGIES[name]
    if preset and not entry.presets:
        with_presets = [key for key, candidate in STRATEGIES.items() if candidate.presets]
        raise ValueError(f"{token!r}: presets apply only to {with_presets}")
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
        if not entry.validates or key in ("mem_size", "batch_size_mem", "der_alpha", "der_beta"):
            _check_number(token, key, kwargs[key])
    return name, kwargs


def _check_number(token: str, key: str, value: Any) -> None:
    """Baseline settings are numbers: counts are integers >= 1, temperatures finite and > 0, the
    rest finite and >= 0."""
    counts = ("mem_size", "patterns_per_exp", "sample_size", "batch_size_mem")
    number = not isinstance(value, bool) and isinstance(value, int | float)
    if key in counts:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{token!r}: {key} must be an integer >= 1, got {value!r}")
    elif key in ("temp", "base_temp"):
        if not number or not 0 < value < float("inf"):
            raise ValueError(f"{token!r}: {key} must be a finite number > 0, got {value!r}")
    elif not number or not 0 <= value < float("inf"):
        raise ValueError(f"{token!r}: {key} must be a finite number >= 0, got {value!r}")


def build(token: str, args: argparse.Namespace, seed: int, evaluator: EvaluationPlugin) -> SupervisedTemplate:
    """A fresh model, optimiser and strategy for ``token``, every random generator seeded first;
    a strategy these arguments cannot run is refused before anything is built."""
    name, kwargs = parse_strategy(token)
    problem = STRATEGIES[name].problem(args)
    if problem:
        raise ValueError(problem)
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
