"""Align-then-interpolate (WeightInterpolationPlugin / InterpolationStrategy) on tiny benchmarks."""

from __future__ import annotations

import pytest
import torch
from avalanche.models import SimpleMLP
from avalanche.training import Naive
from avalanche.training.plugins import (
    EarlyStoppingPlugin,
    EWCPlugin,
    FromScratchTrainingPlugin,
    GDumbPlugin,
    LwFPlugin,
    MIRPlugin,
    ReplayPlugin,
    SupervisedPlugin,
    SynapticIntelligencePlugin,
)
from rebasin_testkit import SmallCNN
from test_strategy import N_CLASSES, _benchmark, _evaluator

from avalanche_rebasin import PermutationSpec, discover_spec, invert_permutation, permute, random_permutation
from avalanche_rebasin.avalanche.interpolation_plugin import InterpolationStrategy, WeightInterpolationPlugin
from avalanche_rebasin.avalanche.plugin import RebasinPlugin
from avalanche_rebasin.continual.interpolation import ALIGNMENTS, alignment_permutations, interpolate_aligned
from avalanche_rebasin.continual.restart import fresh_initialisation, restart_seed, restart_state
from avalanche_rebasin.core.state import model_state


class TrainedRecorder(SupervisedPlugin):
    """Keeps the trained weights of every experience, before the interpolation commit."""

    def __init__(self) -> None:
        super().__init__()
        self.trained: list[dict[str, torch.Tensor]] = []

    def after_training_exp(self, strategy, **kwargs):
        self.trained.append({k: v.clone() for k, v in model_state(strategy.model).items()})


def _mlp() -> SimpleMLP:
    return SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=32, drop_rate=0)


def _run(model, experiences: int = 2, image: bool = False, extra=(), **settings):
    torch.manual_seed(0)
    bench = _benchmark(image=image)
    recorder = TrainedRecorder()
    strategy = InterpolationStrategy(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), train_mb_size=32,
        train_epochs=2, eval_mb_size=64, evaluator=_evaluator(),
        plugins=[ReplayPlugin(mem_size=60), recorder, *extra], **settings,
    )  # fmt: skip
    committed = []
    for exp in bench.train_stream[:experiences]:
        strategy.train(exp)
        committed.append({k: v.clone() for k, v in model_state(model).items()})
    return strategy, recorder, committed, bench


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_every_alignment_commits_the_formula_with_a_function_preserving_permutation(alignment):
    alpha = 0.3
    model = _mlp()
    strategy, recorder, committed, _ = _run(model, alignment=alignment, alpha=alpha, align_steps=20)
    (report,) = strategy.interpolation.reports
    spec = discover_spec(model, torch.zeros(1, 1, 4, 4))
    old, trained = committed[0], recorder.trained[1]
    # recompute π: the alignment of the trained network to the previous weights, as the plugin did
    a, b = _mlp(), _mlp()
    a.load_state_dict(old)
    b.load_state_dict(trained)
    perms = _plugin_perms(strategy, a, b, spec)
    aligned = permute(b, spec, perms)
    probe = torch.randn(64, 1, 4, 4)
    assert (aligned(probe) - b(probe)).abs().max() <= 1e-5  # π(θ_new) computes what θ_new computes
    expected = {k: (1 - alpha) * old[k] + alpha * v for k, v in model_state(aligned).items()}
    for name, value in committed[1].items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)
    assert report.units_moved == sum(int((p != torch.arange(len(p))).sum()) for p in perms.values())


def _plugin_perms(strategy, old, new, spec):
    plugin = strategy.interpolation
    if plugin.config.alignment in ("none", "weight_matching", "sinkhorn_l2"):
        data = []
    else:  # the buffer after experience 1, as the plugin read it
        replay = next(p for p in strategy.plugins if isinstance(p, ReplayPlugin))
        loader = torch.utils.data.DataLoader(replay.storage_policy.buffer.eval(), batch_size=32)
        data = [(b[0], b[1]) for b in loader]
    return alignment_permutations(
        old, new, spec, plugin.config.alignment, data=data, alpha=plugin.config.alpha,
        steps=plugin.config.align_steps, seed=0,
    )  # fmt: skip


@pytest.mark.parametrize("alignment", ["none", "weight_matching", "sinkhorn_mid"])
def test_alpha_one_keeps_the_trained_function_and_alpha_zero_the_previous_weights(alignment):
    model = _mlp()
    _, recorder, committed, _ = _run(model, alignment=alignment, alpha=1.0, align_steps=10)
    trained = _mlp()
    trained.load_state_dict(recorder.trained[1])
    probe = torch.randn(64, 1, 4, 4)
    assert (model(probe) - trained(probe)).abs().max() <= 1e-5
    model = _mlp()
    _, _, committed, _ = _run(model, alignment=alignment, alpha=0.0, align_steps=10)
    for name, value in committed[1].items():
        assert torch.equal(value, committed[0][name]), name


