"""The architectures people merge: concatenation, grouped norms, recurrent nets, attention and
transformers, transposed convolutions. Each must keep its function under every discovered
permutation (eval and train mode, 1e-5) and a random permutation must be recovered exactly."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from rebasin_testkit import assert_function_preserved, assert_recovered
from torch import nn

from avalanche_rebasin import discover_spec, permute, random_permutation

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")


class Inception(nn.Module):
    """Branches concatenated along channels, and a U-Net style skip concatenation."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, width, 3, padding=1)
        self.b1 = nn.Conv2d(width, 4, 1)
        self.b3 = nn.Sequential(nn.Conv2d(width, 3, 1), nn.ReLU(), nn.Conv2d(3, 5, 3, padding=1))
        self.pool_proj = nn.Conv2d(width, 2, 1)
        self.norm = nn.BatchNorm2d(11)
        self.down = nn.Conv2d(11, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 7, 2, stride=2)
        self.head = nn.Conv2d(7 + 11, 3, 1)

    def forward(self, x):
        h = F.relu(self.stem(x))
        pooled = F.max_pool2d(h, 3, stride=1, padding=1)
        mixed = F.relu(self.norm(torch.cat([self.b1(h), self.b3(h), self.pool_proj(pooled)], dim=1)))
        skip = torch.cat([F.relu(self.up(F.relu(self.down(mixed)))), mixed], dim=1)
        return self.head(skip).mean((2, 3))


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(2, 16)
        self.conv2, self.gn2 = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.conv3, self.gn3 = nn.Conv2d(16, 8, 3, padding=1), nn.GroupNorm(8, 8)  # one channel per group
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.gn1(self.conv1(x)))
        h = h + F.relu(self.gn2(self.conv2(h)))  # the residual stream meets two group counts
        return self.fc(F.relu(self.gn3(self.conv3(h))).mean((2, 3)))


class RecurrentClassifier(nn.Module):
    def __init__(self, kind: type[nn.RNNBase] = nn.LSTM, bidirectional: bool = False, **kwargs) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.rnn = kind(8, 6, num_layers=2, batch_first=True, bidirectional=bidirectional, **kwargs)
        out = kwargs.get("proj_size", 0) or 6
        self.fc = nn.Linear(out * (2 if bidirectional else 1), 3)

    def forward(self, x):
        out, state = self.rnn(torch.relu(self.embed(x)))
        h = state[0] if isinstance(state, tuple) else state
        last = torch.cat([h[-2], h[-1]], dim=1) if self.rnn.bidirectional else h[-1]
        return self.fc(last) + out.mean(1).sum(1, keepdim=True)


class HandWrittenAttention(nn.Module):
    """Pre-LN block with fused qkv, heads split by view, SDPA or explicit softmax(q kᵀ) v."""

    def __init__(self, sdpa: bool, width: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.embed, self.norm = nn.Linear(5, width), nn.LayerNorm(width)
        self.qkv, self.proj, self.head = (
            nn.Linear(width, 3 * width),
            nn.Linear(width, width),
            nn.Linear(width, 3),
        )
        self.heads, self.sdpa = heads, sdpa

    def forward(self, x):
        h = self.embed(x)
        b, n, e = h.shape
        q, k, v = (
            t.view(b, n, self.heads, e // self.heads).transpose(1, 2)
            for t in self.qkv(self.norm(h)).chunk(3, -1)
        )
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(e // self.heads), -1) @ v
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, e))
        return self.head(torch.einsum("bne->be", h))


def _vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=28, patch_size=7, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    )


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return nn.Sequential(
        nn.Linear(5, 8), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(8, 3)
    )


