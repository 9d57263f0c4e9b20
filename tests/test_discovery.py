import pytest
import torch
import torchvision
from rebasin_testkit import SmallCNN, mlp
from torch import nn

from avalanche_rebasin import (
    PermutationSpec,
    UnsupportedOperationError,
    discover_spec,
    permute,
    random_permutation,
)


def test_resnet18_residual_streams_share_one_group():
    model = torchvision.models.resnet18(num_classes=10)
    spec = discover_spec(model, torch.randn(1, 3, 32, 32))
    stream = spec.axes["conv1.weight"][0].group
    # the stem, the first stage's block outputs and their BatchNorms all share one permutation
    for name in ["bn1.weight", "layer1.0.bn2.running_mean", "layer1.1.conv2.weight"]:
        assert spec.axes[name][0].group == stream
    # the downsample branch joins the next stage's stream
    assert spec.axes["layer2.0.downsample.0.weight"][0].group == spec.axes["layer2.0.conv2.weight"][0].group
    assert spec.axes["layer2.0.downsample.0.weight"][1].group == stream
    # the final stream feeds the classifier's input axis; the logits are never permuted
    assert spec.axes["fc.weight"][1].group == spec.axes["layer4.1.conv2.weight"][0].group
    assert spec.axes["fc.weight"][0] is None and "fc.bias" not in spec.axes
    # 4 streams + 8 inner block groups
    assert len(spec) == 12
    assert "num_batches_tracked" not in " ".join(spec.axes)


def test_flatten_between_conv_and_linear_permutes_blocks():
    model = torchvision.models.vgg11_bn(num_classes=10)
    spec = discover_spec(model, torch.randn(1, 3, 32, 32))
    entry = spec.axes["classifier.0.weight"][1]
    assert entry.group == spec.axes["features.25.weight"][0].group
    assert entry.inner == 7 * 7
    cnn_spec = discover_spec(SmallCNN(), torch.randn(1, 1, 16, 16))
    assert cnn_spec.axes["fc.weight"][1].inner == 16


def test_functional_ops_are_followed():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(6, 8)
            self.scale = nn.Parameter(torch.ones(8))
            self.c = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.nn.functional.relu(self.a(x)) + self.b(x)  # a and b must share a group
            h = h * self.scale
            return self.c(torch.flatten(h.unsqueeze(-1), 1))

    model = Functional()
    spec = discover_spec(model, torch.randn(3, 6))
    assert len(spec) == 1
    group = spec.groups[0]
    assert spec.axes["b.weight"][0].group == group and spec.axes["scale"][0].group == group
    x = torch.randn(4, 6)
    permuted = permute(model, spec, random_permutation(spec, torch.Generator().manual_seed(0)))
    assert (model(x) - permuted(x)).abs().max() < 1e-6


class _Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.cumsum(self.fc1(x), dim=-1))


def test_unsupported_op_raises_with_module_and_remedy():
    with pytest.raises(UnsupportedOperationError) as info:
        discover_spec(_Cumsum(), torch.randn(2, 5))
    message = str(info.value)
    assert "cumsum" in message and "unsupported='freeze'" in message and "from_groups" in message


def test_unsupported_layer_names_the_module():
    class WithPatches(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.patches = nn.Unfold(2)  # mixes channels and kernel positions on one axis

        def forward(self, x):
            return self.patches(self.conv(x))

    with pytest.raises(UnsupportedOperationError, match=r"`unfold`.*'patches' \(Unfold\)"):
        discover_spec(WithPatches(), torch.randn(2, 3, 6, 6))


def test_freeze_policy_is_function_preserving():
    model = _Cumsum()
    spec = discover_spec(model, torch.randn(2, 5), unsupported="freeze")
    assert len(spec) == 0  # the only hidden group reaches cumsum, so it stays identity
    two = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), _Cumsum())
    spec2 = discover_spec(two, torch.randn(2, 5), unsupported="freeze")
    assert spec2.groups == ["0"]
    x = torch.randn(3, 5)
    permuted = permute(two, spec2, random_permutation(spec2, torch.Generator().manual_seed(0)))
    assert (two(x) - permuted(x)).abs().max() < 1e-6


def test_concat_along_features_permutes_each_segment_by_its_own_group():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(3, 5), nn.Linear(12, 2)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), x, self.b(x)], dim=1))  # the input stays put

    model = Cat()
    spec = discover_spec(model, torch.randn(2, 3))
    parts = spec.axes["c.weight"][1]
    assert [(p.group, p.offset) for p in parts] == [("a", 0), ("b", 7)]
    x = torch.randn(6, 3)
    permuted = permute(model, spec, random_permutation(spec, torch.Generator().manual_seed(0)))
    assert (model(x) - permuted(x)).abs().max() < 1e-6


def test_manual_spec_and_amendment():
    model = mlp(2, width=8)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    manual = PermutationSpec.from_groups(
        {
            "h1": [("1.weight", 0), ("1.bias", 0), ("3.weight", 1)],
            "h2": [("3.weight", 0), ("3.bias", 0), ("5.weight", 1)],
        },
        shapes,
    )
    auto = discover_spec(model, torch.randn(1, 20))
    assert sorted(manual.group_sizes.values()) == sorted(auto.group_sizes.values())
    x = torch.randn(4, 20)
    permuted = permute(model, manual, random_permutation(manual, torch.Generator().manual_seed(0)))
    assert (model(x) - permuted(x)).abs().max() < 1e-6
    reduced = manual.without_groups("h1")
    assert reduced.groups == ["h2"] and "1.bias" not in reduced.axes
    with pytest.raises(ValueError, match="inconsistent"):
        PermutationSpec.from_groups({"h": [("1.weight", 1), ("5.weight", 1)]}, shapes)
    with pytest.raises(KeyError, match="Unknown groups"):
        manual.without_groups("nope")
    assert "h1 (8)" in manual.summary()


def test_spec_of_other_architecture_is_rejected():
    spec = discover_spec(mlp(2, width=8), torch.randn(1, 20))
    with pytest.raises(ValueError, match=r"another architecture|different architecture"):
        permute(mlp(2, width=9), spec, random_permutation(spec))


def test_tensor_properties_and_setitem_are_followed():
    class Props(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.fc1(x).data * 1.0  # a property that keeps the layout
            out = torch.zeros(x.shape[0], 2)
            out[:, :] = self.fc2(h)  # writing into a fresh tensor
            return out

    model = Props()
    spec = discover_spec(model, torch.randn(3, 4))
    assert spec.groups == ["fc1"]
    x = torch.randn(5, 4)
    permuted = permute(model, spec, random_permutation(spec, torch.Generator().manual_seed(0)))
    assert (model(x) - permuted(x)).abs().max() < 1e-6
