"""Re-basin inside Avalanche's machinery: periodic evaluation, early stopping, every plugin
that touches parameters, gradients or the loss, other templates, online streams, frozen
parameters, growing heads, typed settings and metrics (tiny in-memory benchmarks)."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
import torch
from avalanche.benchmarks.scenarios.online import split_online_stream
from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.logging import TextLogger
from avalanche.models import IncrementalClassifier, SimpleMLP
from avalanche.training import DER, ER_ACE, Naive
from avalanche.training import plugins as P
from test_strategy import N_CLASSES, CommitRecorder, _benchmark, _evaluator, _strategy
from torch import nn

from avalanche_rebasin import RebasinPlugin, discover_spec, permute_state
from avalanche_rebasin.avalanche.strategy import RebasinStrategy


def _mlp() -> SimpleMLP:
    return SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=32, drop_rate=0)


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _accuracy(model: nn.Module, stream) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for exp in stream:
            data = exp.dataset
            x = torch.stack([data[i][0] for i in range(len(data))])
            y = torch.tensor([data[i][1] for i in range(len(data))])
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return correct / total


def test_import_of_the_core_does_not_import_avalanche():
    code = (
        "import sys, avalanche_rebasin as ar; assert 'avalanche' not in sys.modules; "
        "from avalanche_rebasin import RebasinStrategy, RebasinPlugin; assert 'avalanche' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_every_public_name_resolves_and_the_avalanche_ones_import_it_only_on_use():
    code = (
        "import sys, avalanche_rebasin as ar; "
        "core = [n for n in ar.__all__ if n not in ar._AVALANCHE_NAMES]; "
        "[getattr(ar, n) for n in core]; assert 'avalanche' not in sys.modules; "
        "[getattr(ar, n) for n in ar._AVALANCHE_NAMES]; assert 'avalanche' in sys.modules; "
        "assert set(ar._AVALANCHE_NAMES) <= set(ar.__all__)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_periodic_evaluation_scores_the_network_being_trained():
    torch.manual_seed(0)
    bench = _benchmark()
    direct: list[float] = []

    class Probe(P.SupervisedPlugin):
        def after_eval(self, strategy, **kwargs):
            if strategy.rebasin.active:  # score the module in strategy.model ourselves
                direct.append(_accuracy(strategy.model, bench.test_stream))

    strategy = _strategy(
        _mlp(), preset="midpoint", delta_lr=1e-3, rebasin_epochs=4, eval_every=1, plugins=[Probe()]
    )
    strategy.train(bench.train_stream[0])
    returned = strategy.train(bench.train_stream[1], eval_streams=[bench.test_stream])
    key = next(k for k in returned if k.startswith("Top1_Acc_Stream/eval_phase/test_stream"))
    periodic = strategy.evaluator.get_all_metrics()[key][1][-4:]
    assert len(direct) == 4 and len({round(v, 6) for v in periodic}) > 1  # it moves across epochs
    assert periodic == pytest.approx(direct, abs=1e-6)
    assert returned[key] == pytest.approx(periodic[-1])  # train() returns the last periodic eval
    after = strategy.eval(bench.test_stream)  # eval() sees the committed θ_{i+1} in the user's module
    assert strategy.model is strategy.rebasin.network.base if strategy.rebasin.active else True
    assert after[key] == pytest.approx(_accuracy(strategy.model, bench.test_stream), abs=1e-6)


def _epochs_run(strategy, bench) -> list[int]:
    counts: list[int] = []

    class Count(P.SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            counts.append(0)

        def after_training_epoch(self, strategy, **kwargs):
            counts[-1] += 1

    strategy.plugins.append(Count())
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[bench.test_stream])
    return counts


def test_early_stopping_runs_the_same_epochs_as_naive_while_validation_improves():
    bench = _benchmark()

    def build(template, **extra):
        torch.manual_seed(0)
        model = _mlp()
        stopper = P.EarlyStoppingPlugin(
            patience=1, val_stream_name="test_stream", metric_name="Loss_Stream", mode="min"
        )
        evaluator = P.EvaluationPlugin(loss_metrics(stream=True), accuracy_metrics(stream=True), loggers=[])
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        return template(
            model=model, optimizer=optimizer, train_mb_size=32, train_epochs=3, eval_every=1,
            plugins=[stopper], evaluator=evaluator, **extra,
        )  # fmt: skip

    naive = build(Naive)
    rebasin = build(RebasinStrategy, delta_optimizer="adam", delta_lr=1e-4, delta_clip=None, perm_lr=1e-3)
    assert _epochs_run(naive, bench) == _epochs_run(rebasin, bench) == [3, 3, 3]
    assert len(rebasin.reports) == 2


def test_early_stopping_restores_the_best_trained_network_and_still_commits():
    torch.manual_seed(0)
    bench = _benchmark()
    stop = P.EarlyStoppingPlugin(patience=1, val_stream_name="test_stream", mode="max")
    strategy = _strategy(_mlp(), rebasin_epochs=5, eval_every=1, plugins=[stop], delta_lr=0.0, perm_lr=1e-12)
    counts = _epochs_run(strategy, bench)  # accuracy cannot improve with frozen δ and logits
    assert counts[1] < 5 and counts[2] < 5 and len(strategy.reports) == 2
    assert not strategy.rebasin.active


def _final_weights(plugins, steps: int = 2, **kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    bench = _benchmark()
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    plugins = plugins(optimizer) if callable(plugins) else plugins  # a scheduler needs the optimiser
    strategy = _strategy(model, plugins=plugins, optimizer=optimizer, **kwargs)
    for exp in bench.train_stream[:steps]:
        strategy.train(exp)
    return _weights(model)


def _step_lr(gamma: float):
    """A StepLR plugin on the strategy's own optimiser (built by :func:`_final_weights`)."""
    return lambda opt: [P.LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=gamma))]