CASES = {
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=10), (2, 3, 64, 64)),
    "squeezenet1_0": (lambda: torchvision.models.squeezenet1_0(num_classes=10), (2, 3, 96, 96)),
    "inception_unet": (Inception, (2, 2, 8, 8)),
    "groupnorm_resnet18": (
        lambda: torchvision.models.resnet18(num_classes=10, norm_layer=lambda c: nn.GroupNorm(4, c)),
        (2, 3, 32, 32),
    ),
    "groupnorm_net": (GroupNormNet, (2, 3, 6, 6)),
    "lstm2": (RecurrentClassifier, (2, 7, 5)),
    "lstm2_bidirectional_proj": (lambda: RecurrentClassifier(nn.LSTM, True, proj_size=4), (2, 7, 5)),
    "gru2_bidirectional": (lambda: RecurrentClassifier(nn.GRU, True), (2, 7, 5)),
    "rnn2": (lambda: RecurrentClassifier(nn.RNN, nonlinearity="relu"), (2, 7, 5)),
    "transformer_encoder": (_encoder, (2, 7, 5)),
    "vision_transformer": (_vit, (2, 3, 28, 28)),
    "attention_sdpa": (lambda: HandWrittenAttention(True), (2, 7, 5)),
    "attention_matmul": (lambda: HandWrittenAttention(False), (2, 7, 5)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_function_is_preserved(name):
    factory, shape = CASES[name]
    torch.manual_seed(0)
    model = factory()
    spec = assert_function_preserved(model, torch.randn(*shape))
    assert len(spec) > 0


@pytest.mark.parametrize(
    "name", ["densenet121", "squeezenet1_0", "inception_unet", "groupnorm_net", "lstm2_bidirectional_proj",
             "gru2_bidirectional", "vision_transformer", "attention_sdpa", "transformer_encoder"]
)  # fmt: skip
def test_weight_matching_recovers_a_random_permutation(name):
    factory, shape = CASES[name]
    torch.manual_seed(1)
    assert_recovered(factory(), torch.randn(*shape), "weight_matching")


@pytest.mark.parametrize(
    "name", ["inception_unet", "groupnorm_net", "lstm2", "vision_transformer", "attention_matmul"]
)
def test_sinkhorn_l2_alignment_recovers_a_random_permutation(name):
    factory, shape = CASES[name]
    torch.manual_seed(2)
    assert_recovered(factory(), torch.randn(*shape), "align")


def test_concatenation_is_one_segment_per_branch():
    spec = discover_spec(Inception(), torch.randn(2, 2, 8, 8))
    parts = spec.axes["down.weight"][1]
    assert [(p.group, p.offset) for p in parts] == [("b1", 0), ("b3.2", 4), ("pool_proj", 9)]
    head = spec.axes["head.weight"][1]
    assert [(p.group, p.offset) for p in head] == [("up", 0), ("b1", 7), ("b3.2", 11), ("pool_proj", 16)]


def test_groupnorm_keeps_units_inside_their_groups():
    spec = discover_spec(GroupNormNet(), torch.randn(2, 3, 6, 6))
    stream = spec.axes["conv1.weight"][0].group
    assert spec.blocks(stream) == 4  # 2 and 4 groups of channels: blocks of 4 refine both
    assert spec.axes["conv3.weight"][0].group == "conv3" and spec.blocks("conv3") == 1
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10, norm_layer=lambda c: nn.GroupNorm(4, c))
    spec = discover_spec(resnet, torch.randn(2, 3, 32, 32))
    group = spec.axes["layer1.0.conv1.weight"][0].group
    assert spec.blocks(group) == 4
    index = random_permutation(spec, torch.Generator().manual_seed(0))[group]
    assert torch.equal(index // 16, torch.arange(64) // 16)  # channel c stays in group c // 16
    with pytest.raises(ValueError, match="moves units between its 4 blocks"):
        permute(resnet, spec, {**random_permutation(spec), group: torch.arange(64).flip(0)})


def test_multihead_attention_permutes_heads_and_dimensions_within_heads():
    model = _vit()
    spec = discover_spec(model, torch.randn(2, 3, 28, 28))
    prefix = "encoder.layers.encoder_layer_0.self_attention."
    rows = spec.axes[prefix + "in_proj_weight"][0]
    groups = [(p.group.removeprefix(prefix), p.inner, p.offset) for p in rows]
    assert groups == [
        ("qk", 1, 0),
        ("heads", 8, 0),
        ("qk", 1, 16),
        ("heads", 8, 16),
        ("v", 1, 32),
        ("heads", 8, 32),
    ]
    assert spec.blocks(prefix + "qk") == spec.blocks(prefix + "v") == 2
    assert spec.axes["class_token"][2].group == spec.axes["conv_proj.weight"][0].group
    assert spec.axes["encoder.pos_embedding"][2].group == spec.axes["conv_proj.weight"][0].group


def test_lstm_gates_and_directions_share_the_hidden_units():
    model = RecurrentClassifier(nn.LSTM, True)
    spec = discover_spec(model, torch.randn(2, 7, 5))
    rows = spec.axes["rnn.weight_ih_l0"][0]
    assert (rows.group, rows.outer) == ("rnn.l0", 4)
    assert spec.axes["rnn.weight_hh_l0_reverse"][1].group == "rnn.l0_reverse"
    inputs = spec.axes["rnn.weight_ih_l1"][1]
    assert [(p.group, p.offset) for p in inputs] == [("rnn.l0", 0), ("rnn.l0_reverse", 6)]
    assert [(p.group, p.offset) for p in spec.axes["fc.weight"][1]] == [("rnn.l1", 0), ("rnn.l1_reverse", 6)]


def test_a_nonzero_initial_state_pins_the_hidden_units():
    class Seeded(RecurrentClassifier):
        def __init__(self) -> None:
            super().__init__(nn.GRU)
            self.h0 = nn.Parameter(torch.randn(2, 1, 6))

        def forward(self, x):
            out, _ = self.rnn(torch.relu(self.embed(x)), self.h0.expand(2, x.shape[0], 6).contiguous())
            return self.fc(out[:, -1])

    spec = assert_function_preserved(Seeded(), torch.randn(2, 7, 5))
    assert not any(g.startswith("rnn") for g in spec.groups)


def test_conv_transpose_anywhere():
    model = nn.Sequential(
        nn.ConvTranspose1d(2, 5, 3), nn.ReLU(), nn.ConvTranspose1d(5, 4, 2, stride=2), nn.Conv1d(4, 2, 1)
    )
    spec = assert_function_preserved(model, torch.randn(2, 2, 6))
    assert spec.axes["0.weight"][1].group == spec.axes["2.weight"][0].group


def test_compiled_model_is_traced_through_its_original_module():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    compiled = torch.compile(model)
    spec = discover_spec(compiled, torch.randn(2, 4))
    assert spec.axes["_orig_mod.0.weight"][0].group == "0"
    permuted = permute(compiled, spec, random_permutation(spec, torch.Generator().manual_seed(0)))
    x = torch.randn(3, 4)
    assert (permuted._orig_mod(x) - model(x)).abs().max() < 1e-6  # eager: no compilation in the suite


class EncoderDecoder(nn.Module):
    """nn.Transformer with a causal target mask: cross-attention reads the encoder's stream."""

    def __init__(self) -> None:
        super().__init__()
        self.source, self.target, self.out = nn.Linear(5, 8), nn.Linear(4, 8), nn.Linear(8, 3)
        self.transformer = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True)

    def forward(self, x, y):
        mask = nn.Transformer.generate_square_subsequent_mask(y.shape[1])
        return self.out(self.transformer(self.source(x), self.target(y), tgt_mask=mask))


def test_encoder_decoder_transformer_with_a_causal_mask():
    torch.manual_seed(0)
    spec = assert_function_preserved(EncoderDecoder(), (torch.randn(2, 7, 5), torch.randn(2, 4, 4)))
    assert "transformer.decoder.layers.0.multihead_attn.heads" in spec.groups
    # the cross-attention's shared input projection ties the decoder's stream to the encoder's
    cross = spec.axes["transformer.decoder.layers.0.multihead_attn.in_proj_weight"][1]
    assert cross.group == spec.axes["source.weight"][0].group == spec.axes["target.weight"][0].group
