"""The harness's strong baselines (DER++, ER-ACE, ER-AML, GDumb, GEM, iCaRL, SI, MAS): each token
builds Avalanche's strategy on the shared memory, its overrides reach the constructor, bad ones
and impossible settings are refused before anything runs, and the memory-based ones train."""

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import DER, ER_ACE, ER_AML, GEM, MAS, GDumb, ICaRL, SynapticIntelligence
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin, SupervisedPlugin

from avalanche_rebasin_experiments import cli, runner, strategies

EXPERIENCES = 2
STRONG = {
    "der": DER, "er-ace": ER_ACE, "er-aml": ER_AML, "gdumb": GDumb, "gem": GEM, "icarl": ICaRL,
    "si": SynapticIntelligence, "mas": MAS,
}  # fmt: skip


def _args(*argv: str):
    """Split MNIST in 2 experiences (the authors' memory: 5 × 5 classes × 2 = 50 images), batch 4."""
    args = cli.make_parser().parse_args(
        ["--benchmark", "split-mnist", "--experiences", str(EXPERIENCES), "--batch-size", "4", *argv]
    )
    cli.resolve_defaults(args)
    return args


def _build(token: str, args=None):
    return strategies.build(token, args or _args(), 0, EvaluationPlugin(loggers=[]))


def _plugin(strategy, name: str):
    return next(p for p in strategy.plugins if type(p).__name__ == name)


def _memory(strategy) -> int:
    """The memory size as the built strategy holds it (GEM: its share per experience × experiences)."""
    if isinstance(strategy, DER | ER_ACE | ER_AML):
        assert strategy.storage_policy.max_size == strategy.mem_size
        return strategy.mem_size
    if isinstance(strategy, GDumb):
        gdumb = _plugin(strategy, "GDumbPlugin")
        assert gdumb.storage_policy.max_size == gdumb.mem_size
        return gdumb.mem_size
    if isinstance(strategy, GEM):
        return _plugin(strategy, "GEMPlugin").patterns_per_experience * EXPERIENCES
    return _plugin(strategy, "_ICaRLPlugin").memory_size


def _replay_size(args) -> int:
    return next(p for p in _build("replay", args).plugins if isinstance(p, ReplayPlugin)).mem_size


@pytest.mark.parametrize("name", ["der", "er-ace", "er-aml", "gdumb", "gem", "icarl"])
def test_memory_baselines_get_replay_s_memory_and_both_ways_to_change_it(name):
    default = _build(name)
    assert type(default) is STRONG[name]
    assert _memory(default) == _replay_size(_args()) == 50
    flag = _args("--mem-size", "60")
    assert _memory(_build(name, flag)) == _replay_size(flag) == 60
    assert _memory(_build(f"{name}+mem_size=40", flag)) == 40


@pytest.mark.parametrize("name", ["si", "mas"])
def test_regularisation_baselines_build_with_their_defaults(name):
    strategy = _build(name)
    assert type(strategy) is STRONG[name]
    if name == "si":
        assert _plugin(strategy, "SynapticIntelligencePlugin").si_lambda == [1.0]
    else:
        mas = _plugin(strategy, "MASPlugin")
        assert (mas._lambda, mas.alpha) == (1.0, 0.5)  # Avalanche's defaults