@pytest.mark.parametrize(
    "weak, strong, kwargs",
    [
        (lambda: [], lambda: [P.ReplayPlugin(mem_size=60)], {}),
        (lambda: [P.LwFPlugin(alpha=0.0)], lambda: [P.LwFPlugin(alpha=100.0)], {}),
        (lambda: [], lambda: [P.GEMPlugin(patterns_per_experience=40, memory_strength=0.5)], {}),
        (lambda: [], lambda: [P.AGEMPlugin(patterns_per_experience=40, sample_size=40)], {}),
        (lambda: _step_lr(1.0), lambda: _step_lr(0.01), {"rebasin_epochs": 3}),
    ],
    ids=["Replay", "LwF", "GEM", "A-GEM", "LRScheduler"],
)
def test_every_supported_plugin_changes_what_rebasin_commits(weak, strong, kwargs):
    settings = {"delta_optimizer": "adam", "delta_lr": 1e-2, "delta_clip": None, **kwargs}
    without, with_plugin = _final_weights(weak(), **settings), _final_weights(strong(), **settings)
    assert (without - with_plugin).abs().max() > 1e-4


@pytest.mark.parametrize(
    "plugin, word",
    [
        (lambda: P.EWCPlugin(ewc_lambda=1.0), "EWCPlugin penalises"),
        (lambda: P.SynapticIntelligencePlugin(si_lambda=1.0), "SynapticIntelligencePlugin penalises"),
        (lambda: P.MASPlugin(), "MASPlugin penalises"),
        (lambda: P.RWalkPlugin(), "RWalkPlugin penalises"),
        (lambda: P.GDumbPlugin(mem_size=10), "GDumbPlugin re-initialises"),
        (lambda: P.FromScratchTrainingPlugin(), "FromScratchTrainingPlugin re-initialises"),
        (lambda: P.MIRPlugin(batch_size_mem=4), "MIRPlugin has not been verified"),
        (
            lambda: P.LRSchedulerPlugin(
                torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD(_mlp().parameters())),
                metric="train_loss",
            ),
            "ReduceLROnPlateau",
        ),
    ],
    ids=["EWC", "SI", "MAS", "RWalk", "GDumb", "FromScratch", "MIR", "plateau-scheduler"],
)
def test_plugins_that_would_be_silently_wrong_are_refused(plugin, word):
    with pytest.raises(ValueError, match=word):
        _strategy(_mlp(), plugins=[plugin()])
    model = _mlp()  # the plugin form refuses them when training starts, before any work
    naive = Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters()), plugins=[RebasinPlugin(), plugin()]
    )
    before = _weights(model)
    with pytest.raises(ValueError, match=word):
        naive.train(_benchmark().train_stream[0])
    assert torch.equal(before, _weights(model))


