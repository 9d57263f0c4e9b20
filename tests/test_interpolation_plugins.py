"""Weight interpolation beside Avalanche's plugins and on models off the happy path: every
composition either commits the documented formula or is refused before training."""

from __future__ import annotations

import pytest
import torch
from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
from avalanche.training import DER, ER_ACE, Naive
from avalanche.training.plugins import (
    AGEMPlugin,
    EarlyStoppingPlugin,
    EWCPlugin,
    GEMPlugin,
    LRSchedulerPlugin,
    LwFPlugin,
    ReplayPlugin,
)
from test_interpolation import TrainedRecorder, _mlp, _run
from test_strategy import N_CLASSES, _benchmark, _evaluator
from torch import nn

import avalanche_rebasin.avalanche.interpolation_plugin as plugin_module
from avalanche_rebasin import Stopping, align, discover_spec
from avalanche_rebasin.avalanche.compatibility import AFTER_COMMIT
from avalanche_rebasin.avalanche.interpolation_plugin import InterpolationStrategy, WeightInterpolationPlugin
from avalanche_rebasin.continual.interpolation import alignment_permutations
from avalanche_rebasin.continual.restart import restart_state
from avalanche_rebasin.core.permute import permute_state
from avalanche_rebasin.core.state import model_state


def _strategy(model, plugins=(), **settings):
    settings = {"train_mb_size": 32, "train_epochs": 2, "eval_mb_size": 64, **settings}
    return InterpolationStrategy(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        evaluator=_evaluator(), plugins=[ReplayPlugin(mem_size=60), *plugins], **settings,
    )  # fmt: skip


def test_lwf_and_ewc_move_after_the_commit_and_keep_the_committed_model():
    torch.manual_seed(0)
    model, ewc, lwf = _mlp(), EWCPlugin(ewc_lambda=1.0), LwFPlugin()
    strategy = _strategy(model, [ewc, lwf], alignment="weight_matching", alpha=0.5, restart=1.0)
    order = [type(p) for p in strategy.plugins]
    assert all(order.index(type(strategy.interpolation)) < order.index(c) for c in AFTER_COMMIT)
    for exp in _benchmark().train_stream[:2]:
        strategy.train(exp)
    assert strategy.interpolation.reports[-1].units_moved > 0  # the commit differs from the trained net
    committed = model_state(model)
    assert all(torch.equal(p.data, committed[k]) for k, p in ewc.saved_params[1].items())
    x = torch.randn(16, 1, 4, 4)
    with torch.no_grad():
        assert torch.equal(lwf.lwf.prev_model(x), model(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda m: GEMPlugin(patterns_per_experience=20, memory_strength=0.5),
        lambda m: AGEMPlugin(patterns_per_experience=20, sample_size=20),
        lambda m: EarlyStoppingPlugin(patience=1, val_stream_name="train_stream"),
        lambda m: LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(m[1], step_size=1, gamma=0.5)),
    ],
)
def test_supported_plugins_train_and_the_commit_is_still_the_formula(make):
    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    recorder, alpha = TrainedRecorder(), 0.3
    strategy = InterpolationStrategy(
        model=model, optimizer=optimizer, train_mb_size=32, train_epochs=2, evaluator=_evaluator(),
        plugins=[ReplayPlugin(mem_size=60), make((model, optimizer)), recorder], alignment="none",
        alpha=alpha,
    )  # fmt: skip
    committed = []
    for exp in _benchmark().train_stream[:2]:
        strategy.train(exp)
        committed.append({k: v.clone() for k, v in model_state(model).items()})
    for name, old in committed[0].items():
        expected = torch.lerp(old, recorder.trained[1][name], alpha)
        torch.testing.assert_close(committed[1][name], expected, rtol=0, atol=1e-7)


def test_periodic_evaluation_ends_on_the_committed_model():
    torch.manual_seed(0)
    model, bench = _mlp(), _benchmark()
    strategy = _strategy(model, alignment="none", alpha=0.0, eval_every=1, train_epochs=1)
    for exp in bench.train_stream[:2]:
        strategy.train(exp, eval_streams=[bench.test_stream])
    key = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
    reported = strategy.evaluator.get_last_metrics()[key]  # Avalanche skips its own final pass here
    assert reported == strategy.eval(bench.test_stream)[key]


