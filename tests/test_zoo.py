"""The reach zoo's fast subset: third-party timm and transformers models (random init, tiny
configurations) keep their function under a random permutation of the discovered spec, in
eval and train mode; weight matching and Sinkhorn C_L2 undo a hidden permutation exactly.
The whole zoo is ``benchmarks/zoo.py``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from avalanche_rebasin import (
    Stopping,
    align,
    discover_spec,
    permute,
    random_permutation,
    weight_matching,
)
from avalanche_rebasin_experiments.zoo import FAST, ZOO_BY_NAME, check_entry, flat_outputs

pytest.importorskip("timm")
pytest.importorskip("transformers")


@pytest.mark.parametrize("name", FAST)
def test_zoo_model_is_permuted_without_changing_its_function(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = check_entry(ZOO_BY_NAME[name])
    assert result.verdict == "preserved", result.reason
    assert result.groups >= 3 and result.untouched


def _spec_of(name):
    entry = ZOO_BY_NAME[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = entry.build().eval()
    return model, entry.example(), discover_spec(model, entry.example())


def test_attention_heads_are_groups_in_timm_vit_gpt2_and_grouped_query_llama():
    _, _, vit = _spec_of("vit_tiny_patch16_224")
    assert any(g.endswith(".heads") and n == 2 for g, n in vit.group_sizes.items())  # timm's fused qkv
    _, _, gpt2 = _spec_of("gpt2")
    assert sum(g.endswith(".heads") for g in gpt2.group_sizes) == 2  # one per layer, Conv1D's addmm
    _, _, llama = _spec_of("llama")  # 4 query heads share 2 key/value heads
    heads = [g for g in llama.group_sizes if g.endswith(".heads")]
    assert len(heads) == 2 and all(llama.group_sizes[g] == 2 for g in heads)
    q = llama.axes["model.layers.0.self_attn.q_proj.weight"][0]
    assert q.inner == 16  # a key/value head moves its 2 query heads of 8 dimensions with it


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "gpt2", "llama"])
def test_weight_matching_and_sinkhorn_recover_a_hidden_permutation(name):
    model, _, spec = _spec_of(name)
    perms = random_permutation(spec, torch.Generator().manual_seed(3))
    hidden = permute(model, spec, perms)
    wm = weight_matching(model, hidden, spec=spec)
    recovered = permute(hidden, spec, wm)
    assert all(
        torch.equal(a, b) for a, b in zip(recovered.state_dict().values(), model.state_dict().values())
    )
    res = align(
        model, hidden, spec=spec, cost="l2", init="identity", progress=False, stopping=Stopping(max_steps=300)
    )
    recovered = permute(hidden, spec, res.permutations)
    assert all(
        torch.equal(a, b) for a, b in zip(recovered.state_dict().values(), model.state_dict().values())
    )


class _KeywordModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, *, scale=None):
        h = torch.relu(self.fc1(x))
        return {"logits": self.fc2(h * (1.0 if scale is None else scale))}


@pytest.mark.parametrize("form", ["dict", "args-kwargs"])
def test_example_input_may_be_keywords(form):
    model, x = _KeywordModel(), torch.randn(5, 4)
    example = {"x": x, "scale": 2.0} if form == "dict" else ((x,), {"scale": 2.0})
    spec = discover_spec(model, example)
    assert spec.group_sizes == {"fc1": 8}
    permuted = permute(model, spec, random_permutation(spec, torch.Generator().manual_seed(0)))
    a, b = flat_outputs(model(x, scale=2.0)), flat_outputs(permuted(x, scale=2.0))
    assert torch.allclose(a[0], b[0], atol=1e-6)
    wm = weight_matching(model, permuted, example_input=example)
    assert torch.equal(wm["fc1"].sort().values, torch.arange(8))


def _tiny_vit(classes: int) -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, in_chans=1, embed_dim=16,
        depth=1, num_heads=2, num_classes=classes, drop_rate=0.0,
    )  # fmt: skip


def test_rebasin_on_a_timm_vit_commits_its_formula():
    from avalanche.training.plugins import ReplayPlugin
    from test_strategy import N_CLASSES, _benchmark, _recording, _stream_accuracy

    from avalanche_rebasin import permute_state

    torch.manual_seed(0)
    bench = _benchmark(image=True)
    model = _tiny_vit(N_CLASSES)
    strategy, recorder = _recording(model, plugins=[ReplayPlugin(mem_size=30)], alpha=0.3)
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
        results = strategy.eval(bench.test_stream)
    theta, hard, delta, spec = recorder.recorded
    assert any(g.endswith(".heads") for g in spec.group_sizes)  # the fused qkv's heads are permuted
    permuted = permute_state(theta, spec, hard)
    for name, value in model.named_parameters():
        expected = 0.7 * theta[name] + 0.3 * permuted[name] + delta[name]
        torch.testing.assert_close(value.detach(), expected, rtol=1e-6, atol=1e-6)
    assert 0.0 <= _stream_accuracy(results) <= 1.0


def test_interpolation_on_a_timm_vit_commits_its_formula_with_the_heads_aligned():
    from test_interpolation import _plugin_perms, _run

    from avalanche_rebasin.core.state import model_state

    alpha = 0.3
    strategy, recorder, committed, _ = _run(
        _tiny_vit(6), image=True, alignment="weight_matching", alpha=alpha
    )
    model = strategy.model
    spec = discover_spec(model, torch.zeros(1, 1, 16, 16))
    assert any(g.endswith(".heads") for g in spec.group_sizes)
    old, new = _tiny_vit(6), _tiny_vit(6)
    old.load_state_dict(committed[0])
    new.load_state_dict(recorder.trained[1])
    aligned = permute(new, spec, _plugin_perms(strategy, old, new, spec))
    probe = torch.randn(8, 1, 16, 16)
    assert (aligned.eval()(probe) - new.eval()(probe)).abs().max() <= 1e-5  # π(θ_new) computes θ_new
    expected = {k: (1 - alpha) * committed[0][k] + alpha * v for k, v in model_state(aligned).items()}
    for name, value in committed[1].items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)


def test_timm_vit_rebasin_checkpoint_resumes_bit_identically_with_periodic_evaluation(tmp_path):
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
    from avalanche.training.plugins import ReplayPlugin
    from test_strategy import N_CLASSES, _benchmark, _strategy, _stream_accuracy

    bench = _benchmark(image=True)

    def build():
        torch.manual_seed(0)
        model = _tiny_vit(N_CLASSES)
        return _strategy(model, plugins=[ReplayPlugin(mem_size=30)], alpha=0.3, eval_every=1)

    def train(strategy, exp):
        torch.manual_seed(100 + exp.current_experience)  # same data order in both runs
        return strategy.train(exp, eval_streams=[bench.test_stream])

    uninterrupted = build()
    for exp in bench.train_stream[:2]:
        periodic = train(uninterrupted, exp)
        assert 0.0 <= _stream_accuracy(periodic) <= 1.0  # the last periodic evaluation
    interrupted = build()
    train(interrupted, bench.train_stream[0])
    save_checkpoint(interrupted, str(tmp_path / "ckpt.pkl"))
    resumed, start = maybe_load_checkpoint(build(), str(tmp_path / "ckpt.pkl"))
    assert start == 1
    train(resumed, bench.train_stream[1])
    for (name, a), b in zip(uninterrupted.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert len(resumed.reports) == len(uninterrupted.reports) == 1