@pytest.mark.parametrize("template", [DER, ER_ACE], ids=["DER", "ER_ACE"])
def test_plugin_attached_to_other_templates_trains_and_commits_the_formula(template):
    torch.manual_seed(0)
    bench = _benchmark()
    model = _mlp()
    recorder = CommitRecorder()
    rebasin = RebasinPlugin(alpha=0.3, rebasin_epochs=1)
    strategy = template(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        mem_size=30,
        batch_size_mem=8,
        train_mb_size=32,
        eval_mb_size=64,
        plugins=[rebasin, recorder],
        evaluator=_evaluator(),
    )
    strategy.rebasin = rebasin  # the recorder looks for it here
    for exp in bench.train_stream:
        strategy.train(exp)
        strategy.eval(bench.test_stream)
        if exp.current_experience == 0:
            continue
        theta, hard, delta, spec = recorder.recorded
        permuted = permute_state(theta, spec, hard)
        for name, value in model.named_parameters():
            expected = 0.7 * theta[name] + 0.3 * permuted[name] + delta[name]
            torch.testing.assert_close(value.detach(), expected, rtol=1e-6, atol=1e-6)
    assert len(rebasin.reports) == 2 and strategy.model is model


def test_online_stream_commits_once_per_task_and_needs_task_boundaries():
    torch.manual_seed(0)
    bench = _benchmark()
    online = split_online_stream(bench.train_stream, experience_size=40, access_task_boundaries=True, seed=0)
    strategy = _strategy(_mlp())
    trace = []
    for sub in online:
        strategy.train(sub)
        trace.append(
            (sub.origin_experience.current_experience, strategy.rebasin.active, len(strategy.reports))
        )
    for task in range(3):
        states = [(active, n) for t, active, n in trace if t == task]
        assert len(states) >= 2  # several sub-experiences per task
        assert all(active == (task > 0) for active, _ in states[:-1])  # one phase spans the task
        assert states[-1] == (False, max(task, 0))  # committed once, at the task's end
    assert strategy.rebasin.trained_tasks == 3
    blind = split_online_stream(bench.train_stream, experience_size=40, seed=0)
    with pytest.raises(ValueError, match="access_task_boundaries=True"):
        _strategy(_mlp()).train(next(iter(blind)))


def test_frozen_parameters_stay_bit_identical():
    torch.manual_seed(0)
    bench = _benchmark()
    model = _mlp()
    for p in model.features.parameters():
        p.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.features.state_dict().items()}
    strategy = RebasinStrategy(
        model=model,
        optimizer=torch.optim.Adam(model.classifier.parameters(), lr=1e-2),
        train_mb_size=32,
        evaluator=_evaluator(),
        plugins=[P.ReplayPlugin(mem_size=30)],
        delta_optimizer="adam",
        delta_lr=1e-2,
    )
    for exp in bench.train_stream:
        strategy.train(exp)
    for k, v in model.features.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert strategy.reports[-1].units_moved == 0 and strategy.reports[-1].delta_norm > 0


class GrowingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU())
        self.head = IncrementalClassifier(24, initial_out_features=2)

    def forward(self, x):
        return self.head(self.body(x))


def _growing_run(tmp_path, stop_after: int | None) -> list[torch.Tensor]:
    bench = _benchmark(seed=2)

    def build():
        torch.manual_seed(0)
        model = GrowingNet()
        return _strategy(model, plugins=[P.ReplayPlugin(mem_size=30)], train_epochs=2)

    strategy, start = build(), 0
    if stop_after is not None:
        for exp in bench.train_stream[: stop_after + 1]:
            torch.manual_seed(100 + exp.current_experience)
            strategy.train(exp)
        save_checkpoint(strategy, str(tmp_path / "ckpt.pkl"))
        strategy, start = maybe_load_checkpoint(build(), str(tmp_path / "ckpt.pkl"))
    for exp in bench.train_stream[start:]:
        torch.manual_seed(100 + exp.current_experience)
        strategy.train(exp)
    return [p.detach().clone() for p in strategy.model.parameters()]