def test_batchnorm_is_reestimated_on_the_buffer_after_the_commit():
    model = SmallCNN()
    model.out = torch.nn.Linear(16, N_CLASSES)
    strategy, _, _, _ = _run(model, image=True, alignment="weight_matching", alpha=0.5)
    replay = next(p for p in strategy.plugins if isinstance(p, ReplayPlugin))
    x = torch.stack(
        [replay.storage_policy.buffer.eval()[i][0] for i in range(len(replay.storage_policy.buffer))]
    )
    with torch.no_grad():  # a cumulative average of the means of the 32-sample batches the plugin read
        means = torch.stack([model.conv1(xb).mean((0, 2, 3)) for xb in x.split(32)])
    torch.testing.assert_close(model.bn1.running_mean, means.mean(0), rtol=1e-4, atol=1e-5)


def test_alignment_data_larger_than_align_samples_is_a_seeded_subset_of_the_whole_buffer(monkeypatch):
    import avalanche_rebasin.avalanche.interpolation_plugin as plugin_module

    seen: list[torch.Tensor] = []

    def spy(*args, data=(), **kwargs):
        seen.append(torch.cat([y for _, y in data]))
        return alignment_permutations(*args, data=data, **kwargs), 0.0

    monkeypatch.setattr(plugin_module, "timed_alignment", spy)
    for _ in range(2):
        torch.manual_seed(0)
        model = _mlp()
        strategy = InterpolationStrategy(
            model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), train_mb_size=16,
            train_epochs=1, evaluator=_evaluator(), plugins=[ReplayPlugin(mem_size=120)],
            alignment="activation_matching", align_samples=30, seed=4,
        )  # fmt: skip
        for exp in _benchmark().train_stream[:3]:
            strategy.train(exp)
    first, second, again, _ = seen[0], seen[1], seen[2], seen[3]
    assert len(first) == len(second) == 30 and torch.equal(first, again)  # seeded
    classes = _benchmark().train_stream[:2]  # the buffer after experience 2 holds both experiences
    assert all(
        bool(torch.isin(second, torch.tensor(list(e.classes_in_this_experience))).any()) for e in classes
    )


def test_frozen_parameters_stay_bit_identical():
    model = _mlp()
    model.features[0].weight.requires_grad_(False)
    frozen = model.features[0].weight.detach().clone()
    _run(model, alignment="weight_matching", alpha=0.5)
    assert torch.equal(model.features[0].weight, frozen)


