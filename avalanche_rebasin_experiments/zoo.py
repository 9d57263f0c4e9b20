"""The reach zoo: third-party architectures from timm and Hugging Face transformers.

Every entry builds a model with random initialisation from a tiny configuration (no
download) and an example input for it. :func:`check_entry` discovers the spec, applies a
random permutation of it and compares the outputs with the original in eval and in train
mode (dropout off), in float64 so that round-off amplified by train-mode BatchNorm on a tiny
batch cannot hide or fake a change. Verdicts:

* ``preserved``: at least one group, and the permuted model computes the same function;
* ``trivial``: discovery found no group to permute;
* ``refused``: discovery raised :class:`UnsupportedOperationError` with a reason;
* ``silent-wrong``: a spec was returned but the permuted model computes something else;
* ``crash``: any other exception (a bug).

timm and transformers are the ``zoo`` extra, never a dependency of the core.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from avalanche_rebasin import discover_spec

__all__ = ["FAST", "ZOO", "ZooEntry", "ZooResult", "check_entry", "flat_outputs"]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str  # "timm" or "transformers"
    build: Callable[[], nn.Module]
    example: Callable[[], Any]  # a tensor, a tuple of positional arguments or a dict of keywords
    dtype: torch.dtype = torch.float64  # float32 for models whose kernels refuse float64


def _image(side: int = 32, channels: int = 3, batch: int = 2) -> Callable[[], Tensor]:
    return lambda: torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(0))


def _timm(name: str, side: int = 32, **config: Any) -> ZooEntry:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.0, **config)

    return ZooEntry(name, "timm", build, _image(side))


def _timm_class(name: str, path: str, side: int = 32, **config: Any) -> ZooEntry:
    """A timm model class built directly (for configurations its named constructors fix)."""

    def build() -> nn.Module:
        import importlib

        module, cls = path.rsplit(".", 1)
        timm_module = importlib.import_module(f"timm.models.{module}")
        for key, value in list(config.items()):
            if isinstance(value, str) and hasattr(timm_module, value):
                config[key] = getattr(timm_module, value)
        return getattr(timm_module, cls)(num_classes=10, **config)

    return ZooEntry(name, "timm", build, _image(side))


_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
_SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2))

TIMM = [
    _timm("vit_tiny_patch16_224", **_VIT),
    _timm("vit_small_patch16_224", **_VIT, qk_norm=True),
    _timm("vit_base_patch16_224", **_VIT, class_token=False, global_pool="avg", reg_tokens=2),
    _timm("deit_tiny_patch16_224", **_VIT),
    _timm("deit_tiny_distilled_patch16_224", **_VIT),
    _timm("deit3_small_patch16_224", **_VIT),
    _timm("cait_xxs24_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
    _timm("pit_ti_224", img_size=32, patch_size=4, stride=2, base_dims=[16, 16], depth=[1, 1], heads=[1, 2]),
    _timm(
        "coat_lite_tiny", img_size=32, embed_dims=[32, 32, 32, 32], serial_depths=[1, 1, 1, 1], num_heads=8
    ),
    _timm("swin_tiny_patch4_window7_224", **_SWIN),
    _timm("swinv2_tiny_window8_256", **_SWIN),
    _timm("beit_base_patch16_224", **_VIT, use_rel_pos_bias=True),
    _timm("eva02_tiny_patch14_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
    _timm_class("mixer", "mlp_mixer.MlpMixer", img_size=32, patch_size=8, embed_dim=32, num_blocks=2),
    _timm_class(
        "resmlp",
        "mlp_mixer.MlpMixer",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        num_blocks=2,
        mlp_ratio=4,
        block_layer="ResBlock",
        norm_layer="Affine",
    ),
    _timm("convit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, local_up_to_layer=1),
    _timm("xcit_nano_12_p16_224", img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2),
    _timm("mobilevit_xxs", side=64),
    _timm("botnet26t_256", side=64, img_size=64),
    _timm("edgenext_xx_small", side=64),
    _timm("levit_128s", img_size=32, side=32),
    _timm("poolformer_s12", side=32),
    _timm("convnext_atto", side=32),
    _timm("resnet18", side=32),
    _timm("resnet50d", side=32),
    _timm("resnetv2_50x1_bit", side=32),
    _timm("nf_resnet26", side=32),
    _timm("efficientnet_b0", side=32),
    _timm("mobilenetv3_small_100", side=32),
    _timm("mobilenetv2_050", side=32),
    _timm("ghostnet_050", side=32),
    _timm("rexnet_100", side=32),
    _timm("dpn48b", side=32),
    _timm("densenet121", side=32),
    _timm("regnety_002", side=32),
    _timm("res2net50_14w_8s", side=32),
    _timm("skresnet18", side=32),
    _timm("cspresnet50", side=32),
    _timm("dla34", side=32),
    _timm("tinynet_e", side=32),
    _timm("repvgg_a0", side=32),
    _timm("lcnet_050", side=32),
    _timm("ese_vovnet19b_dw", side=32),
    _timm("hrnet_w18_small", side=64),
]


def _tokens(vocab: int = 64, length: int = 8, batch: int = 2, mask: bool = True) -> Callable[[], dict]:
    def make() -> dict:
        ids = torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(0))
        out = {"input_ids": ids}
        if mask:
            out["attention_mask"] = torch.ones_like(ids)
        return out

    return make


def _hf(
    name: str,
    config_class: str,
    model_class: str,
    example: Callable[[], Any],
    dtype: torch.dtype = torch.float64,
    **config: Any,
) -> ZooEntry:
    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_class)(**config)
        cfg.use_cache = False  # a returned key/value cache is an output: it would pin every head
        model = getattr(transformers, model_class)(cfg)
        return model

    return ZooEntry(name, "transformers", build, example, dtype)


_LM = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_NO_DROP = dict(attention_dropout=0.0)
_VIT_HF = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
)


def _pixels() -> dict:
    return {"pixel_values": _image()()}


TRANSFORMERS = [
    _hf(
        "gpt2",
        "GPT2Config",
        "GPT2LMHeadModel",
        _tokens(),
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    _hf("llama", "LlamaConfig", "LlamaForCausalLM", _tokens(), **_LM, num_key_value_heads=2, **_NO_DROP),
    _hf("llama-mha", "LlamaConfig", "LlamaForCausalLM", _tokens(), **_LM, num_key_value_heads=4, **_NO_DROP),
    _hf("qwen2", "Qwen2Config", "Qwen2ForCausalLM", _tokens(), **_LM, num_key_value_heads=2, **_NO_DROP),
    _hf(
        "qwen3",
        "Qwen3Config",
        "Qwen3ForCausalLM",
        _tokens(),
        **_LM,
        num_key_value_heads=2,
        head_dim=8,
        **_NO_DROP,
    ),
    _hf(
        "mistral", "MistralConfig", "MistralForCausalLM", _tokens(), **_LM, num_key_value_heads=2, **_NO_DROP
    ),
    _hf(
        "mixtral",
        "MixtralConfig",
        "MixtralForCausalLM",
        _tokens(),
        torch.float32,  # its grouped expert matmul has no float64 kernel
        **_LM,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        **_NO_DROP,
    ),
    _hf(
        "gemma",
        "GemmaConfig",
        "GemmaForCausalLM",
        _tokens(),
        **_LM,
        num_key_value_heads=1,
        head_dim=8,
        **_NO_DROP,
    ),
    _hf("phi", "PhiConfig", "PhiForCausalLM", _tokens(), **_LM, resid_pdrop=0.0, embd_pdrop=0.0, **_NO_DROP),
    _hf("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", _tokens(), **_LM, hidden_dropout=0.0, **_NO_DROP),
    _hf(
        "opt",
        "OPTConfig",
        "OPTForCausalLM",
        _tokens(),
        vocab_size=64,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        dropout=0.0,
        **_NO_DROP,
    ),
    _hf(
        "bert",
        "BertConfig",
        "BertForSequenceClassification",
        _tokens(),
        **_LM,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
    _hf(
        "distilbert",
        "DistilBertConfig",
        "DistilBertModel",
        _tokens(),
        vocab_size=64,
        dim=32,
        hidden_dim=64,
        n_layers=2,
        n_heads=4,
        dropout=0.0,
        attention_dropout=0.0,
    ),
    _hf(
        "roberta",
        "RobertaConfig",
        "RobertaForMaskedLM",
        _tokens(),
        **_LM,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
    _hf(
        "bloom",
        "BloomConfig",
        "BloomForCausalLM",
        _tokens(),
        vocab_size=64,
        hidden_size=32,
        n_layer=2,
        n_head=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    _hf(
        "gptj",
        "GPTJConfig",
        "GPTJForCausalLM",
        _tokens(),
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        rotary_dim=4,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    _hf(
        "falcon",
        "FalconConfig",
        "FalconForCausalLM",
        _tokens(),
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    _hf(
        "starcoder2",
        "Starcoder2Config",
        "Starcoder2ForCausalLM",
        _tokens(),
        **_LM,
        num_key_value_heads=2,
        residual_dropout=0.0,
        embedding_dropout=0.0,
        **_NO_DROP,
    ),
    _hf("clip-vision", "CLIPVisionConfig", "CLIPVisionModel", _pixels, **_VIT_HF, **_NO_DROP),
    _hf(
        "vit-hf",
        "ViTConfig",
        "ViTForImageClassification",
        _pixels,
        **_VIT_HF,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
]

ZOO: list[ZooEntry] = [*TIMM, *TRANSFORMERS]
ZOO_BY_NAME: dict[str, ZooEntry] = {e.name: e for e in ZOO}

# The suite's subset: one model per mechanism the zoo exercises (fast on two cores).
FAST = [
    "vit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "ghostnet_050",
    "nf_resnet26",
    "gpt2",
    "llama",
]


def flat_outputs(output: Any) -> list[Tensor]:
    """Every floating tensor of a model's output (tensors, tuples, dicts, ``ModelOutput``)."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in flat_outputs(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in flat_outputs(v)]
    return []


