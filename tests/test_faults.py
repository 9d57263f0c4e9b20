"""Faults lose nothing: an error or Ctrl-C inside an experience rolls the method back, bad
weights and arguments are refused before any work and named, checkpoints are written atomically."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.scenarios.online import split_online_stream
from avalanche.checkpointing import maybe_load_checkpoint
from avalanche.models import IncrementalClassifier, SimpleMLP
from avalanche.training.plugins import ReplayPlugin, SupervisedPlugin
from test_strategy import _benchmark, _evaluator, _strategy
from torch import nn

from avalanche_rebasin import (
    Sinkhorn,
    Stopping,
    align,
    atomic_save_checkpoint,
    discover_spec,
    random_permutation,
    weight_matching,
)
from avalanche_rebasin.avalanche.interpolation_plugin import InterpolationStrategy
from avalanche_rebasin.avalanche.strategy import RebasinStrategy
from avalanche_rebasin.core.permute import permute


class Raise(SupervisedPlugin):
    """Raises ``error`` once, at training iteration ``iteration`` of experience ``experience``
    (or in ``after_training_exp`` with ``iteration=None``)."""

    def __init__(self, error: BaseException, experience: int = 1, iteration: int | None = 3) -> None:
        super().__init__()
        self.error, self.experience, self.iteration = error, experience, iteration
        self.seen, self.armed = 0, True

    def _due(self, strategy) -> bool:
        return self.armed and strategy.experience.current_experience == self.experience

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if self.iteration is not None and self._due(strategy):
            self.seen += 1
            if self.seen == self.iteration:
                self.armed = False
                raise self.error

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self.iteration is None and self._due(strategy):
            self.armed = False
            raise self.error


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-identical states (a NaN equals a NaN in the same place)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and bool(((a[k] == b[k]) | (a[k].isnan() & b[k].isnan())).all()) for k in a
    )


def _train_with_retry(make, bench, failing: Raise | None, tmp_path, build=None):
    """Train every experience; when ``failing`` raises, check the rollback and train it again
    from the same global RNG state. Returns the final state and the strategy."""
    torch.manual_seed(0)
    model = build() if build else SimpleMLP(num_classes=6, input_size=16, hidden_size=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    strategy = make(model, optimizer, [failing] if failing else [])
    for exp in bench.train_stream:
        start, rng = _state(model), torch.get_rng_state()
        try:
            strategy.train(exp)
        except (RuntimeError, KeyboardInterrupt):
            assert failing is not None and not failing.armed
            assert strategy.model is model and strategy.optimizer is optimizer
            assert _same(_state(model), start)
            assert not getattr(strategy, "rebasin_active", False)
            if isinstance(strategy, RebasinStrategy | InterpolationStrategy):  # others: dill cannot
                atomic_save_checkpoint(strategy, tmp_path / "after-error.pkl")  # not refused
            strategy.eval(bench.test_stream[:1])  # scores the user's model, as it was
            torch.set_rng_state(rng)
            strategy.train(exp)
    return _state(model), strategy


def _rebasin(model, optimizer, plugins):
    return _strategy(model, optimizer=optimizer, plugins=plugins, train_epochs=2, rebasin_epochs=2)


@pytest.mark.parametrize(
    "error, iteration",
    [
        (RuntimeError("a plugin failed"), 3),
        (KeyboardInterrupt(), 2),
        (RuntimeError("after the commit"), None),
    ],
    ids=["mid-epoch", "ctrl-c", "after-commit"],
)
def test_a_failed_rebasin_experience_rolls_back_and_its_retry_equals_the_uninterrupted_run(
    error, iteration, tmp_path
):
    bench = _benchmark()
    expected, reference = _train_with_retry(_rebasin, bench, None, tmp_path)
    failing = Raise(error, experience=1, iteration=iteration)
    final, strategy = _train_with_retry(_rebasin, bench, failing, tmp_path)
    assert not failing.armed  # it did fail once
    assert _same(final, expected)
    assert [r.experience for r in strategy.reports] == [1, 2]  # one report per task
    assert [r.delta_norm for r in strategy.reports] == [r.delta_norm for r in reference.reports]


def test_an_online_task_rolls_back_whole_and_is_trained_again_from_its_first_sub_experience():
    bench = _benchmark()

    def run(failing: Raise | None):
        torch.manual_seed(0)
        model = SimpleMLP(num_classes=6, input_size=16, hidden_size=32)
        strategy = _strategy(model, plugins=[failing] if failing else [])
        online = list(split_online_stream(bench.train_stream, 20, access_task_boundaries=True, seed=0))
        tasks = [[s for s in online if s.origin_experience.current_experience == t] for t in range(3)]
        for subs in tasks:
            start, rng = _state(model), torch.get_rng_state()
            for k, sub in enumerate(subs):
                try:
                    strategy.train(sub)
                except RuntimeError:
                    assert _same(_state(model), start) and not strategy.rebasin_active
                    assert strategy.model is model and len(strategy.reports) == 0
                    with pytest.raises(ValueError, match="from its first sub-experience"):
                        strategy.train(subs[k + 1])
                    torch.set_rng_state(rng)
                    for again in subs:
                        strategy.train(again)
                    break
        return _state(model), strategy

    expected, _ = run(None)
    failing = Raise(RuntimeError("a plugin failed"), experience=1, iteration=1)
    failing._due = lambda strategy: (  # in the second sub-experience of the first re-basin task
        failing.armed and strategy.rebasin_active and strategy.rebasin._subexps_seen == 2
    )
    final, strategy = run(failing)
    assert not failing.armed and _same(final, expected) and len(strategy.reports) == 2


def _plugin_on(template: str):
    """``RebasinPlugin`` on an Avalanche template whose own state an experience changes."""
    from avalanche.training import DER, ER_ACE, Naive
    from avalanche.training.plugins import LRSchedulerPlugin, LwFPlugin
    from avalanche.training.storage_policy import ClassBalancedBuffer

    from avalanche_rebasin import RebasinPlugin

    def make(model, optimizer, plugins):
        kwargs = dict(train_mb_size=32, train_epochs=2, evaluator=_evaluator())
        own = {
            "lwf": [LwFPlugin(alpha=1.0, temperature=2.0)],
            "scheduler": [LRSchedulerPlugin(torch.optim.lr_scheduler.MultiStepLR(optimizer, [1]))],
            "class-balanced": [ReplayPlugin(40, storage_policy=ClassBalancedBuffer(40, adaptive_size=True))],
        }.get(template, [])
        plugins = [RebasinPlugin(rebasin_epochs=1), *own, *plugins]
        if template in ("der", "er-ace"):
            cls = DER if template == "der" else ER_ACE
            memory = dict(mem_size=40, batch_size_mem=16)
            return cls(model=model, optimizer=optimizer, plugins=plugins, **memory, **kwargs)
        return Naive(model=model, optimizer=optimizer, plugins=plugins, **kwargs)

    return make


@pytest.mark.parametrize(
    "template, experience, iteration",
    [
        ("der", 1, None),  # DER's buffer (on the template) holds the failed experience
        ("er-ace", 1, 2),  # ER-ACE updates its buffer in before_training_exp
        ("lwf", 1, None),  # LwF's teacher would be the failed experience's commit
        ("scheduler", 0, 4),  # MultiStepLR's epoch count
        ("class-balanced", 1, None),  # ClassBalancedBuffer's seen classes (a set)
    ],
)
def test_avalanche_state_rolls_back_with_the_experience(template, experience, iteration, tmp_path):
    bench = _benchmark()
    expected, _ = _train_with_retry(_plugin_on(template), bench, None, tmp_path)
    failing = Raise(RuntimeError("a plugin failed"), experience=experience, iteration=iteration)
    final, _ = _train_with_retry(_plugin_on(template), bench, failing, tmp_path)
    assert not failing.armed and _same(final, expected)


def test_labels_outside_the_head_roll_the_rebasin_experience_back(tmp_path):
    torch.manual_seed(0)
    bench = _benchmark()
    model = SimpleMLP(num_classes=2, input_size=16, hidden_size=32)  # labels reach 5
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    strategy = _strategy(model, optimizer=optimizer)
    strategy.rebasin.trained_tasks = 1  # as if experience 0 had been trained: re-basin starts now
    start = _state(model)
    with pytest.raises((IndexError, RuntimeError)):
        strategy.train(bench.train_stream[0])
    assert strategy.model is model and strategy.optimizer is optimizer and not strategy.rebasin_active
    assert _same(_state(model), start) and strategy.reports == [] and strategy.rebasin.trained_tasks == 1


def _interpolation(model, optimizer, plugins):
    return InterpolationStrategy(
        model=model, optimizer=optimizer, alpha=0.5, restart=0.5,
        plugins=[ReplayPlugin(mem_size=60), *plugins], train_mb_size=32, train_epochs=2,
        evaluator=_evaluator(),
    )  # fmt: skip


@pytest.mark.parametrize("experience, iteration", [(0, 3), (1, 3), (1, None)])
def test_a_failed_interpolation_experience_rolls_back_and_its_retry_equals_the_uninterrupted_run(
    experience, iteration, tmp_path
):
    bench = _benchmark()
    expected, _ = _train_with_retry(_interpolation, bench, None, tmp_path)
    failing = Raise(RuntimeError("a plugin failed"), experience=experience, iteration=iteration)
    final, strategy = _train_with_retry(_interpolation, bench, failing, tmp_path)
    assert not failing.armed and _same(final, expected)
    assert [r.experience for r in strategy.interpolation.reports] == [1, 2]


class _GrowingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU())
        self.head = IncrementalClassifier(32, initial_out_features=2)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("make", [_rebasin, _interpolation], ids=["rebasin", "interpolation"])
def test_a_head_grown_for_the_failed_experience_is_put_back(make, tmp_path):
    """Model adaptation grows the head before any plugin runs; the rollback puts the old head
    back, so the retry grows it again and equals the uninterrupted run."""
    ordered = _benchmark()
    bench = nc_benchmark(
        ordered.original_train_dataset, ordered.original_test_dataset, n_experiences=3,
        task_labels=False, seed=0, fixed_class_order=list(range(6)),
    )  # fmt: skip
    expected, _ = _train_with_retry(make, bench, None, tmp_path, build=_GrowingNet)
    failing = Raise(RuntimeError("a plugin failed"), experience=1, iteration=2)
    final, _ = _train_with_retry(make, bench, failing, tmp_path, build=_GrowingNet)
    assert not failing.armed and _same(final, expected)


def test_the_guards_are_gone_between_train_calls_and_from_checkpoints(tmp_path):
    bench = _benchmark()
    torch.manual_seed(0)
    model = SimpleMLP(num_classes=6, input_size=16, hidden_size=32)
    strategy = _strategy(model)
    strategy.train(bench.train_stream[0])
    assert not {"_before_training_exp", "_train_exp", "_after_training_exp"} & set(strategy.__dict__)
    atomic_save_checkpoint(strategy, tmp_path / "ckpt.pkl")
    fresh = _strategy(SimpleMLP(num_classes=6, input_size=16, hidden_size=32))
    fresh, resume_at = maybe_load_checkpoint(fresh, tmp_path / "ckpt.pkl")
    assert resume_at == 1
    fresh.train(bench.train_stream[1])  # the guards bind to the resumed strategy, not to the saved one
    assert len(fresh.reports) == 1


@pytest.mark.parametrize("bad", ["nan", "nan-buffer", "float16"])
def test_weights_the_method_cannot_train_are_refused_before_experience_0_and_named(bad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 6))
    with torch.no_grad():
        if bad == "nan":
            model[1].weight[0, 0] = float("nan")
        elif bad == "nan-buffer":
            model[2].running_mean[0] = float("nan")
    model = model.half() if bad == "float16" else model
    start = _state(model)
    strategy = _strategy(model)
    name = {"nan": "1.weight", "nan-buffer": "2.running_mean", "float16": "1.weight"}[bad]
    with pytest.raises(ValueError, match=rf"before task 0.*'{name}'") as info:
        strategy.train(_benchmark().train_stream[0])
    assert "delta_lr" not in str(info.value)
    assert _same(_state(model), start) and strategy.model is model


def test_align_solves_half_precision_models_in_float32():
    """Half-precision weights are aligned as their float32 values would be (the logits overflowed
    at the first Adam step in float16); the result's model keeps the input's dtype."""
    torch.manual_seed(0)
    model_a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 8)

    spec = discover_spec(model_a, x)
    model_b = permute(model_a, spec, random_permutation(spec, generator=torch.Generator().manual_seed(1)))
    settings = dict(
        spec=spec, init="identity", stopping=Stopping(max_steps=30, patience=None), progress=False
    )
    for dtype in (torch.float16, torch.bfloat16):
        a, b = copy.deepcopy(model_a).to(dtype), copy.deepcopy(model_b).to(dtype)
        before = _state(b)
        half = align(a, b, **settings)
        full = align(copy.deepcopy(a).float(), copy.deepcopy(b).float(), **settings)
        assert half.history == full.history and all(torch.isfinite(torch.tensor(half.history)))
        assert all(torch.equal(half.permutations[g], full.permutations[g]) for g in full.permutations)
        assert half.model.state_dict()["0.weight"].dtype == dtype and _same(_state(b), before)
        data = [(x.to(dtype), torch.randint(0, 4, (32,)))]
        mid = align(a, b, spec=spec, cost="mid", data=data, progress=False, stopping=Stopping(max_steps=3))
        assert all(torch.isfinite(torch.tensor(mid.history)))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda a, b, x: align(a, b, example_input=x, stopping=Stopping(max_steps=2.5)), "max_steps"),
        (lambda a, b, x: align(a, b, example_input=x, solver=Sinkhorn(n_iter="20")), "n_iter"),
        (lambda a, b, x: align(a, b, example_input=x, lr=None), "lr"),
        (lambda a, b, x: align(a, b, example_input=x, stopping=Stopping(patience=1.5)), "patience"),
        (lambda a, b, x: align(a, b, example_input=x, seed=True), "seed"),
        (lambda a, b, x: weight_matching(a, b, example_input=x, max_iter=2.5), "max_iter"),
    ],
)
def test_numeric_arguments_of_the_wrong_type_are_named(call, name):
    a, b = (
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
    )
    with pytest.raises(TypeError, match=rf"^{name} must be"):
        call(a, b, torch.randn(2, 4))


def test_an_interrupted_checkpoint_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    torch.manual_seed(0)
    bench = _benchmark()
    strategy = _strategy(SimpleMLP(num_classes=6, input_size=16, hidden_size=32))
    strategy.train(bench.train_stream[0])
    path = tmp_path / "ckpt.pkl"
    atomic_save_checkpoint(strategy, path)
    saved = path.read_bytes()
    strategy.train(bench.train_stream[1])
    real_save = torch.save

    def killed_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as file:  # what a kill leaves: a truncated file
            file.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        atomic_save_checkpoint(strategy, path)
    assert path.read_bytes() == saved
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pkl"]  # no temporary file left
    monkeypatch.setattr(torch, "save", real_save)
    fresh = _strategy(SimpleMLP(num_classes=6, input_size=16, hidden_size=32))
    _, resume_at = maybe_load_checkpoint(fresh, path)
    assert resume_at == 1
