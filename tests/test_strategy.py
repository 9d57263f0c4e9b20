"""RebasinStrategy on tiny synthetic in-memory benchmarks (seconds each)."""

from __future__ import annotations

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.models import MTSimpleMLP, SimpleMLP
from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin, ReplayPlugin
from rebasin_testkit import SmallCNN

from avalanche_rebasin import permute_state
from avalanche_rebasin.strategy import RebasinStrategy

N_CLASSES = 6


def _benchmark(task_labels: bool = False, image: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 16, 16) if image else (1, 4, 4)
    centers = torch.randn(N_CLASSES, *shape, generator=g) * 2

    def sample(n):
        y = torch.randint(0, N_CLASSES, (n,), generator=g)
        return centers[y] + torch.randn(n, *shape, generator=g), y

    (x, y), (xt, yt) = sample(240), sample(120)
    train = _make_taskaware_tensor_classification_dataset(x, y)
    test = _make_taskaware_tensor_classification_dataset(xt, yt)
    return nc_benchmark(train, test, n_experiences=3, task_labels=task_labels, seed=seed)


def _evaluator():
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        loggers=[],
    )


def _strategy(model, cls=RebasinStrategy, **kwargs) -> RebasinStrategy:
    defaults = dict(
        train_mb_size=32, train_epochs=1, rebasin_epochs=1, eval_mb_size=64, evaluator=_evaluator(), seed=0
    )
    defaults.update(kwargs)
    return cls(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), **defaults)


def _stream_accuracy(results: dict) -> float:
    return next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream/eval_phase/test_stream"))


class RecordingRebasin(RebasinStrategy):
    """Keeps what went into each commit so the test can recompute the formula."""

    def _commit(self):
        st = self._rebasin
        hard = st.logits.hard() if st.logits is not None else None
        self.recorded = (
            {k: v.clone() for k, v in st.theta.items()},
            hard,
            {k: v.detach().clone() for k, v in st.delta.items()},
            st.spec,
        )
        super()._commit()


@pytest.mark.parametrize(
    "make_model, task_labels, image",
    [
        (lambda: SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=32, drop_rate=0), False, False),
        (lambda: MTSimpleMLP(input_size=16, hidden_size=32), True, False),
        (SmallCNN, False, True),
    ],
    ids=["SimpleMLP", "MTSimpleMLP", "BatchNormCNN"],
)
def test_trains_evaluates_and_commits_formula(make_model, task_labels, image):
    torch.manual_seed(0)
    bench = _benchmark(task_labels=task_labels, image=image)
    model = make_model()
    strategy = _strategy(model, cls=RecordingRebasin, plugins=[ReplayPlugin(mem_size=30)], alpha=0.3)
    for exp in bench.train_stream:
        strategy.train(exp)
        results = strategy.eval(bench.test_stream)
        if exp.current_experience == 0:
            continue
        theta, hard, delta, spec = strategy.recorded
        permuted = permute_state(theta, spec, hard)
        state = dict(model.named_parameters())
        for name, value in theta.items():
            if name in state:
                expected = 0.7 * value + 0.3 * permuted[name] + delta[name]
                torch.testing.assert_close(state[name].detach(), expected, rtol=1e-6, atol=1e-6)
    assert 0.0 <= _stream_accuracy(results) <= 1.0
    assert len(strategy.reports) == 2
    report = strategy.reports[-1]
    assert 0 < report.mean_row_max <= 1 and 0 <= report.units_moved <= report.units_total
    if task_labels:  # every head's input axis follows the shared hidden permutation
        heads = [k for k in spec.axes if k.startswith("classifier.")]
        assert len([k for k in heads if k.endswith("weight")]) == 3


