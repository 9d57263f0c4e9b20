"""Models that once got a silently wrong spec, were mutated by discovery, or crashed unclearly.

Each must now be permuted correctly (function preserved in eval and train mode) or refused."""

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F
from rebasin_testkit import assert_function_preserved, assert_state_equal, state_copy
from torch import nn

from avalanche_rebasin import (
    UnsupportedOperationError,
    discover_spec,
    permute,
    random_permutation,
)


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def hidden(self, x):
        return torch.relu(self.fc1(x))


class TiedAutoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 5)

    def forward(self, x):
        return F.linear(torch.relu(self.enc(x)), self.enc.weight.t())  # decodes with enc's weight


class SlicedWeight(TwoLayer):
    def forward(self, x):
        return self.fc2(self.hidden(x)) + F.linear(x, self.fc1.weight[:3])


class ReducedWeight(TwoLayer):
    def __init__(self) -> None:
        super().__init__()
        self.fc3 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(self.hidden(x)) + self.fc3(self.fc1.weight.sum(0))


class NamespaceOutput(TwoLayer):
    def forward(self, x):
        return types.SimpleNamespace(logits=self.fc2(self.hidden(x)), extra=[{"h": self.hidden(x)}])


@dataclasses.dataclass
class Output:
    logits: torch.Tensor


class DataclassOutput(TwoLayer):
    def forward(self, x):
        return Output(self.fc2(self.hidden(x)))


class CachesFeatures(TwoLayer):
    def forward(self, x):
        self.features = self.hidden(x)  # read later by a loss or a hook: must keep its layout
        return self.fc2(self.features)


class TrainOnlyBranch(TwoLayer):
    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(6, 6)

    def forward(self, x):
        h = self.hidden(x)
        if self.training:
            h = h + self.aux(h)  # a branch the eval-mode trace never sees
        return self.fc2(h)


class PermuteDims(TwoLayer):
    def forward(self, x):
        h = torch.permute(self.hidden(x).unsqueeze(0), dims=(1, 0, 2)).squeeze(1)
        return self.fc2(h)


@pytest.mark.parametrize(
    "model",
    [
        TiedAutoencoder,
        SlicedWeight,
        ReducedWeight,
        DataclassOutput,
        CachesFeatures,
        TrainOnlyBranch,
        PermuteDims,
    ],
)
def test_formerly_silent_wrong_answers_now_preserve_the_function(model):
    torch.manual_seed(0)
    assert_function_preserved(model(), torch.randn(3, 4 if model is not TiedAutoencoder else 6))


def test_outputs_inside_any_object_are_never_permuted():
    torch.manual_seed(0)
    model, x = NamespaceOutput(), torch.randn(3, 4)
    spec = discover_spec(model, x)
    assert spec.groups == [] or "fc2" not in spec.groups
    permuted = permute(model, spec, random_permutation(spec, torch.Generator().manual_seed(0)))
    a, b = model(x), permuted(x)
    assert (a.logits - b.logits).abs().max() < 1e-6
    assert (a.extra[0]["h"] - b.extra[0]["h"]).abs().max() < 1e-6  # hidden units returned: pinned


def test_tied_decoder_ties_both_axes_of_the_shared_weight():
    spec = discover_spec(TiedAutoencoder(), torch.randn(3, 6))
    assert spec.axes["enc.weight"][0].group == "enc" and spec.axes["enc.weight"][1] is None


def test_train_only_branch_joins_the_group_it_adds_to():
    spec = discover_spec(TrainOnlyBranch(), torch.randn(3, 4))
    assert spec.axes["aux.weight"][0].group == spec.axes["fc1.weight"][0].group


class SelfMutating(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6, max_norm=1.0)  # renormalises its rows in place when called
        self.fc, self.drop = nn.Linear(6, 2), nn.Dropout(0.5)  # draws random numbers in train mode
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, tokens):
        self.calls += 1
        return self.fc(self.drop(torch.relu(self.embed(tokens))))


