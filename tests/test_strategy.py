"""RebasinStrategy on tiny synthetic in-memory benchmarks (seconds each)."""

from __future__ import annotations

import itertools

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.models import MTSimpleMLP, SimpleMLP
from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin, ReplayPlugin, SupervisedPlugin
from rebasin_testkit import SmallCNN

from avalanche_rebasin import RebasinConfig, RebasinNetwork, discover_spec, permute_state
from avalanche_rebasin.avalanche.strategy import PRESETS, RebasinStrategy

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


def _strategy(model, preset: str | None = None, optimizer=None, **kwargs) -> RebasinStrategy:
    defaults = dict(
        train_mb_size=32, train_epochs=1, rebasin_epochs=1, eval_mb_size=64, evaluator=_evaluator(), seed=0
    )
    defaults.update(kwargs)
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=1e-3)
    if preset is not None:
        return RebasinStrategy.from_preset(preset, model=model, optimizer=optimizer, **defaults)
    return RebasinStrategy(model=model, optimizer=optimizer, **defaults)


def _stream_accuracy(results: dict) -> float:
    return next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream/eval_phase/test_stream"))


class CommitRecorder(SupervisedPlugin):
    """Keeps what goes into each commit (θ_i, P̂, δ, spec) so a test can recompute the formula."""

    def __init__(self) -> None:
        super().__init__()
        self.recorded = None

    def after_training_epoch(self, strategy, **kwargs):
        net = strategy.rebasin.network
        if net is not None:
            hard = net.permutation.hard() if net.permutation is not None else None
            theta = {k: v.clone() for k, v in net.theta_state().items()}
            delta = {k: v.detach().clone() for k, v in net.delta_state().items()}
            self.recorded = (theta, hard, delta, net.spec)


def _recording(model, plugins=(), **kwargs):
    recorder = CommitRecorder()
    strategy = _strategy(model, plugins=[*plugins, recorder], **kwargs)
    return strategy, recorder


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
    strategy, recorder = _recording(model, plugins=[ReplayPlugin(mem_size=30)], alpha=0.3)
    for exp in bench.train_stream:
        strategy.train(exp)
        results = strategy.eval(bench.test_stream)
        if exp.current_experience == 0:
            continue
        theta, hard, delta, spec = recorder.recorded
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
        ({"n_iter": 0}, "n_iter"),
        ({"delta_clip": 0.0}, "delta_clip"),
        ({"train_alpha": 1.5}, "train_alpha"),
        ({"tau_final": 0.0}, "tau_final"),
        ({"delta_optimizer": "rmsprop"}, "delta_optimizer"),
        ({"rebasin_steps": 0}, "rebasin_steps"),
        ({"perm_init": "random"}, "perm_init"),
        ({"perm_weight_decay": -0.01}, "perm_weight_decay"),
        ({"penalty_after_clip": "yes"}, "penalty_after_clip"),
    ],
)
def test_invalid_hyperparameters_are_rejected(kwargs, word):
    model = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=8)
    with pytest.raises(ValueError, match=word):
        _strategy(model, **kwargs)


def test_the_paper_preset_holds_the_authors_settings():
    """``rebasinIL.py``: logits on the model's AdamW (lr 0.1, weight decay 0.01), δ on SGD (lr
    0.05, weight decay 0.1 = 2β after a ±1e-3 clip), 5 epochs, 20 cold Sinkhorn iterations at τ 1,
    commit weight 0.2 on the permuted network, midpoint in training."""
    c = RebasinConfig.from_preset("paper")
    assert (c.perm_lr, c.perm_weight_decay, c.delta_optimizer, c.delta_lr) == (0.1, 0.01, "sgd", 0.05)
    assert (2 * c.beta, c.delta_clip, c.penalty_after_clip, c.delta_init_std) == (0.1, 1e-3, True, 1e-4)
    assert (c.rebasin_epochs, c.alpha, c.train_alpha, c.warm_start) == (5, 0.2, 0.5, False)
    assert (c.sinkhorn.tau, c.sinkhorn.n_iter, c.sinkhorn.threshold) == (1.0, 20, None)