def test_alpha_zero_and_frozen_zero_delta_leave_model_unchanged():
    torch.manual_seed(0)
    bench = _benchmark()
    model = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=32, drop_rate=0)
    strategy = _strategy(model, alpha=0.0, delta_lr=0.0, delta_init_std=0.0)
    strategy.train(bench.train_stream[0])
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    strategy.train(bench.train_stream[1])
    for k, v in model.state_dict().items():
        assert torch.equal(v, after_first[k]), k


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"beta": -1.0}, "beta"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -2.0}, "tau"),
        ({"rebasin_epochs": 0}, "rebasin_epochs"),
        ({"train_epochs": 0}, "train_epochs"),
        ({"sinkhorn_iters": 0}, "sinkhorn_iters"),
        ({"delta_clip": 0.0}, "delta_clip"),
    ],
)
def test_invalid_hyperparameters_are_rejected(kwargs, word):
    model = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=8)
    with pytest.raises(ValueError, match=word):
        _strategy(model, **kwargs)


def test_nan_guard_keeps_previous_weights():
    torch.manual_seed(0)
    bench = _benchmark()
    model = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=32, drop_rate=0)
    strategy = _strategy(model)
    strategy.train(bench.train_stream[0])
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    strategy._criterion = lambda out, y: out.sum() * float("nan")
    with pytest.raises(ValueError, match=r"experience 1 .*non-finite.*'features\.0\.weight'"):
        strategy.train(bench.train_stream[1])
    for k, v in model.state_dict().items():
        assert torch.equal(v, kept[k]), k


def _run(tmp_path, stop_after: int | None) -> tuple[float, list[float]]:
    """Train 3 experiences; optionally checkpoint after `stop_after` and resume in a new strategy."""
    bench = _benchmark(seed=1)
    ckpt = tmp_path / f"ckpt_{stop_after}.pkl"

    def build():
        torch.manual_seed(0)
        model = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=32, drop_rate=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return RebasinStrategy(
            model=model,
            optimizer=opt,
            train_mb_size=32,
            train_epochs=2,
            rebasin_epochs=1,
            eval_mb_size=64,
            evaluator=_evaluator(),
            plugins=[ReplayPlugin(mem_size=30)],
            seed=0,
        )

    strategy = build()
    start = 0
    if stop_after is not None:
        for exp in bench.train_stream[: stop_after + 1]:
            torch.manual_seed(100 + exp.current_experience)  # same data order in both runs
            strategy.train(exp)
            strategy.eval(bench.test_stream)
        save_checkpoint(strategy, str(ckpt))
        del strategy
        strategy, start = maybe_load_checkpoint(build(), str(ckpt))
        assert start == stop_after + 1
    for exp in bench.train_stream[start:]:
        torch.manual_seed(100 + exp.current_experience)
        strategy.train(exp)
        results = strategy.eval(bench.test_stream)
    return _stream_accuracy(results), [r.acc_committed for r in strategy.reports]


@pytest.mark.parametrize("stop_after", [0, 1])
def test_checkpoint_resume_gives_same_final_metrics(tmp_path, stop_after):
    uninterrupted = _run(tmp_path, None)
    resumed = _run(tmp_path, stop_after)
    assert resumed == uninterrupted


def test_lr_scheduler_plugin_composes_and_keeps_rebasin_learning_rates():
    torch.manual_seed(0)
    bench = _benchmark()
    model = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=32, drop_rate=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    strategy = RebasinStrategy(
        model=model,
        optimizer=opt,
        train_mb_size=32,
        train_epochs=2,
        rebasin_epochs=2,
        eval_mb_size=64,
        evaluator=_evaluator(),
        plugins=[sched],
        delta_lr=0.05,
    )
    seen = []

    class Spy(ReplayPlugin):
        def after_training_epoch(self, strategy, **kwargs):
            seen.append([g["lr"] for g in strategy.optimizer.param_groups])

    strategy.plugins.append(Spy(mem_size=10))
    for exp in bench.train_stream:
        strategy.train(exp)
    assert seen[:2] == [[0.05], [0.025]]  # the scheduler steps the first experience
    assert opt.param_groups[0]["lr"] == 0.1  # and resets it after each experience
    assert all(lrs == [0.1, 0.05] for lrs in seen[2:])  # logits (Adam) and δ (SGD) untouched