def test_overrides_reach_the_constructors():
    der = _build("der+alpha=0.3+beta=0+batch_size_mem=5")
    assert (der.alpha, der.beta, der.batch_size_mem) == (0.3, 0, 5)
    assert (_build("der").batch_size_mem, _build("er-ace").batch_size_mem) == (4, 10)  # Avalanche's
    # Avalanche's default, capped at the memory: DER replays a training batch, ER-ACE 10 samples
    assert _build("der", _args("--batch-size", "60")).batch_size_mem == 50
    assert _build("er-ace+mem_size=9").batch_size_mem == 9
    assert _build("er-ace+batch_size_mem=7").batch_size_mem == 7
    aml = _build("er-aml+temp=0.5+base_temp=0.1+batch_size_mem=3").aml_criterion
    assert (aml.temp, aml.base_temp) == (0.5, 0.1)
    gem = _plugin(_build("gem+patterns_per_exp=7+memory_strength=0.2"), "GEMPlugin")
    assert (gem.patterns_per_experience, gem.memory_strength) == (7, 0.2)
    assert _plugin(_build("si+si_lambda=3"), "SynapticIntelligencePlugin").si_lambda == [3]
    mas = _plugin(_build("mas+lambda_reg=2+alpha=0.25"), "MASPlugin")
    assert (mas._lambda, mas.alpha) == (2, 0.25)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("der+batch_size_mem=0", "batch_size_mem must be an integer >= 1, got 0"),
        ("der+gamma=1", "unknown setting 'gamma'; der overrides one of ['mem_size', 'batch_size_mem', "),
        ("er-ace+mem_size=2.5", "mem_size must be an integer >= 1, got 2.5"),
        ("er-aml+temp=0", "temp must be a finite number > 0, got 0"),
        ("gem+patterns_per_exp=2.5", "patterns_per_exp must be an integer >= 1, got 2.5"),
        ("gem+memory_strength=-1", "memory_strength must be a finite number >= 0, got -1"),
        ("si+si_lambda=abc", "si_lambda must be a finite number >= 0, got 'abc'"),
        ("mas+lambda_reg=inf", "lambda_reg must be a finite number >= 0"),
        ("gdumb+batch_size_mem=4", "unknown setting 'batch_size_mem'; gdumb overrides one of ['mem_size']"),
        ("icarl:midpoint", "presets apply only to"),
    ],
)
def test_bad_overrides_are_refused_with_the_rule(token, message):
    with pytest.raises(ValueError) as err:
        strategies.parse_strategy(token)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("token", "argv", "message"),
    [
        ("der+batch_size_mem=51", (), "mem_size 50 never fills one replay batch of batch_size_mem 51"),
        ("er-ace+mem_size=9+batch_size_mem=10", (), "mem_size 9 never fills one replay batch of"),
        ("er-aml", ("--batch-size", "8"), "give +mem_size=80 or more, or a smaller --batch-size"),
        ("er-aml", ("--model", "slimresnet18"), "--model one of ['mlp1', 'mlp2', 'mlp3', 'cnn']"),
        ("gem+mem_size=1", (), "mem_size 1 leaves no pattern for each of 2 experiences"),
        ("gem+mem_size=10+patterns_per_exp=5", (), "set mem_size (split over the experiences) or"),
    ],
)
def test_settings_that_could_never_replay_or_would_hang_are_refused(token, argv, message):
    with pytest.raises(ValueError) as err:
        _build(token, _args(*argv))
    assert message in str(err.value)


def test_icarl_is_refused_on_a_domain_incremental_benchmark_before_any_work(tmp_path, monkeypatch, capsys):
    def no_model(num_classes):
        raise AssertionError("a model was built")

    monkeypatch.setitem(strategies.MODELS, "mlp1", no_model)
    args = _args("--benchmark", "rotated-mnist")
    with pytest.raises(ValueError, match=r"iCaRL .* needs a class-incremental benchmark .*'split-mnist'"):
        _build("icarl", args)
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("a strategy ran"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--strategies", "icarl", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c")])
    assert exit_info.value.code == 2
    assert "--strategies 'icarl': iCaRL learns the classes each experience adds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match=r"--model one of .*, not slimresnet18"):
        _build("icarl", _args("--benchmark", "split-cifar100", "--model", "slimresnet18"))


def test_the_default_sweep_is_unchanged_by_the_strong_baselines():
    assert not set(STRONG) & set(cli.DEFAULT_STRATEGIES)
    assert len(cli.DEFAULT_STRATEGIES) == 13  # the demo's "[k/13]" run counter (docs/index.md)


def _tiny_stream(classes: int = 4, per_class: int = 24):
    """28×28 images around one random centre per class, ``classes / 2`` new classes per experience."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, 1, 28, 28, generator=g)

    def sample():
        y = torch.arange(classes).repeat_interleave(per_class)
        return _make_taskaware_tensor_classification_dataset(
            centres[y] + 0.3 * torch.randn(len(y), 1, 28, 28, generator=g), y
        )

    return nc_benchmark(
        sample(), sample(), n_experiences=EXPERIENCES, task_labels=False, seed=0,
        fixed_class_order=list(range(classes)),
    )  # fmt: skip


class _ReplaySeen(SupervisedPlugin):
    """Per training iteration: (experience, whether the strategy drew a batch from its memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, bool]] = []

    def after_training_iteration(self, strategy, **kwargs):
        self.seen.append((strategy.clock.train_exp_counter, strategy.replay_loader is not None))


def _train(token: str, plugins: list[SupervisedPlugin]) -> tuple[object, float]:
    """Train ``token`` as the harness does on the tiny stream; the final stream accuracy."""
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    strategy = strategies.build(token, _args("--epochs", "1"), 0, evaluator)
    strategy.plugins.extend(plugins)
    bench = _tiny_stream()
    for experience in bench.train_stream:
        strategy.train(experience)
    results = strategy.eval(bench.test_stream)
    return strategy, results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]


