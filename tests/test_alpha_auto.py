"""``alpha="auto"``: the interpolation weight chosen at each commit on samples no network
trained on, recomputed here independently of the plugin."""

from __future__ import annotations

import math

import pytest
import torch
from avalanche.training import DER, ER_ACE
from avalanche.training.plugins import ReplayPlugin, SupervisedPlugin
from test_interpolation import TrainedRecorder, _mlp
from test_strategy import _benchmark, _evaluator
from torch import nn

from avalanche_rebasin import discover_spec, permute
from avalanche_rebasin.avalanche.interpolation_plugin import InterpolationStrategy, WeightInterpolationPlugin
from avalanche_rebasin.continual.alpha_search import ALPHA_GRID, balanced_accuracy, choose_alpha
from avalanche_rebasin.continual.config import InterpolationConfig
from avalanche_rebasin.continual.interpolation import alignment_permutations
from avalanche_rebasin.core.state import model_state


class Constant(nn.Module):
    """Predicts class ``c`` whatever the input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = c

    def forward(self, x):
        out = torch.zeros(len(x), 3)
        out[:, self.c] = 1.0
        return out


def test_balanced_accuracy_weighs_every_experience_alike_not_every_sample():
    groups = [
        [(torch.zeros(1, 2), torch.tensor([1]))],
        [(torch.zeros(9, 2), torch.zeros(9, dtype=torch.long))],
    ]
    assert balanced_accuracy(Constant(0), groups) == pytest.approx(0.5)  # 0/1 and 9/9, not 9/10


def test_choose_alpha_takes_the_best_candidate_and_the_smaller_alpha_on_a_tie():
    groups = [[(torch.zeros(4, 2), torch.tensor([0, 0, 1, 2]))]]
    classes = {0.2: 1, 0.5: 0, 0.8: 2, 1.0: 0}  # α 0.5 and 1.0 score 0.5, the others 0.25
    search = choose_alpha([1.0, 0.8, 0.5, 0.2], lambda a: Constant(classes[a]), groups)
    assert search.alpha == 0.5
    assert search.accuracies == {0.2: 0.25, 0.5: 0.5, 0.8: 0.25, 1.0: 0.5}
    assert search.samples == 4
    with pytest.raises(ValueError, match="no held-out samples"):
        choose_alpha([0.5], lambda a: Constant(0), [[]])


class Scaled(Constant):
    """Predicts class 0 with logits scaled by ``t`` (same accuracy, another cross-entropy)."""

    def __init__(self, t: float) -> None:
        super().__init__(0)
        self.t = t

    def forward(self, x):
        return self.t * super().forward(x)


def test_an_accuracy_tie_goes_to_the_lower_cross_entropy():
    groups = [[(torch.zeros(4, 2), torch.tensor([0, 0, 0, 1]))]]  # class 0 is right 3 times in 4
    search = choose_alpha([0.2, 0.6, 1.0], lambda a: Scaled({0.2: 0.1, 0.6: 1.0, 1.0: 8.0}[a]), groups)
    assert set(search.accuracies.values()) == {0.75}
    assert search.alpha == min(search.losses, key=search.losses.get) == 0.6


@pytest.mark.parametrize(
    "settings, word",
    [
        ({"alpha": "best"}, "alpha"),
        ({"alpha_grid": ()}, "alpha_grid"),
        ({"alpha_grid": (0.5, 1.5)}, "alpha_grid"),
        ({"alpha_grid": "0.5"}, "alpha_grid"),
        ({"holdout_samples": 0}, "holdout_samples"),
        ({"holdout_fraction": 1.5}, "holdout_fraction"),
    ],
)
def test_bad_auto_settings_are_refused_naming_the_setting(settings, word):
    with pytest.raises(ValueError, match=word):
        InterpolationConfig(**settings)


class TrainingBatches(SupervisedPlugin):
    """Every input the network trained on, and the held-out samples as each commit reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.held_at_commit: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def before_forward(self, strategy, **kwargs):
        if strategy.is_training:
            self.seen.append(strategy.mb_x.detach().clone())

    def after_training_exp(self, strategy, **kwargs):  # runs before the commit (placed after it)
        plugin = getattr(strategy, "interpolation", None)
        if plugin is not None:
            self.held_at_commit.append(list(plugin.held_out.groups))