def _call(model: nn.Module, example: Any) -> Any:
    if isinstance(example, Mapping):
        return model(**example)
    return model(*example) if isinstance(example, tuple) else model(example)


def _to(example: Any, dtype: torch.dtype) -> Any:
    if isinstance(example, Tensor):
        return example.to(dtype) if example.is_floating_point() else example
    if isinstance(example, Mapping):
        return {k: _to(v, dtype) for k, v in example.items()}
    if isinstance(example, tuple):
        return tuple(_to(v, dtype) for v in example)
    return example


def _no_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        if hasattr(module, "drop_prob") and isinstance(module.drop_prob, float):
            module.drop_prob = 0.0


def _max_change(a: nn.Module, b: nn.Module, example: Any, train: bool) -> float:
    a.train(train)
    b.train(train)
    with torch.no_grad():
        outs_a, outs_b = flat_outputs(_call(a, example)), flat_outputs(_call(b, example))
    if len(outs_a) != len(outs_b) or not outs_a:
        return float("inf")
    worst = 0.0
    for x, y in zip(outs_a, outs_b):
        scale = max(1.0, float(x.abs().max()))
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


@dataclass
class ZooResult:
    name: str
    family: str
    verdict: str
    groups: int = 0
    units: int = 0
    seconds: float = 0.0
    change: float = 0.0  # largest relative output change, float64, eval and train mode
    untouched: bool = True  # the model's tensors, train flags and torch's RNG were left alone
    reason: str = ""


