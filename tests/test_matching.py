import torch
from rebasin_testkit import SmallCNN, mlp, randomize_batchnorm

from avalanche_rebasin import (
    PermutationSpec,
    invert_permutation,
    permute,
    random_permutation,
    weight_matching,
)


def test_weight_matching_recovers_two_hidden_layer_mlp():
    torch.manual_seed(0)
    model = mlp(2, width=32)
    x = torch.randn(2, 20)
    spec = PermutationSpec.from_model(model, x)
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
    spec = PermutationSpec.from_model(model_a, torch.randn(1, 1, 16, 16))
    matched = permute(model_b, spec, found)
    keys = [k for k, _ in model_a.named_parameters()]

    def dist(m):
        return sum(
            ((dict(model_a.named_parameters())[k] - dict(m.named_parameters())[k]) ** 2).sum() for k in keys
        )

    assert dist(matched) < dist(model_b)