def test_discovery_never_runs_or_modifies_the_model():
    torch.manual_seed(0)
    model = SelfMutating()
    with torch.no_grad():
        model.embed.weight.mul_(5.0)  # rows longer than max_norm: a forward would shrink them
    tokens = torch.randint(0, 10, (4,))
    before, rng = state_copy(model), torch.get_rng_state()
    model.train()
    spec = discover_spec(model, tokens)
    assert_state_equal(model, before)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert spec.axes["embed.weight"][1].group == "embed"


def test_model_that_fails_in_train_mode_is_explained():
    class EvalOnly(TwoLayer):
        def forward(self, x):
            if self.training:
                raise RuntimeError("call model.eval() first")
            return self.fc2(self.hidden(x))

    with pytest.raises(RuntimeError, match=r"train mode on example_input.*call model.eval\(\) first"):
        discover_spec(EvalOnly(), torch.randn(3, 4))


def test_model_without_parameters_has_an_empty_spec():
    spec = discover_spec(
        nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4, affine=False)), torch.randn(3, 4)
    )
    assert len(spec) == 0


def test_a_weight_computed_from_an_activation_is_refused():
    class HyperNet(TwoLayer):
        def forward(self, x):
            h = self.hidden(x)
            return F.linear(h, h.t() @ h)

    with pytest.raises(
        UnsupportedOperationError, match=r"two permuted axes|computed from a permuted activation"
    ):
        discover_spec(HyperNet(), torch.randn(3, 4))


class ParameterAsInput(TwoLayer):
    """A per-unit bias also fed to a layer as data: it must not be permuted for one use only."""

    def __init__(self) -> None:
        super().__init__()
        self.bias, self.read = nn.Parameter(torch.randn(6)), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.hidden(x) + self.bias) + self.read(self.bias)


class LearnedQueries(nn.Module):
    """Cross-attention from learned latent queries (Perceiver/DETR style)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Linear(5, 8), nn.Linear(8, 2)
        self.queries = nn.Parameter(torch.randn(1, 3, 8))
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attention(self.queries.expand(x.shape[0], -1, -1), h, h)
        return self.out(a + self.queries)


def test_parameters_used_as_data_are_never_permuted_for_one_use_only():
    torch.manual_seed(0)
    assert_function_preserved(ParameterAsInput(), torch.randn(3, 4))
    spec = assert_function_preserved(LearnedQueries(), torch.randn(2, 7, 5))
    assert "attention.heads" in spec.groups


def test_normalize_is_followed():
    class Projection(TwoLayer):
        def forward(self, x):
            return self.fc2(F.normalize(self.hidden(x), dim=-1))  # a contrastive head's unit norm

    spec = assert_function_preserved(Projection(), torch.randn(3, 4))
    assert spec.groups == ["fc1"]


def test_a_module_that_is_not_deep_copyable_is_refused_not_written_into():
    class Singleton(nn.Linear):
        def __deepcopy__(self, memo):
            return self  # "copies" share the weights

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), Singleton(6, 3))
    before = state_copy(model)
    with pytest.raises(TypeError, match=r"shares '2.weight' with the original"):
        discover_spec(model, torch.randn(3, 4))
    assert_state_equal(model, before)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_compiled_or_scripted_submodules_are_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    model[2] = torch.jit.script(model[2])
    with pytest.raises(UnsupportedOperationError, match=r"'2' is a TorchScript module"):
        discover_spec(model, torch.randn(3, 4))


def test_permute_refuses_a_copy_that_would_write_into_the_original():
    class Singleton(nn.Linear):
        def __deepcopy__(self, memo):
            return self

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), Singleton(6, 3))
    spec = discover_spec(
        nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), torch.randn(3, 4)
    )
    before = state_copy(model)
    with pytest.raises(TypeError, match=r"shares '2\.weight'"):
        permute(model, spec, random_permutation(spec))
    assert_state_equal(model, before)