def _auto_run(**settings):
    torch.manual_seed(0)
    bench = _benchmark()
    model, recorder, batches = _mlp(), TrainedRecorder(), TrainingBatches()
    strategy = InterpolationStrategy(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), train_mb_size=32,
        train_epochs=2, eval_mb_size=64, evaluator=_evaluator(),
        plugins=[ReplayPlugin(mem_size=60), recorder, batches], **settings,
    )  # fmt: skip
    committed = []
    for exp in bench.train_stream:
        strategy.train(exp)
        committed.append({k: v.clone() for k, v in model_state(model).items()})
    return strategy, bench, model, recorder, batches, committed


@pytest.mark.parametrize("samples, fraction", [(None, None), (5, 0.25)], ids=["defaults", "fraction"])
def test_auto_withholds_its_samples_from_training_and_commits_the_best_alpha_on_them(samples, fraction):
    settings = {"holdout_samples": samples, "holdout_fraction": fraction}
    settings = {k: v for k, v in settings.items() if v is not None}
    strategy, bench, model, recorder, batches, committed = _auto_run(alignment="weight_matching", **settings)
    plugin = strategy.interpolation
    assert plugin.config.alpha == "auto"  # the default a user gets
    kept = plugin.config.holdout_samples
    held = plugin.held_out.groups
    assert [len(y) for _, y in held] == [kept] * 3
    at_commit, fraction = batches.held_at_commit, plugin.config.holdout_fraction
    current = [max(kept, math.ceil(fraction * len(e.dataset))) for e in _benchmark().train_stream]
    assert [[len(y) for _, y in groups] for groups in at_commit] == [
        [kept] * e + [current[e]] for e in range(3)
    ]
    trained_on = torch.cat(batches.seen).flatten(1)
    for x, _ in at_commit[-1]:  # no held-out sample in any training batch, replayed ones included
        assert not (torch.cdist(x.flatten(1), trained_on) < 1e-6).any()
    fresh = [len(e.dataset) for e in _benchmark().train_stream]
    assert [len(e.dataset) for e in bench.train_stream] == fresh  # the user's experiences untouched
    replay = next(p for p in strategy.plugins if isinstance(p, ReplayPlugin))
    stored = torch.stack(
        [replay.storage_policy.buffer.eval()[i][0] for i in range(len(replay.storage_policy.buffer))]
    )
    for x, _ in held:  # nor in the memory, the last experience's share included
        assert not (torch.cdist(x.flatten(1), stored.flatten(1)) < 1e-6).any()
    spec = discover_spec(model, torch.zeros(1, 1, 4, 4))
    for e, report in enumerate(plugin.reports, start=1):
        old, new = _mlp(), _mlp()
        old.load_state_dict(committed[e - 1])
        new.load_state_dict(recorder.trained[e])
        perms = alignment_permutations(old, new, spec, "weight_matching")
        aligned = model_state(permute(new, spec, perms))
        groups = [[(x, y)] for x, y in at_commit[e]]  # every experience so far, this one included
        accuracies = {}
        for a in ALPHA_GRID:
            candidate = _mlp()
            candidate.load_state_dict({k: (1 - a) * committed[e - 1][k] + a * aligned[k] for k in aligned})
            accuracies[a] = balanced_accuracy(candidate, groups)
        assert report.alpha_search.accuracies == pytest.approx(accuracies)
        best_accuracy = max(accuracies.values())
        assert accuracies[report.alpha] == best_accuracy
        tied = [a for a, acc in accuracies.items() if acc == best_accuracy]
        assert report.alpha_search.losses[report.alpha] == min(report.alpha_search.losses[a] for a in tied)
        for name, value in committed[e].items():
            expected = (1 - report.alpha) * committed[e - 1][name] + report.alpha * aligned[name]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
        assert report.alpha_search.samples == kept * e + current[e]