def _after_one_experience():
    """A Re-basin strategy trained on its first experience, its benchmark and θ_1."""
    torch.manual_seed(0)
    bench = _benchmark()
    model = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=32, drop_rate=0)
    strategy = _strategy(model)
    strategy.train(bench.train_stream[0])
    return bench, model, strategy, {k: v.clone() for k, v in model.state_dict().items()}


def test_nan_guard_keeps_previous_weights():
    bench, model, strategy, kept = _after_one_experience()
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


def test_lr_scheduler_plugin_schedules_every_experience_and_hands_the_optimizer_back():
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

    class Spy(SupervisedPlugin):
        def after_training_epoch(self, strategy, **kwargs):
            seen.append([g["lr"] for g in strategy.optimizer.param_groups])

    strategy.plugins.append(Spy())
    for exp in bench.train_stream:
        strategy.train(exp)
    assert seen[:2] == [[0.05], [0.025]]  # the scheduler steps the first experience
    # then the δ/logit optimiser of each re-basin experience: logits (Adam 0.1) and δ (SGD 0.05)
    assert seen[2:4] == seen[4:6] == [[0.05, 0.025], [0.025, 0.0125]]
    assert opt.param_groups[0]["lr"] == 0.1 and strategy.optimizer is opt  # handed back and reset
    assert sched.scheduler.optimizer is opt


class StepRecorder(CommitRecorder):
    """Also records τ, the trained network's weights and P̂ before every training step."""

    def __init__(self) -> None:
        super().__init__()
        self.taus, self.merged, self.hards = [], [], []

    def before_forward(self, strategy, **kwargs):
        net = strategy.rebasin.network
        if net is not None and strategy.is_training:
            self.taus.append(net.tau)
            self.merged.append({k: v.detach().clone() for k, v in net.trained_state().items()})
            self.hards.append(net.permutation.hard() if net.permutation is not None else None)


def _recorder(**kwargs) -> tuple[RebasinStrategy, StepRecorder]:
    model = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=32, drop_rate=0)
    recorder = StepRecorder()
    strategy = _strategy(model, plugins=[ReplayPlugin(mem_size=30), recorder], **kwargs)
    return strategy, recorder


@pytest.mark.parametrize(
    "kwargs",
    [
        {"preset": "paper"},
        {"preset": "midpoint"},
        {"preset": "consistent"},
        {"preset": "consistent", "permute": False},
        {"preset": "paper", "train_alpha": None, "straight_through": True},
        {"preset": "paper", "tau_final": 0.05},
        {"preset": "paper", "delta_optimizer": "adam", "delta_lr": 1e-2, "delta_clip": None},
        {"preset": "paper", "rebasin_steps": 20},
        {"preset": "consistent", "perm_init": "similarity"},
    ],
    ids=[
        "paper",
        "midpoint",
        "consistent",
        "consistent-nopermute",
        "train-alpha-none+st",
        "tau-final",
        "adam",
        "steps",
        "similarity-init",
    ],
)
def test_presets_and_options_train_and_commit_formula(kwargs):
    torch.manual_seed(0)
    kwargs = dict(kwargs)
    preset = kwargs.pop("preset")
    bench = _benchmark()
    model = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=32, drop_rate=0)
    recorder = CommitRecorder()
    strategy = _strategy(model, preset=preset, plugins=[ReplayPlugin(mem_size=30), recorder], **kwargs)
    for key, value in {**PRESETS[preset], **kwargs}.items():
        if key == "rebasin_epochs":
            assert strategy.config.rebasin_epochs == 1  # _strategy's override wins over the preset's 5
        elif key != "train_alpha" or value is not None:
            assert getattr(strategy.config, key) == value, key
    for exp in bench.train_stream:
        strategy.train(exp)
        results = strategy.eval(bench.test_stream)
        if exp.current_experience == 0:
            continue
        theta, hard, delta, spec = recorder.recorded
        assert (hard is None) == (kwargs.get("permute") is False)
        permuted = permute_state(theta, spec, hard) if hard is not None else theta
        a = strategy.config.alpha
        for name, value in model.named_parameters():
            expected = (1 - a) * theta[name] + a * permuted[name] + delta[name]
            torch.testing.assert_close(value.detach(), expected, rtol=1e-6, atol=1e-6)
        assert any(float(d.abs().max()) > 1e-4 for d in delta.values())  # δ was trained
    assert 0.0 <= _stream_accuracy(results) <= 1.0
    assert len(strategy.reports) == 2