class Masked(nn.Module):
    """An additive mask buffer holding -inf (class 0 is never predicted)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, N_CLASSES)
        self.register_buffer("mask", torch.tensor([float("-inf")] + [0.0] * (N_CLASSES - 1)))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1)))) + self.mask


@pytest.mark.parametrize("alignment", ["none", "weight_matching", "sinkhorn_mid"])
def test_a_mask_buffer_of_minus_infinity_survives_the_commit_and_the_restart(alignment):
    torch.manual_seed(0)
    model = Masked()
    strategy = _strategy(model, alignment=alignment, alpha=0.5, restart=0.5, align_steps=5)
    for exp in _benchmark().train_stream[:2]:
        strategy.train(exp)
    assert torch.equal(model.mask, Masked().mask)
    assert torch.isfinite(model(torch.randn(4, 1, 4, 4))[:, 1:]).all()
    mixed = restart_state({"m": model.mask}, {"m": Masked().mask}, 0.3)["m"]
    assert torch.equal(mixed, model.mask)


def test_align_accepts_a_mask_buffer_and_still_refuses_a_non_finite_weight():
    torch.manual_seed(0)
    a, b = Masked(), Masked()
    spec = discover_spec(a, torch.zeros(1, 16))
    assert align(a, b, spec=spec, progress=False, stopping=Stopping(max_steps=3)).steps >= 0
    with torch.no_grad():
        b.fc1.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"model_b has NaN or infinite values in 'fc1\.weight'"):
        align(a, b, spec=spec, progress=False, stopping=Stopping(max_steps=3))


class WithPReLU(nn.Module):
    """Per-unit PReLU slopes: permutation discovery has no rule for them."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.PReLU(32), nn.Linear(32, N_CLASSES))

    def forward(self, x):
        return self.net(x)


def test_a_model_discovery_refuses_is_refused_before_the_first_experience_trains():
    torch.manual_seed(0)
    model = WithPReLU()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = _strategy(model, alignment="weight_matching")
    with pytest.raises(ValueError, match="prelu"):
        strategy.train(_benchmark().train_stream[0])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_plain_averaging_needs_no_permutation_spec():
    torch.manual_seed(0)
    model, recorder = WithPReLU(), TrainedRecorder()
    strategy = _strategy(model, [recorder], alignment="none", alpha=0.5)
    committed = []
    for exp in _benchmark().train_stream[:2]:
        strategy.train(exp)
        committed.append({k: v.clone() for k, v in model_state(model).items()})
    for name, old in committed[0].items():
        torch.testing.assert_close(committed[1][name], torch.lerp(old, recorder.trained[1][name], 0.5))


def _bn_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, N_CLASSES)
    )


def test_batchnorm_reestimation_merges_a_last_batch_of_one_sample():
    torch.manual_seed(0)
    strategy = _strategy(_bn_mlp(), alignment="weight_matching", align_samples=33)
    for exp in _benchmark().train_stream[:2]:
        strategy.train(exp)
    assert strategy.interpolation.reports[-1].align_samples == 33


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_at_the_ends_commits_that_network_batchnorm_statistics_included(alpha):
    torch.manual_seed(0)
    model = _bn_mlp()
    _, recorder, committed, _ = _run(model, alignment="weight_matching", alpha=alpha)
    end = committed[0] if alpha == 0.0 else recorder.trained[1]
    reference = _bn_mlp()
    reference.load_state_dict(end)
    x = torch.randn(32, 1, 4, 4)
    for mode in ("eval", "train"):
        getattr(model, mode)(), getattr(reference, mode)()
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)


def test_the_alignment_reads_the_networks_without_dropout_and_leaves_the_model_alone(monkeypatch):
    modes: list[bool] = []

    def spy(old, new, *args, **kwargs):
        modes.extend(m.training for net in (old, new) for m in net.modules() if isinstance(m, nn.Dropout))
        return alignment_permutations(old, new, *args, **kwargs), 0.0

    monkeypatch.setattr(plugin_module, "timed_alignment", spy)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, N_CLASSES)
    )
    strategy = _strategy(model, alignment="sinkhorn_mid", align_steps=5)
    for exp in _benchmark().train_stream[:2]:
        strategy.train(exp)
    assert modes == [False, False] and model[3].training  # the user's module keeps its mode