def _state_snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}


def _sensitise_(model: nn.Module) -> None:
    """Move every parameter by seeded noise of its own scale, so that a wrong permutation
    shows as a change of order one (random initialisation of transformers is 0.02-small:
    near-uniform attention would hide a wrong head permutation)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                p.add_(noise * (0.5 * float(p.abs().mean()) + 0.05))


def check_entry(entry: ZooEntry, tolerance: float = 1e-6) -> ZooResult:
    """Discover, permute at random and compare (see the module docstring).

    ``tolerance`` is relative to the output's scale, in float64: some models compute parts
    in float32 whatever their dtype (Llama's RMSNorm), which leaves ~1e-7 of round-off; a
    wrong permutation of sensitised weights changes outputs by order one."""
    from avalanche_rebasin import permute, random_permutation
    from avalanche_rebasin.discovery import UnsupportedOperationError

    torch.manual_seed(0)
    model = entry.build().to(entry.dtype)
    _no_dropout(model)
    _sensitise_(model)
    model.eval()
    example = _to(entry.example(), entry.dtype)
    if entry.dtype != torch.float64:
        tolerance = max(tolerance, 1e-5)  # float32 round-off of sensitised weights
    before, rng = _state_snapshot(model), torch.get_rng_state()
    start = time.perf_counter()
    try:
        spec = discover_spec(model, example)
    except UnsupportedOperationError as error:
        return ZooResult(
            entry.name, entry.family, "refused", seconds=time.perf_counter() - start, reason=str(error)
        )
    except Exception as error:  # a bug: any crash that is not a clear refusal
        return ZooResult(entry.name, entry.family, "crash", reason=f"{type(error).__name__}: {error}")
    seconds = time.perf_counter() - start
    after = _state_snapshot(model)
    untouched = (
        before.keys() == after.keys()
        and all(torch.equal(before[k], after[k]) for k in before)
        and torch.equal(rng, torch.get_rng_state())
        and not model.training
    )
    groups, units = len(spec.group_sizes), sum(spec.group_sizes.values())
    if not groups:
        return ZooResult(entry.name, entry.family, "trivial", 0, 0, seconds, 0.0, untouched)
    permuted = permute(model, spec, random_permutation(spec, torch.Generator().manual_seed(1)))
    change = max(_max_change(model, permuted, example, train) for train in (False, True))
    model.eval()
    verdict = "preserved" if change <= tolerance else "silent-wrong"
    return ZooResult(entry.name, entry.family, verdict, groups, units, seconds, change, untouched)
