import torch
from rebasin_testkit import SmallCNN, mlp, randomize_batchnorm

from avalanche_rebasin import (
    discover_spec,
    invert_permutation,
    permute,
    random_permutation,
    weight_matching,
)


def test_weight_matching_recovers_two_hidden_layer_mlp():
    torch.manual_seed(0)
    model = mlp(2, width=32)
    x = torch.randn(2, 20)
    spec = discover_spec(model, x)
    perms = random_permutation(spec, torch.Generator().manual_seed(5))
    model_b = permute(model, spec, perms)
    found = weight_matching(model, model_b, spec=spec)
    expected = invert_permutation(perms)
    assert found.keys() == spec.group_sizes.keys()
    for group, idx in found.items():
        assert idx.dtype == torch.int64 and idx.shape == (spec.group_sizes[group],)
        assert torch.equal(idx, expected[group])


def test_weight_matching_returns_valid_permutations_for_unrelated_cnns():
    torch.manual_seed(0)
    model_a = randomize_batchnorm(SmallCNN(), torch.Generator().manual_seed(0))
    model_b = randomize_batchnorm(SmallCNN(), torch.Generator().manual_seed(1))
    found = weight_matching(model_a, model_b, example_input=torch.randn(1, 1, 16, 16))
    for idx in found.values():
        assert torch.equal(torch.sort(idx).values, torch.arange(len(idx)))
    # the matched model is at least as close to model_a as the unmatched one
    spec = discover_spec(model_a, torch.randn(1, 1, 16, 16))
    matched = permute(model_b, spec, found)
    keys = [k for k, _ in model_a.named_parameters()]

    def dist(m):
        return sum(
            ((dict(model_a.named_parameters())[k] - dict(m.named_parameters())[k]) ** 2).sum() for k in keys
        )

    assert dist(matched) < dist(model_b)


class _Attention(torch.nn.Module):
    """torch's MultiheadAttention calls its out_proj's weights directly, never out_proj itself."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(4, 8)
        self.att = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out((h + self.att(h, h, h)[0]).mean(1))


class _LooseScale(torch.nn.Module):
    """A per-unit Parameter on the root module: the root's output (logits) carries no units."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.classifier = torch.nn.Linear(6, 12), torch.nn.Linear(12, 3)
        self.scale = torch.nn.Parameter(torch.rand(12) + 0.5)

    def forward(self, x):
        return self.classifier(torch.relu(self.hidden(x) * self.scale))


def test_activation_matching_undoes_a_hidden_permutation_past_a_root_level_parameter():
    from avalanche_rebasin.alignment.matching import activation_matching

    torch.manual_seed(0)
    model, x = _LooseScale(), torch.randn(64, 6)
    spec = discover_spec(model, x[:1])
    perms = random_permutation(spec, torch.Generator().manual_seed(1))
    found = activation_matching(model, permute(model, spec, perms), [x], spec=spec)
    assert all(torch.equal(found[g], idx) for g, idx in invert_permutation(perms).items())


def test_activation_matching_names_the_groups_no_module_output_shows_and_keeps_them_identity():
    import pytest

    from avalanche_rebasin.alignment.matching import activation_matching

    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(16, 5, 4)
    spec = discover_spec(model, x[:1])
    other = permute(model, spec, random_permutation(spec, torch.Generator().manual_seed(1)))
    with pytest.warns(UserWarning, match=r"stay the identity: \[.*'att\.") as caught:
        found = activation_matching(model, other, [x], spec=spec)
    assert caught[0].filename == __file__  # the warning points at the caller
    unseen = [g for g in spec.group_sizes if g.startswith("att.")]
    assert unseen and all(torch.equal(found[g], torch.arange(spec.group_sizes[g])) for g in unseen)
    with torch.no_grad():  # whatever it found, it is a permutation: the function is kept
        torch.testing.assert_close(permute(other, spec, found)(x), other(x), rtol=0, atol=1e-5)