def test_checkpoint_between_experiences_resumes_bit_identically(tmp_path):
    def make():
        torch.manual_seed(0)
        return _strategy(_mlp(), alignment="weight_matching", restart=0.5, seed=2, train_epochs=1)

    bench, path = _benchmark(), str(tmp_path / "ckpt.pkl")
    strategy = make()
    strategy.train(bench.train_stream[0])
    save_checkpoint(strategy, path)
    for i, exp in enumerate(bench.train_stream[1:], 1):
        torch.manual_seed(100 + i)
        strategy.train(exp)
    resumed, start = maybe_load_checkpoint(make(), path)
    assert start == 1
    for i, exp in enumerate(bench.train_stream[1:], 1):
        torch.manual_seed(100 + i)
        resumed.train(exp)
    expected, got = model_state(strategy.model), model_state(resumed.model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert len(resumed.interpolation.reports) == 2


def test_a_frozen_batchnorm_keeps_its_statistics_through_commit_reestimation_and_restart():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(),  # a frozen "pretrained" block
        nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32, affine=False)),  # frozen; its BN follows it
        nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, N_CLASSES),
    )  # fmt: skip
    for p in [*model[1].parameters(), *model[2].parameters(), *model[4].parameters()]:
        p.requires_grad_(False)
    with torch.no_grad():
        model[2].running_mean.uniform_(-1, 1)
    strategy = _strategy(model, alignment="weight_matching", alpha=0.5, restart=0.5)
    first, second = _benchmark().train_stream[:2]
    strategy.train(first)  # training in train mode updates its statistics (Avalanche's doing, no commit yet)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    strategy.train(second)
    after = model.state_dict()
    assert all(torch.equal(old[k], after[k]) for k in old if k.startswith(("1.", "2.", "4.")))  # θ_old's
    assert not torch.equal(old["6.running_mean"], after["6.running_mean"])  # trainable: re-estimated


def test_tensor_alphas_take_the_longest_matching_module_path():
    from avalanche_rebasin.continual.interpolation import tensor_alphas

    names = ["features.0.weight", "features.0.bias", "features.10.weight", "classifier.weight"]
    alphas = tensor_alphas(names, 0.3, {"features": 0.6, "features.0": 0.9})
    assert alphas == {
        "features.0.weight": 0.9, "features.0.bias": 0.9, "features.10.weight": 0.6, "classifier.weight": 0.3,
    }  # fmt: skip
    assert tensor_alphas(names, 0.3, None) == 0.3
    with pytest.raises(ValueError, match=r"no parameter or buffer lies under \['head'\]"):
        tensor_alphas(names, 0.3, {"head": 1.0})


def test_layer_alpha_takes_the_head_from_the_trained_network_and_interpolates_the_rest():
    torch.manual_seed(0)
    model, recorder = _mlp(), TrainedRecorder()
    strategy = _strategy(model, [recorder], alignment="none", alpha=0.3, layer_alpha={"classifier": 1.0})
    committed = []
    for exp in _benchmark().train_stream[:2]:
        strategy.train(exp)
        committed.append({k: v.clone() for k, v in model_state(model).items()})
    for name, old in committed[0].items():
        weight = 1.0 if name.startswith("classifier.") else 0.3
        expected = torch.lerp(old, recorder.trained[1][name], weight)
        torch.testing.assert_close(committed[1][name], expected, rtol=0, atol=1e-7)


class TiedHead(nn.Module):
    def __init__(self, tie: bool = True):
        super().__init__()
        self.body, self.head = nn.Linear(16, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, N_CLASSES)
        if tie:
            self.head.weight = self.body.weight

    def forward(self, x):
        return self.out(torch.relu(self.head(torch.relu(self.body(x.flatten(1))))))