def test_checkpoint_after_the_head_grew_resumes_like_the_uninterrupted_run(tmp_path):
    uninterrupted = _growing_run(tmp_path, None)
    resumed = _growing_run(tmp_path, 1)
    assert uninterrupted[-1].shape[0] == N_CLASSES  # the head grew
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"permute": "False"},
        {"straight_through": "no"},
        {"bn_reestimate": "False"},
        {"alpha": True},
        {"rebasin_steps": True},
        {"diagnostic_samples": -5},
        {"rebasin_epochs": 2.0},
        {"seed": 1.5},
    ],
)
def test_settings_of_the_wrong_type_are_rejected_with_their_name(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=rf"{name} must be .*got"):
        _strategy(_mlp(), **kwargs)
    with pytest.raises(ValueError, match=name):
        RebasinPlugin(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"evaluator": ...}, "evaluator must be an avalanche EvaluationPlugin"),
        ({"train_mb_size": 0}, "train_mb_size must be an integer >= 1, got 0"),
        ({"eval_mb_size": 64.0}, "eval_mb_size must be an integer >= 1, got 64.0"),
        ({"criterion": "cross-entropy"}, "criterion must be callable"),
        ({"device": "nonsense"}, "device 'nonsense' is not a torch device"),
    ],
)
def test_template_arguments_avalanche_would_trip_over_later_are_refused_at_construction(kwargs, message):
    """`evaluator=...` was accepted and crashed after the first experience (issue 13)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        _strategy(_mlp(), **kwargs)


def test_rebasin_epochs_default_to_train_epochs_and_the_paper_preset_keeps_five():
    bench = _benchmark()
    plain = _strategy(_mlp(), train_epochs=2, rebasin_epochs=None)
    assert _epochs_run(plain, bench) == [2, 2, 2]
    model = _mlp()
    paper = RebasinStrategy.from_preset(
        "paper",
        model=model,
        optimizer=torch.optim.SGD(model.parameters()),
        train_epochs=2,
        evaluator=_evaluator(),
    )
    assert paper.config.rebasin_epochs == 5 and _epochs_run(paper, bench) == [2, 5, 5]


def test_diagnostics_reach_the_loggers_and_the_accuracy_passes_are_off_by_default():
    torch.manual_seed(0)
    bench = _benchmark()
    text = io.StringIO()
    evaluator = P.EvaluationPlugin(accuracy_metrics(stream=True), loggers=[TextLogger(text)])
    strategy = _strategy(_mlp(), evaluator=evaluator)
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    strategy.eval(bench.test_stream[:1])  # the text logger prints what was published at the next eval
    assert "Rebasin/units_moved/train_phase/train_stream = " in text.getvalue()
    xs, values = evaluator.get_all_metrics()["Rebasin/mean_row_max/train_phase/train_stream"]
    assert xs == [1] and values == [pytest.approx(strategy.reports[0].mean_row_max)]
    assert strategy.reports[0].acc_committed is None
    measured = _strategy(_mlp(), diagnostic_samples=50)
    for exp in bench.train_stream[:2]:
        measured.train(exp)
    assert 0 <= measured.reports[0].acc_committed <= 1


def test_an_experience_refused_at_its_start_leaves_theta_and_the_strategy_as_they_were():
    torch.manual_seed(0)
    bench = _benchmark()
    other = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=12, drop_rate=0)
    wrong = discover_spec(other, torch.zeros(1, 16))  # another architecture's spec
    model = _mlp()
    strategy = _strategy(model, spec=wrong)
    strategy.train(bench.train_stream[0])
    kept, optimizer = {k: v.clone() for k, v in model.state_dict().items()}, strategy.optimizer
    with pytest.raises(ValueError, match="another architecture"):
        strategy.train(bench.train_stream[1])
    assert strategy.model is model and strategy.optimizer is optimizer and not strategy.rebasin.active
    for k, v in model.state_dict().items():
        assert torch.equal(v, kept[k]), k


def test_a_second_rebasin_plugin_is_refused_before_any_work():
    model = _mlp()
    strategy = _strategy(model, plugins=[RebasinPlugin()])
    before = _weights(model)
    with pytest.raises(ValueError, match="one RebasinPlugin"):
        strategy.train(_benchmark().train_stream[0])
    assert torch.equal(before, _weights(model))