def test_interpolate_aligned_takes_integer_buffers_from_the_nearer_network():
    # one rule with interpolate_state and restart_state (0.1 took them from the new network)
    old = {"w": torch.zeros(2, 2), "n": torch.tensor(3)}
    new = {"w": torch.ones(2, 2), "n": torch.tensor(7)}
    spec = PermutationSpec(group_sizes={}, axes={})
    out = interpolate_aligned(old, new, spec, {}, 0.25)
    assert torch.equal(out["w"], torch.full((2, 2), 0.25)) and int(out["n"]) == 3
    assert int(interpolate_aligned(old, new, spec, {}, 0.75)["n"]) == 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, "alpha must be a number in [0, 1]"),
        ({"alpha": True}, "alpha must be a number in [0, 1]"),
        ({"alignment": "optimal"}, "alignment must be one of"),
        ({"align_data": "test"}, "align_data must be one of"),
        ({"align_steps": 0}, "align_steps must be an integer >= 1"),
        ({"bn_reestimate": "yes"}, "bn_reestimate must be True or False"),
        ({"layer_alpha": "classifier"}, "layer_alpha is a mapping of module path to α"),
        ({"layer_alpha": 0}, "layer_alpha is a mapping of module path to α"),
        ({"layer_alpha": 0.5}, "layer_alpha is a mapping of module path to α"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        WeightInterpolationPlugin(**kwargs)


@pytest.mark.parametrize(
    ("plugins", "message"),
    [
        (lambda p: [p], "needs a replay memory: a ReplayPlugin"),
        (lambda p: [p, ReplayPlugin(mem_size=20)], "must come after ReplayPlugin"),
        (lambda p: [ReplayPlugin(mem_size=20), p, RebasinPlugin()], "RebasinPlugin also rewrites the model"),
        (
            lambda p: [ReplayPlugin(mem_size=20), p, WeightInterpolationPlugin()],
            "WeightInterpolationPlugin also rewrites the model",
        ),
        (lambda p: [ReplayPlugin(mem_size=20), p, p], "listed more than once"),
        (
            lambda p: [ReplayPlugin(mem_size=20), FromScratchTrainingPlugin(), p],
            "FromScratchTrainingPlugin resets",
        ),
        (lambda p: [ReplayPlugin(mem_size=20), GDumbPlugin(mem_size=20), p], "GDumbPlugin resets"),
        (lambda p: [ReplayPlugin(mem_size=20), LwFPlugin(), p], "LwFPlugin keeps a copy.*put it after"),
        (lambda p: [ReplayPlugin(mem_size=20), p, EWCPlugin(1.0)], None),  # after the commit: accepted
        (
            lambda p: [ReplayPlugin(mem_size=20), p, SynapticIntelligencePlugin(1.0)],
            "SynapticIntelligencePlugin",
        ),
        (
            lambda p: [ReplayPlugin(mem_size=20), p, MIRPlugin(batch_size_mem=8, mem_size=20, subsample=10)],
            "not been verified",
        ),
    ],
)
def test_compositions_that_would_be_silently_wrong_are_refused_before_training(plugins, message):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_mb_size=32,
        evaluator=_evaluator(), plugins=plugins(WeightInterpolationPlugin()),
    )  # fmt: skip
    if message is None:
        strategy.train(_benchmark().train_stream[0])
        return
    with pytest.raises(ValueError, match=message):
        strategy.train(_benchmark().train_stream[0])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_early_stopping_is_refused_with_a_restart_it_could_restore():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plugins = [
        ReplayPlugin(mem_size=20), WeightInterpolationPlugin(restart=1.0),
        EarlyStoppingPlugin(patience=1, val_stream_name="train_stream"),
    ]  # fmt: skip
    strategy = Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_mb_size=32,
        evaluator=_evaluator(), plugins=plugins,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"EarlyStoppingPlugin restores the best weights.*restart=0"):
        strategy.train(_benchmark().train_stream[0])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("alignment", ["weight_matching", "activation_matching", "sinkhorn_l2"])
def test_alignment_undoes_a_hidden_permutation_so_interpolation_lands_on_the_old_network(alignment):
    """θ_new = π(θ_old) exactly: the weight and activation alignments must find π⁻¹, and then any
    α commits θ_old. (The task-loss costs need not: a permutation other than π⁻¹ can give the
    interpolated network a lower loss.)"""
    torch.manual_seed(0)
    old = _mlp()
    spec = discover_spec(old, torch.zeros(1, 1, 4, 4))
    hidden = random_permutation(spec, torch.Generator().manual_seed(1))
    new = permute(old, spec, hidden)
    x = torch.randn(256, 1, 4, 4)
    data = [(x[i : i + 64], old(x[i : i + 64]).argmax(1)) for i in range(0, 256, 64)]
    perms = alignment_permutations(old, new, spec, alignment, data=data, alpha=0.5, steps=50)
    assert all(torch.equal(perms[g], p) for g, p in invert_permutation(hidden).items())
    committed = interpolate_aligned(model_state(old), model_state(new), spec, perms, 0.5)
    for name, value in model_state(old).items():
        torch.testing.assert_close(committed[name], value)