def test_layer_alpha_reaches_a_tied_weight_through_every_name_and_refuses_two_alphas_for_it():
    from avalanche_rebasin.continual.interpolation import tensor_aliases, tensor_alphas

    model = TiedHead()
    names, aliases = model_state(model), tensor_aliases(model)
    assert aliases["body.weight"] == ["body.weight", "head.weight"]
    alphas = tensor_alphas(names, 0.5, {"head": 1.0, "body": 1.0}, aliases)
    assert alphas["body.weight"] == 1.0 and alphas["head.bias"] == 1.0 and alphas["out.weight"] == 0.5
    with pytest.raises(ValueError, match=r"body.weight and head.weight are one tensor \(tied\)"):
        tensor_alphas(names, 0.5, {"head": 1.0}, aliases)
    shared = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    twice = nn.Sequential(shared[0], nn.ReLU(), shared[0])  # module 2 holds tensors only by sharing
    assert tensor_alphas(model_state(twice), 0.5, {"0": 0.9, "2": 0.9}, tensor_aliases(twice)) == {
        "0.weight": 0.9, "0.bias": 0.9,
    }  # fmt: skip
    strategy = _strategy(TiedHead(), alignment="none", alpha=0.5, layer_alpha={"head": 1.0})
    with pytest.raises(ValueError, match="one tensor"):
        strategy.train(_benchmark().train_stream[0])


def test_a_layer_alpha_path_the_model_lacks_is_refused_before_training():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = _strategy(model, alignment="none", layer_alpha={"head": 1.0})
    with pytest.raises(ValueError, match="no parameter or buffer lies under"):
        strategy.train(_benchmark().train_stream[0])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_mix_keeps_the_nearer_side_where_an_infinity_would_make_nan_and_is_lerp_elsewhere():
    from avalanche_rebasin.core.state import mix

    inf = float("inf")
    a, b = torch.tensor([1.0, -inf, 3.0, -inf]), torch.tensor([-inf, 2.0, inf, -inf])
    assert torch.equal(mix(a, b, 0.0), a) and torch.equal(mix(a, b, 1.0), b)
    assert torch.equal(mix(a, b, 0.25), torch.tensor([-inf, -inf, inf, -inf]))
    x, y = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    (mix(x, y, 0.3) ** 2).sum().backward()
    gx, gy = x.grad.clone(), y.grad.clone()
    x.grad, y.grad = None, None
    (torch.lerp(x, y, 0.3) ** 2).sum().backward()
    assert torch.equal(gx, x.grad) and torch.equal(gy, y.grad)
    restarted = restart_state({"m": torch.tensor([3.0])}, {"m": torch.tensor([inf])}, 1.0)["m"]
    assert torch.equal(restarted, torch.tensor([inf]))


def test_single_sample_batches_are_joined_wherever_they_fall_and_one_sample_is_refused_with_batchnorm():
    from avalanche_rebasin.avalanche.interpolation_plugin import _without_single_samples

    batches = [(torch.zeros(n, 2), torch.zeros(n)) for n in (1, 4, 1, 3, 1)]
    sizes = [len(y) for _, y in _without_single_samples(batches)]
    assert min(sizes) >= 2 and sum(sizes) == 10
    model = _bn_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = _strategy(model, alignment="none", align_samples=1)
    with pytest.raises(ValueError, match="align_samples >= 2 or bn_reestimate=False"):
        strategy.train(_benchmark().train_stream[0])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_nan_buffer_is_refused_before_the_first_experience_trains():
    model = Masked()
    model.mask[1] = float("nan")
    before = {k: v.clone() for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match="the model has NaN values in 'mask'"):
        _strategy(model, alignment="none").train(_benchmark().train_stream[0])
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in before.items())


def test_the_early_spec_check_leaves_the_global_generator_alone_when_a_sample_draws():
    from types import SimpleNamespace

    from avalanche_rebasin.avalanche.interpolation_plugin import WeightInterpolationPlugin

    class Drawing(torch.utils.data.Dataset):  # like RandomRotation: reading a sample draws from torch
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(1, 4, 4), 0

    plugin = WeightInterpolationPlugin(alignment="weight_matching")
    strategy = SimpleNamespace(
        model=_mlp(), device="cpu", plugins=[ReplayPlugin(mem_size=10), plugin],
        experience=SimpleNamespace(dataset=Drawing()),
    )  # fmt: skip
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    plugin.before_training_exp(strategy)
    assert torch.equal(torch.rand(2), expected)