@pytest.mark.parametrize("name", ["der", "er-ace", "er-aml"])
def test_replay_baselines_train_two_experiences_and_replay_in_the_second(name):
    seen = _ReplaySeen()
    strategy, accuracy = _train(name, [seen])
    assert {replayed for exp, replayed in seen.seen if exp == 0} == {False}
    assert {replayed for exp, replayed in seen.seen if exp == 1} == {True}
    assert 0 < len(strategy.storage_policy.buffer) <= 50 and 0.0 <= accuracy <= 1.0


def test_icarl_and_gem_train_two_experiences_on_the_shared_memory():
    icarl, accuracy = _train("icarl", [])
    exemplars = _plugin(icarl, "_ICaRLPlugin")
    assert sorted(y[0] for y in exemplars.y_memory) == [0, 1, 2, 3]
    assert [len(x) for x in exemplars.x_memory] == [13] * 4  # Avalanche's share: ceil(50 / 4) a class
    assert accuracy > 0.9  # nearest class mean on the MLP's features, well-separated classes
    gem, _ = _train("gem", [])
    memory = _plugin(gem, "GEMPlugin").memory_x
    assert sorted(memory) == [0, 1] and all(len(x) == 25 for x in memory.values())


def test_strong_baselines_are_listed_in_the_help():
    options = cli.make_parser()._option_string_actions
    assert all(f"'{name}'" in options["--strategies"].help for name in STRONG)
    assert "der, er-ace, er-aml, gdumb, gem and icarl" in options["--mem-size"].help


def test_auto_alpha_holds_a_tenth_of_the_memory_out_of_replay_and_refuses_a_memory_it_would_empty():
    replay = _plugin(_build("interp"), "ReplayPlugin")
    interpolation = _plugin(_build("interp"), "WeightInterpolationPlugin")
    assert (interpolation.config.alpha, interpolation.config.holdout_samples) == ("auto", 2)
    assert replay.storage_policy.max_size == 50 - 2 * EXPERIENCES
    assert _plugin(_build("interp+alpha=0.5"), "ReplayPlugin").storage_policy.max_size == 50
    with pytest.raises(ValueError, match="holdout_samples=30 per experience out of a memory of 50"):
        _build("interp+holdout_samples=30")


def test_our_plugins_on_der_and_er_ace_take_both_sets_of_settings_and_the_shared_memory():
    from avalanche_rebasin.avalanche.interpolation_plugin import WeightInterpolationPlugin
    from avalanche_rebasin.avalanche.plugin import RebasinPlugin

    composed = _build("interp-der+alpha=0.3+alignment=none+der_alpha=0.2+der_beta=0+batch_size_mem=5")
    assert type(composed) is DER and (composed.alpha, composed.beta, composed.batch_size_mem) == (0.2, 0, 5)
    interpolation = next(p for p in composed.plugins if isinstance(p, WeightInterpolationPlugin))
    assert (interpolation.config.alpha, interpolation.config.alignment) == (0.3, "none")
    assert _memory(composed) == 50  # a fixed α holds nothing out
    auto = _build("interp-er-ace+mem_size=40")  # α "auto": a tenth of the memory is held out
    held = next(p for p in auto.plugins if isinstance(p, WeightInterpolationPlugin)).config.holdout_samples
    assert (held, _memory(auto) + held * EXPERIENCES) == (2, 40)
    rebasin = _build("rebasin-er-ace:midpoint+alpha=0.4", _args("--mem-size", "60", "--epochs", "3"))
    plugin = next(p for p in rebasin.plugins if isinstance(p, RebasinPlugin))
    assert type(rebasin) is ER_ACE and _memory(rebasin) == 60
    config = plugin.config
    assert (config.alpha, config.delta_optimizer, config.rebasin_epochs) == (0.4, "adam", 3)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("interp-der+der_alpha=-1", "der_alpha must be a finite number >= 0, got -1"),
        ("interp-der+beta=1", "unknown setting 'beta'; interp-der overrides one of"),
        ("interp-er-ace+der_alpha=1", "unknown setting 'der_alpha'; interp-er-ace overrides one of"),
        ("rebasin-der+seed=3", "'seed' is set by the harness"),
    ],
)
def test_bad_settings_of_the_composed_entries_are_refused(token, message):
    with pytest.raises(ValueError) as err:
        strategies.parse_strategy(token)
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["interp-der", "interp-er-ace", "rebasin-der:midpoint", "rebasin-er-ace"])
def test_our_plugins_on_der_and_er_ace_train_replay_and_commit_once_per_later_experience(name):
    seen = _ReplaySeen()
    strategy, accuracy = _train(name, [seen])
    assert {replayed for exp, replayed in seen.seen if exp == 1} == {True}  # the template still replays
    reports = next(p.reports for p in strategy.plugins if hasattr(p, "commits_to_model"))
    assert len(reports) == 1 and 0.0 <= accuracy <= 1.0  # one commit: after the second experience