class StartRecorder(SupervisedPlugin):
    """Keeps the weights every experience starts training from (after any restart)."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[dict[str, torch.Tensor]] = []

    def before_training_epoch(self, strategy, **kwargs):
        if strategy.clock.train_exp_epochs == 0:
            self.starts.append({k: v.clone() for k, v in model_state(strategy.model).items()})


@pytest.mark.parametrize("restart", [0.0, 0.5, 1.0])
def test_restart_starts_each_experience_from_the_mix_and_interpolates_from_the_old_weights(restart):
    model, starts = _mlp(), StartRecorder()
    _, recorder, committed, _ = _run(
        model, alignment="none", alpha=0.5, restart=restart, seed=3, extra=[starts]
    )
    assert len(starts.starts) == 2
    fresh = fresh_initialisation(_mlp(), seed=restart_seed(3, 1))  # the plugin's draw for experience 2
    for name, old in committed[0].items():
        expected = torch.lerp(old, fresh[name], restart)
        torch.testing.assert_close(starts.starts[1][name], expected, rtol=0, atol=1e-7)
        # the commit interpolates toward θ_old, not toward the restart point
        torch.testing.assert_close(committed[1][name], 0.5 * old + 0.5 * recorder.trained[1][name])


def test_restart_seeds_do_not_coincide_with_the_seed_a_model_was_built_under(monkeypatch):
    seeds = {restart_seed(s, e) for s in range(4) for e in range(1, 30)}
    assert len(seeds) == 4 * 29 and min(seeds) > 2**32  # distinct, and no small integer
    torch.manual_seed(1)
    model = _mlp()  # built under the seed the old derivation gave seed 0's first restart
    fresh = fresh_initialisation(model, seed=restart_seed(0, 1))
    assert not any(torch.equal(fresh[k], v) for k, v in model.state_dict().items() if v.dim() > 1)
    reseeded = []  # only the generators the draw uses are touched: never every GPU's
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    fresh_initialisation(model, seed=restart_seed(0, 2))
    assert reseeded == []


def test_fresh_initialisation_is_seeded_leaves_the_model_and_global_rng_alone():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    a, b, c = (fresh_initialisation(model, seed) for seed in (0, 0, 1))
    assert torch.equal(torch.rand(3), expected_next)  # the global generator did not move
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(
        a["classifier.weight"], c["classifier.weight"]
    )
    with pytest.raises(ValueError, match="no submodule with reset_parameters"):
        fresh_initialisation(torch.nn.Sequential(), 0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True),
        lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.MultiheadAttention(8, 2)),
    ],
)
def test_fresh_initialisation_is_what_construction_under_the_seed_draws_attention_included(make):
    torch.manual_seed(7)
    constructed = make().state_dict()
    torch.manual_seed(0)
    fresh = fresh_initialisation(make(), seed=7)  # in_proj_weight comes from _reset_parameters
    assert fresh.keys() == constructed.keys() and all(
        torch.equal(fresh[k], v) for k, v in constructed.items()
    )


def test_restart_state_keeps_frozen_parameters_and_integer_buffers():
    previous = {"w": torch.zeros(2), "frozen": torch.zeros(2), "n": torch.tensor(4)}
    fresh = {"w": torch.ones(2), "frozen": torch.ones(2), "n": torch.tensor(0)}
    out = restart_state(previous, fresh, 0.25, frozen={"frozen"})
    assert torch.equal(out["w"], torch.full((2,), 0.25)) and torch.equal(out["frozen"], torch.zeros(2))
    assert int(out["n"]) == 4
    assert int(restart_state(previous, fresh, 0.75)["n"]) == 0  # integers come from the nearer end
    assert torch.equal(restart_state(previous, fresh, 1.0, frozen={"frozen"})["frozen"], torch.zeros(2))


def test_restart_on_a_batchnorm_model_starts_from_fresh_statistics_and_commits_reestimated_ones():
    model, starts = SmallCNN(), StartRecorder()
    model.out = torch.nn.Linear(16, N_CLASSES)
    strategy, _, _, _ = _run(model, image=True, alignment="weight_matching", alpha=0.5, restart=1.0,
                             extra=[starts])  # fmt: skip
    start = starts.starts[1]  # from scratch: BatchNorm's statistics and counter are a fresh model's
    assert torch.equal(start["bn1.running_mean"], torch.zeros(8))
    assert torch.equal(start["bn1.running_var"], torch.ones(8)) and int(start["bn1.num_batches_tracked"]) == 0
    replay = next(p for p in strategy.plugins if isinstance(p, ReplayPlugin))
    buffer = replay.storage_policy.buffer.eval()
    x = torch.stack([buffer[i][0] for i in range(len(buffer))])
    with torch.no_grad():  # the commit's statistics: re-estimated on the buffer, as without a restart
        means = torch.stack([model.conv1(xb).mean((0, 2, 3)) for xb in x.split(32)])
    torch.testing.assert_close(model.bn1.running_mean, means.mean(0), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Avalanche's, re-emitted by pytest.warns
def test_restart_warns_about_parameters_without_an_initialisation_and_is_validated():
    class WithLooseParameter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32))
            self.scale = torch.nn.Parameter(torch.ones(32))
            self.classifier = torch.nn.Linear(32, N_CLASSES)

        def forward(self, x):
            return self.classifier(torch.relu(self.features(x) * self.scale))

    warning = r"1 trainable parameter\(s\) were not re-drawn \(no reset_parameters.*'scale'"
    with pytest.warns(UserWarning, match=warning):
        _run(WithLooseParameter(), alignment="none", alpha=0.5, restart=1.0)
    for bad in (-0.1, 2, "1", True):
        with pytest.raises(ValueError, match="restart must be a number in"):
            WeightInterpolationPlugin(restart=bad)