@pytest.mark.parametrize("template", [DER, ER_ACE], ids=["DER", "ER_ACE"])
def test_on_der_and_er_ace_the_commit_is_the_formula_aligned_on_their_own_memory(template):
    torch.manual_seed(0)
    model, recorder, alpha = _mlp(), TrainedRecorder(), 0.3
    interpolation = WeightInterpolationPlugin(  # restart: trained from afresh, so units move
        alpha=alpha, alignment="weight_matching", align_data="buffer", restart=1.0
    )
    read = []
    original = plugin_module._alignment_batches

    def spy(plugin, strategy):
        batches = original(plugin, strategy)
        read.append((sum(len(y) for _, y in batches), len(strategy.storage_policy.buffer)))
        return batches

    strategy = template(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), mem_size=30, batch_size_mem=8,
        train_mb_size=32, train_epochs=2, eval_mb_size=64, evaluator=_evaluator(),
        plugins=[recorder, interpolation],
    )  # fmt: skip
    committed = []
    plugin_module._alignment_batches = spy
    try:
        for exp in _benchmark().train_stream:
            strategy.train(exp)
            committed.append({k: v.clone() for k, v in model_state(model).items()})
    finally:
        plugin_module._alignment_batches = original
    spec = discover_spec(model, torch.randn(2, 1, 4, 4))
    for i in (1, 2):
        old, new = _mlp(), _mlp()
        old.load_state_dict(committed[i - 1])
        new.load_state_dict(recorder.trained[i])
        perms = alignment_permutations(old, new, spec, "weight_matching")
        assert interpolation.reports[i - 1].units_moved > 0  # the alignment moved units
        aligned = permute_state(recorder.trained[i], spec, perms)
        for name, value in committed[i].items():
            torch.testing.assert_close(value, torch.lerp(committed[i - 1][name], aligned[name], alpha))
    # BatchNorm-free and weight matching: no data is read; with a BatchNorm model the memory is
    assert read == []
    assert [r.align_samples for r in interpolation.reports] == [0, 0]


@pytest.mark.parametrize("template", [DER, ER_ACE], ids=["DER", "ER_ACE"])
def test_on_der_and_er_ace_the_data_driven_alignment_reads_the_whole_memory_current_experience_included(
    template,
):
    torch.manual_seed(0)
    model = _bn_mlp()
    interpolation = WeightInterpolationPlugin(alpha=0.5, alignment="activation_matching", align_data="buffer")
    strategy = template(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), mem_size=30, batch_size_mem=8,
        train_mb_size=32, train_epochs=1, eval_mb_size=64, evaluator=_evaluator(), plugins=[interpolation],
    )  # fmt: skip
    bench = _benchmark()
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    memory = strategy.storage_policy.buffer
    assert interpolation.reports[-1].align_samples == len(memory) == 30
    classes = {int(y) for y in memory.targets}
    assert set(bench.train_stream[1].classes_in_this_experience) <= classes  # the new experience is in it


def test_der_keeps_the_trained_networks_logits_for_the_new_samples_not_the_committed_ones():
    torch.manual_seed(0)
    model, recorder = _mlp(), TrainedRecorder()
    strategy = DER(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), mem_size=30, batch_size_mem=8,
        train_mb_size=32, train_epochs=2, eval_mb_size=64, evaluator=_evaluator(),
        plugins=[recorder, WeightInterpolationPlugin(alpha=0.5, alignment="none")],
    )  # fmt: skip
    bench = _benchmark()
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    trained = _mlp()
    trained.load_state_dict(recorder.trained[1])
    new_classes = bench.train_stream[1].classes_in_this_experience
    new = [g for c, g in strategy.storage_policy.buffer_groups.items() if c in new_classes]
    x, _, _, logits = next(iter(torch.utils.data.DataLoader(new[0].buffer.eval(), batch_size=100)))
    with torch.no_grad():
        torch.testing.assert_close(logits, trained(x))
        assert not torch.allclose(logits, model(x), atol=1e-3)  # the committed network differs


def test_buffer_alignment_without_any_replay_memory_is_refused_naming_the_fix():
    torch.manual_seed(0)
    model = _mlp()
    strategy = Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), evaluator=_evaluator(),
        plugins=[WeightInterpolationPlugin(alignment="activation_matching", align_data="buffer")],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"ReplayPlugin.*DER, ER_ACE.*align_data='experience'"):
        strategy.train(_benchmark().train_stream[0])