def test_straight_through_trains_the_hard_permutation_and_moves_the_logits():
    torch.manual_seed(0)
    bench = _benchmark()
    strategy, rec = _recorder(train_alpha=0.3, straight_through=True, perm_init_noise=1.0, delta_init_std=0.0)
    strategy.train(bench.train_stream[0])
    strategy.train(bench.train_stream[1])
    theta, _, _, spec = rec.recorded
    first, hard = rec.merged[0], rec.hards[0]  # δ is exactly 0 at the first step
    assert any(bool((h != torch.arange(len(h))).any()) for h in hard.values())
    permuted = permute_state(theta, spec, hard)
    for name in first:
        torch.testing.assert_close(first[name], 0.7 * theta[name] + 0.3 * permuted[name], atol=1e-6, rtol=0)
    initial = rec.merged[0]["features.0.weight"]
    later = rec.merged[-1]["features.0.weight"]
    assert not torch.equal(initial, later)


def test_soft_gradient_reaches_logits_through_straight_through():
    torch.manual_seed(0)
    bench = _benchmark()
    strategy, _ = _recorder(straight_through=True, delta_lr=0.0)
    strategy.train(bench.train_stream[0])
    grads = []

    class GradSpy(SupervisedPlugin):
        def after_backward(self, strategy, **kwargs):
            grads.append(sum(float(x.grad.abs().sum()) for x in strategy.rebasin.network.permutation.logits))

    strategy.plugins.append(GradSpy())
    strategy.train(bench.train_stream[1])
    assert grads and all(g > 0 for g in grads)


def test_tau_is_annealed_geometrically_over_the_experience():
    torch.manual_seed(0)
    bench = _benchmark()
    strategy, rec = _recorder(tau=1.0, tau_final=0.01, rebasin_epochs=2)
    strategy.train(bench.train_stream[0])
    strategy.train(bench.train_stream[1])
    taus = rec.taus
    assert taus[0] == pytest.approx(1.0) and taus[-1] == pytest.approx(0.01)
    ratios = [b / a for a, b in itertools.pairwise(taus)]
    assert max(ratios) == pytest.approx(min(ratios)) and ratios[0] < 1  # geometric, decreasing


def test_rebasin_steps_sets_the_step_budget_whatever_the_data_size():
    torch.manual_seed(0)
    bench = _benchmark()
    strategy, rec = _recorder(rebasin_steps=25, rebasin_epochs=1)
    strategy.train(bench.train_stream[0])
    batches_seen = []

    class Count(SupervisedPlugin):
        def before_training_epoch(self, strategy, **kwargs):
            batches_seen.append(len(strategy.dataloader))

    strategy.plugins.append(Count())
    strategy.train(bench.train_stream[1])
    per_epoch = batches_seen[0]
    assert len(batches_seen) == -(-25 // per_epoch) and len(rec.taus) >= 25
    assert len(rec.taus) == len(batches_seen) * per_epoch


def test_unknown_preset_is_rejected_with_the_choices():
    model = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=8)
    with pytest.raises(ValueError, match=r"unknown preset 'fast'.*consistent.*midpoint.*paper"):
        RebasinStrategy.from_preset("fast", model=model, optimizer=torch.optim.SGD(model.parameters()))