def test_a_fixed_alpha_withholds_nothing():
    strategy, *_, batches, _ = _auto_run(alpha=0.5)
    assert strategy.interpolation.held_out.groups == []
    assert sum(len(x) for x in batches.seen) > 0


def test_auto_leaves_the_global_generator_alone_and_refuses_an_experience_it_would_empty():
    torch.manual_seed(0)
    bench = _benchmark()
    model = _mlp()
    strategy = InterpolationStrategy(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), train_mb_size=32, train_epochs=1,
        evaluator=_evaluator(), plugins=[ReplayPlugin(mem_size=60)], holdout_samples=80,
    )  # fmt: skip
    kept = model_state(model)
    with pytest.raises(ValueError, match=r"withholding 80 of them \(holdout_samples=80.* none to train on"):
        strategy.train(bench.train_stream[0])
    assert all(torch.equal(v, kept[k]) for k, v in model_state(model).items())
    assert strategy.interpolation.held_out.groups == []


def _held_out_in(dataset, held) -> bool:
    stored = torch.stack([dataset.eval()[i][0] for i in range(len(dataset))]).flatten(1)
    return any(bool((torch.cdist(x.flatten(1), stored) < 1e-6).any()) for x, _ in held)


@pytest.mark.parametrize("template", [DER, ER_ACE], ids=["DER", "ER_ACE"])
def test_auto_on_der_and_er_ace_chooses_from_the_grid_and_der_never_stores_a_held_out_sample(template):
    torch.manual_seed(0)
    model, batches = _mlp(), TrainingBatches()
    strategy = template(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), mem_size=30, batch_size_mem=8,
        train_mb_size=32, train_epochs=2, eval_mb_size=64, evaluator=_evaluator(),
        plugins=[batches, WeightInterpolationPlugin(alignment="weight_matching")],
    )  # fmt: skip
    for exp in _benchmark().train_stream:
        strategy.train(exp)
    plugin = next(p for p in strategy.plugins if isinstance(p, WeightInterpolationPlugin))
    assert [r.alpha in ALPHA_GRID for r in plugin.reports] == [True, True]
    if template is DER:  # DER fills its memory at the experience's end, from the training part
        assert not _held_out_in(strategy.storage_policy.buffer, plugin.held_out.groups)
        trained_on = torch.cat(batches.seen).flatten(1)
        assert not any(
            bool((torch.cdist(x.flatten(1), trained_on) < 1e-6).any()) for x, _ in plugin.held_out.groups
        )


def test_an_error_in_the_search_rolls_the_held_out_memory_and_the_experience_back(monkeypatch):
    torch.manual_seed(0)
    bench, model = _benchmark(), _mlp()
    strategy = InterpolationStrategy(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), train_mb_size=32, train_epochs=1,
        evaluator=_evaluator(), plugins=[ReplayPlugin(mem_size=60)],
    )  # fmt: skip
    strategy.train(bench.train_stream[0])
    kept = model_state(model)

    def broken(*args, **kwargs):
        raise RuntimeError("search broke")

    monkeypatch.setattr("avalanche_rebasin.avalanche.interpolation_plugin.choose_alpha", broken)
    with pytest.raises(RuntimeError, match="search broke"):
        strategy.train(bench.train_stream[1])
    assert len(strategy.interpolation.held_out.groups) == 1
    assert strategy.interpolation.held_out._experience is None
    assert all(torch.equal(v, kept[k]) for k, v in model_state(model).items())
    monkeypatch.undo()
    strategy.train(bench.train_stream[1])  # trained again: one new group, not two
    assert len(strategy.interpolation.held_out.groups) == 2