def test_similarity_init_starts_from_the_cosine_similarity_of_units():
    torch.manual_seed(0)
    bench = _benchmark()
    strategy, _ = _recorder(perm_init="similarity", perm_init_noise=0.0)
    strategy.train(bench.train_stream[0])
    w_in = strategy.model.features[0].weight.detach().clone()
    b_in = strategy.model.features[0].bias.detach().clone()
    w_out = strategy.model.classifier.weight.detach().clone()
    units = torch.cat([w_in, b_in[:, None], w_out.T], dim=1)
    units = units / units.norm(dim=1, keepdim=True)
    expected = units @ units.T
    spec = discover_spec(strategy.model, torch.zeros(1, 16))
    net = RebasinNetwork(strategy.model, spec, strategy.config, experience=1)
    (logits,) = net.permutation.logits
    torch.testing.assert_close(logits.detach(), expected, atol=1e-5, rtol=0)


def test_alpha_one_commits_a_function_preserving_permutation():
    """With α = 1 and δ = 0 the commit is π(θ): same function, so only 0 < α < 1 can change it."""
    torch.manual_seed(0)
    bench = _benchmark()
    model = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=32, drop_rate=0)
    strategy = _strategy(model, alpha=1.0, delta_lr=0.0, delta_init_std=0.0, perm_init_noise=1.0)
    strategy.train(bench.train_stream[0])
    x = torch.randn(64, 16)
    model.eval()
    before, weights = model(x).detach(), model.features[0].weight.detach().clone()
    strategy.train(bench.train_stream[1])
    model.eval()
    assert strategy.reports[-1].units_moved > 0
    assert not torch.equal(model.features[0].weight, weights)
    assert (model(x).detach() - before).abs().max() <= 1e-5


@pytest.mark.parametrize("reestimate", [True, False])
def test_batchnorm_statistics_are_reestimated_for_the_committed_weights(reestimate):
    torch.manual_seed(0)
    bench = _benchmark(image=True)
    model = SmallCNN()
    strategy, recorder = _recording(
        model, train_mb_size=1000, bn_reestimate=reestimate, delta_lr=0.0, alpha=0.5
    )
    strategy.train(bench.train_stream[0])
    strategy.train(bench.train_stream[1])
    theta, hard, _, spec = recorder.recorded
    x = torch.stack([bench.train_stream[1].dataset[i][0] for i in range(len(bench.train_stream[1].dataset))])
    with torch.no_grad():
        features = model.conv1(x)  # the committed first conv: one batch holds the whole experience
    if reestimate:
        torch.testing.assert_close(model.bn1.running_mean, features.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
        var = features.transpose(0, 1).reshape(8, -1).var(1, unbiased=True)
        torch.testing.assert_close(model.bn1.running_var, var, atol=1e-4, rtol=1e-4)
    else:
        permuted = permute_state(theta, spec, hard)
        expected = 0.5 * theta["bn1.running_mean"] + 0.5 * permuted["bn1.running_mean"]
        torch.testing.assert_close(model.bn1.running_mean, expected)


def test_an_error_while_reestimating_batchnorm_keeps_the_previous_weights(monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("data source broke")

    monkeypatch.setattr("avalanche_rebasin.avalanche.plugin.reestimate_batchnorm", failing)
    torch.manual_seed(0)
    bench = _benchmark(image=True)
    model = SmallCNN()
    strategy = _strategy(model)
    strategy.train(bench.train_stream[0])
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="data source broke"):
        strategy.train(bench.train_stream[1])
    for k, v in model.state_dict().items():
        assert torch.equal(v, kept[k]), k
    assert not strategy.rebasin_active and strategy.model is model


def test_the_penalty_gradient_added_after_the_backward_equals_the_penalty_through_the_loss():
    from avalanche_rebasin.continual.rebasin import add_penalty_gradient, delta_penalty, penalty_value

    torch.manual_seed(0)
    model = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=8, drop_rate=0).double()
    x = torch.randn(6, 16, dtype=torch.float64)
    network = RebasinNetwork(
        model,
        discover_spec(model, x[:2]),
        RebasinConfig(beta=0.3, delta_init_std=0.1, warm_start=False),
        experience=1,
    ).double()
    (network(x).square().mean() + delta_penalty(network)).backward()
    through_loss = [p.grad.clone() for p in network.parameters()]
    network.zero_grad()
    network(x).square().mean().backward()
    add_penalty_gradient(network)
    for expected, p in zip(through_loss, network.parameters()):
        torch.testing.assert_close(p.grad, expected, atol=1e-12, rtol=0)
    assert float(penalty_value(network)) == pytest.approx(float(delta_penalty(network)), rel=1e-12)


class FirstUpdateRecorder(SupervisedPlugin):
    """δ, the logits and their gradients as the backward left them, and both after the first
    update of the re-basin experience."""

    def __init__(self) -> None:
        super().__init__()
        self.prior = self.stepped = None

    @staticmethod
    def _tensors(strategy, grad: bool):
        net = strategy.rebasin.network
        tensors = [*net.delta.values(), *net.permutation.logits]
        return [(t.grad if grad else t).detach().clone() for t in tensors]

    def after_backward(self, strategy, **kwargs):
        if strategy.rebasin.network is not None and self.prior is None:
            self.prior = (self._tensors(strategy, False), self._tensors(strategy, True))

    def after_update(self, strategy, **kwargs):
        if strategy.rebasin.network is not None and self.stepped is None:
            self.stepped = self._tensors(strategy, False)


@pytest.mark.parametrize("after_clip", [True, False], ids=["decay-after-clip", "penalty-clipped"])
def test_the_first_update_is_sgd_with_weight_decay_on_delta_and_adamw_on_the_logits(after_clip):
    """The authors' update, recomputed by hand: ``δ ← δ − lr·(clip(g) + 2βδ)`` (SGD's weight
    decay after the clip; otherwise ``δ − lr·clip(g + 2βδ)``) and AdamW's first step on the
    logits, ``X ← (1 − lr·wd)X − lr·g/(|g| + ε)``."""
    torch.manual_seed(0)
    bench = _benchmark()
    model = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=8, drop_rate=0)
    recorder = FirstUpdateRecorder()
    lr, beta, clip, perm_lr, wd = 0.05, 0.5, 1e-3, 0.1, 0.5  # 2βδ ≫ clip: the order shows
    strategy = _strategy(
        model, plugins=[recorder], delta_lr=lr, beta=beta, delta_clip=clip, delta_init_std=0.1,
        perm_lr=perm_lr, perm_weight_decay=wd, penalty_after_clip=after_clip,
    )  # fmt: skip
    strategy.train(bench.train_stream[0])
    strategy.train(bench.train_stream[1])
    (values, grads), after = recorder.prior, recorder.stepped
    n_delta = len(values) - 1  # SimpleMLP: one permutation group
    for value, grad, new in zip(values[:n_delta], grads[:n_delta], after[:n_delta]):
        step = grad.clamp(-clip, clip) + 2 * beta * value if after_clip else grad.clamp(-clip, clip)
        torch.testing.assert_close(new, value - lr * step, atol=1e-7, rtol=1e-6)
    x, g, x_new = values[-1], grads[-1], after[-1]
    adamw = (1 - perm_lr * wd) * x - perm_lr * g / (g.abs() + 1e-8)
    torch.testing.assert_close(x_new, adamw, atol=1e-6, rtol=1e-5)
    if after_clip:  # the penalty's gradient alone moves δ past the clip
        assert max(float((v - a).abs().max()) for v, a in zip(values, after[:n_delta])) > 2 * lr * clip


def test_a_non_finite_last_update_is_refused_at_the_commit():
    """The loss of the last step was finite, its update was not: no later loss flags it, the
    commit's own check does, and the model keeps θ_i."""
    bench, model, strategy, kept = _after_one_experience()

    class PoisonLastUpdate(SupervisedPlugin):
        def after_training_epoch(self, strategy, **kwargs):
            network = strategy.model
            next(iter(network.delta.values())).data.fill_(float("inf"))

    strategy.plugins.append(PoisonLastUpdate())
    with pytest.raises(ValueError, match=r"experience 1 .*non-finite.*commit was refused"):
        strategy.train(bench.train_stream[1])
    for k, v in model.state_dict().items():
        assert torch.equal(v, kept[k]), k
