"""nnsae.hooks: every TL hook of every family, checked against HF-native ground truths and TransformerLens itself."""

from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace
from typing import Callable

import nnsight
import pytest
import torch
import transformers

from nnsae.hooks import HookPoint, HookSpec, get_module, resolve_hook, translate_tl_hook
from tests.tiny_models import CONFIGS, N_HEADS, N_LAYERS, tiny_model, tiny_tokenizer, tiny_tokens

FAMILIES = list(CONFIGS)
LAYER_HOOKS = [
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_mlp_in",
    "attn.hook_z", "mlp.hook_in", "mlp.hook_post", "ln1.hook_normalized", "ln2.hook_normalized",
]
ALL_HOOKS = ["hook_embed"] + [f"blocks.{layer}.{hook}" for layer in range(N_LAYERS) for hook in LAYER_HOOKS]
# Tolerances for recomputations outside the model (different op order, e.g. rsqrt vs sqrt).
CLOSE = dict(rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Test-side knowledge of each architecture, written independently of nnsae.hooks: how to recompute things.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Arch:
    decoder: str  # attribute of the *ForCausalLM model holding embeddings, layers and final norm
    layers: str
    embed: str
    final_norm: str
    attn: str
    mlp: str
    ln1: str
    ln2: str  # the norm in front of the MLP
    eps: str
    values: Callable  # (layer, ln1 output) -> value vectors [b, pos, n_kv_heads, d_head]
    mlp_post: Callable  # (mlp module, mlp input) -> activation fed to the output projection
    mlp_down: Callable  # (mlp module) -> output projection
    o_proj: Callable  # (attention module) -> output projection
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    layernorm: bool = False
    gemma_gain: bool = False  # RMSNorm gain is (1 + w)
    embed_scale: bool = False


def _llama_values(layer, x):
    return layer.self_attn.v_proj(x).unflatten(-1, (-1, layer.self_attn.head_dim))


def _neox_values(layer, x):
    qkv = layer.attention.query_key_value(x).unflatten(-1, (N_HEADS, -1))
    return qkv.chunk(3, dim=-1)[2]


_LLAMA = dict(
    decoder="model", layers="layers", embed="embed_tokens", final_norm="norm", attn="self_attn", mlp="mlp",
    ln1="input_layernorm", ln2="post_attention_layernorm", eps="rms_norm_eps", values=_llama_values,
    mlp_post=lambda mlp, x: mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), mlp_down=lambda mlp: mlp.down_proj,
    o_proj=lambda attn: attn.o_proj,
)
_GEMMA2 = dict(
    _LLAMA, ln2="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm", gemma_gain=True, embed_scale=True,
)
ARCHS = {
    "gpt2": Arch(
        decoder="transformer", layers="h", embed="wte", final_norm="ln_f", attn="attn", mlp="mlp", ln1="ln_1",
        ln2="ln_2", eps="layer_norm_epsilon", layernorm=True,
        values=lambda layer, x: layer.attn.c_attn(x).chunk(3, dim=-1)[2].unflatten(-1, (N_HEADS, -1)),
        mlp_post=lambda mlp, x: mlp.act(mlp.c_fc(x)), mlp_down=lambda mlp: mlp.c_proj, o_proj=lambda attn: attn.c_proj,
    ),
    "gpt_neox": Arch(
        decoder="gpt_neox", layers="layers", embed="embed_in", final_norm="final_layer_norm", attn="attention",
        mlp="mlp", ln1="input_layernorm", ln2="post_attention_layernorm", eps="layer_norm_eps", layernorm=True,
        values=_neox_values, mlp_post=lambda mlp, x: mlp.act(mlp.dense_h_to_4h(x)),
        mlp_down=lambda mlp: mlp.dense_4h_to_h, o_proj=lambda attn: attn.dense,
    ),
    "llama": Arch(**_LLAMA),
    "mistral": Arch(**_LLAMA),
    "qwen2": Arch(**_LLAMA),
    "qwen3": Arch(**_LLAMA),
    "gemma": Arch(**dict(_LLAMA, gemma_gain=True, embed_scale=True)),
    "gemma2": Arch(**_GEMMA2),
    "gemma3_text": Arch(**_GEMMA2),
}


def normalized(x: torch.Tensor, layernorm: bool, eps: float) -> torch.Tensor:
    if layernorm:
        x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm_gain(norm: torch.nn.Module, arch: Arch, x: torch.Tensor) -> torch.Tensor:
    """What the HF norm module outputs, given its normalized input."""
    if arch.layernorm:
        return x * norm.weight + norm.bias
    return x * (1 + norm.weight) if arch.gemma_gain else x * norm.weight


@torch.no_grad()
def ground_truth(model: transformers.PreTrainedModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every TL hook's value, from output_hidden_states / attention probabilities / module outputs."""
    config = model.config
    arch = ARCHS[config.model_type]
    decoder = getattr(model, arch.decoder)
    layers = getattr(decoder, arch.layers)
    raw: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            raw[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def keep_input(name):
        return lambda module, args: raw.__setitem__(name, args[0])

    handles = [getattr(decoder, arch.final_norm).register_forward_pre_hook(keep_input("final_norm_in"))]
    for index, layer in enumerate(layers):
        handles.append(getattr(layer, arch.attn).register_forward_hook(keep(f"attn{index}")))
        handles.append(getattr(layer, arch.mlp).register_forward_hook(keep(f"mlp{index}")))
    try:
        out = model(ids, output_hidden_states=True, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()

    hidden, probs = out.hidden_states, out.attentions
    # The trap: HF's last hidden state is after the final norm; the last layer's output is its input.
    torch.testing.assert_close(getattr(decoder, arch.final_norm)(raw["final_norm_in"]), hidden[-1])
    eps = getattr(config, arch.eps)
    parallel = getattr(config, "use_parallel_residual", False)
    weight = getattr(decoder, arch.embed).weight
    scale = torch.tensor(math.sqrt(config.hidden_size), dtype=weight.dtype) if arch.embed_scale else 1
    truth = {"hook_embed": weight[ids] * scale}

    for index, layer in enumerate(layers):
        block = f"blocks.{index}."
        resid_pre = hidden[index]
        resid_post = hidden[index + 1] if index < len(layers) - 1 else raw["final_norm_in"]
        attn_out, mlp_out = raw[f"attn{index}"], raw[f"mlp{index}"]
        if arch.attn_out_norm:
            attn_out = getattr(layer, arch.attn_out_norm)(attn_out)
            mlp_out = getattr(layer, arch.mlp_out_norm)(mlp_out)
        torch.testing.assert_close(resid_pre + attn_out + mlp_out, resid_post, **CLOSE)
        mlp_in = resid_pre if parallel else resid_pre + attn_out  # the residual the pre-MLP norm reads
        ln1, ln2 = getattr(layer, arch.ln1), getattr(layer, arch.ln2)
        ln1_normalized = normalized(resid_pre, arch.layernorm, eps)
        ln2_normalized = normalized(mlp_in, arch.layernorm, eps)
        # The normalized values really are the norms' outputs before the gain.
        torch.testing.assert_close(norm_gain(ln1, arch, ln1_normalized), ln1(resid_pre), **CLOSE)
        torch.testing.assert_close(norm_gain(ln2, arch, ln2_normalized), ln2(mlp_in), **CLOSE)

        mlp = getattr(layer, arch.mlp)
        mlp_hook_in = ln2(mlp_in)
        mlp_post = arch.mlp_post(mlp, mlp_hook_in)
        torch.testing.assert_close(arch.mlp_down(mlp)(mlp_post), raw[f"mlp{index}"], **CLOSE)

        # hook_z: attention probabilities times the values, heads flattened head-major.
        values = arch.values(layer, ln1(resid_pre))
        values = values.repeat_interleave(probs[index].shape[1] // values.shape[2], dim=2)
        z = torch.einsum("bhqk,bkhd->bqhd", probs[index], values).flatten(-2)
        torch.testing.assert_close(arch.o_proj(getattr(layer, arch.attn))(z), raw[f"attn{index}"], **CLOSE)

        truth.update({
            block + "hook_resid_pre": resid_pre,
            block + "hook_resid_post": resid_post,
            block + "hook_attn_out": attn_out,
            block + "hook_mlp_out": mlp_out,
            block + "hook_mlp_in": mlp_in,
            block + "attn.hook_z": z,
            block + "mlp.hook_in": mlp_hook_in,
            block + "mlp.hook_post": mlp_post,
            block + "ln1.hook_normalized": ln1_normalized,
            block + "ln2.hook_normalized": ln2_normalized,
        })
        if not parallel:
            truth[block + "hook_resid_mid"] = mlp_in
    return truth


@torch.no_grad()
def capture(model, ids: torch.Tensor, points: dict[str, HookPoint]) -> dict[str, torch.Tensor]:
    """The SAE-space activation at each point, read with plain torch hooks on get_module(...)."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name, point in points.items():
        module = get_module(model, point.module)
        if point.io == "output":
            def hook(module, args, output, name=name, point=point):
                got[name] = point.to_sae(output[0] if isinstance(output, tuple) else output)
            handles.append(module.register_forward_hook(hook))
        else:
            def pre_hook(module, args, name=name, point=point):  # the first positional argument, strictly
                got[name] = point.to_sae(args[0])
            handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        (model._module if isinstance(model, nnsight.NNsight) else model)(ids)
    finally:
        for handle in handles:
            handle.remove()
    return got


@lru_cache(maxsize=None)
def family_case(family: str):
    model = tiny_model(family)
    ids = tiny_tokens()
    return model, ids, ground_truth(model, ids)


def sequential_neox() -> transformers.PreTrainedModel:
    """A GPT-NeoX model without the parallel residual (use_parallel_residual=False)."""
    torch.manual_seed(0)
    config = CONFIGS["gpt_neox"]()
    config.use_parallel_residual = False
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def fake_sae(**metadata) -> SimpleNamespace:
    return SimpleNamespace(cfg=SimpleNamespace(metadata=SimpleNamespace(**metadata)))


# ---------------------------------------------------------------------------------------------------------------
# Every family x hook, numerically
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tl_hook_matches_ground_truth(family):
    model, ids, truth = family_case(family)
    hooks = [hook for hook in ALL_HOOKS if hook in truth]
    specs = {hook: resolve_hook(model, hook_name=hook) for hook in hooks}
    for spec in specs.values():
        assert spec.read == spec.write
    got = capture(model, ids, {hook: spec.read for hook, spec in specs.items()})
    for hook in hooks:
        torch.testing.assert_close(got[hook], truth[hook], **CLOSE, msg=lambda m, hook=hook: f"{family} {hook}: {m}")


def test_parallel_residual_has_no_resid_mid():
    model, _, _ = family_case("gpt_neox")
    with pytest.raises(ValueError, match="parallel residual"):
        resolve_hook(model, hook_name="blocks.1.hook_resid_mid")


def test_sequential_neox_resid_mid():
    model, ids = sequential_neox(), tiny_tokens()
    truth = ground_truth(model, ids)
    names = ("hook_resid_mid", "hook_mlp_in", "mlp.hook_in")
    hooks = [f"blocks.{layer}.{hook}" for layer in range(N_LAYERS) for hook in names]
    got = capture(model, ids, {hook: resolve_hook(model, hook_name=hook).read for hook in hooks})
    for hook in hooks:
        torch.testing.assert_close(got[hook], truth[hook], **CLOSE)


def test_expected_module_paths():
    """The table of the report, pinned: what each TL hook maps to."""
    expect = {
        "gpt2": {
            "hook_embed": ("transformer.wte", "output"),
            "blocks.1.hook_resid_pre": ("transformer.h.1", "input"),
            "blocks.1.hook_resid_mid": ("transformer.h.1.ln_2", "input"),
            "blocks.1.hook_attn_out": ("transformer.h.1.attn", "output"),
            "blocks.1.attn.hook_z": ("transformer.h.1.attn.c_proj", "input"),
            "blocks.1.mlp.hook_post": ("transformer.h.1.mlp.c_proj", "input"),
        },
        "gemma": {"hook_embed": ("model.layers.0", "input")},
        "gemma2": {
            "blocks.1.hook_attn_out": ("model.layers.1.post_attention_layernorm", "output"),
            "blocks.1.hook_mlp_out": ("model.layers.1.post_feedforward_layernorm", "output"),
            "blocks.1.hook_resid_mid": ("model.layers.1.pre_feedforward_layernorm", "input"),
            "blocks.1.mlp.hook_in": ("model.layers.1.mlp", "input"),
        },
        "llama": {
            "hook_embed": ("model.embed_tokens", "output"),
            "blocks.2.hook_resid_post": ("model.layers.2", "output"),
            "blocks.1.hook_resid_mid": ("model.layers.1.post_attention_layernorm", "input"),
            "blocks.1.attn.hook_z": ("model.layers.1.self_attn.o_proj", "input"),
            "blocks.1.mlp.hook_post": ("model.layers.1.mlp.down_proj", "input"),
        },
        "gpt_neox": {"blocks.1.hook_mlp_in": ("gpt_neox.layers.1.post_attention_layernorm", "input")},
    }
    for family, rows in expect.items():
        model, _, _ = family_case(family)
        for hook, (module, io) in rows.items():
            point = translate_tl_hook(hook, model.config)
            assert (point.module, point.io) == (module, io), (family, hook)


# ---------------------------------------------------------------------------------------------------------------
# TransformerLens itself as a second, independent ground truth (same weights, loaded the TL way)
# ---------------------------------------------------------------------------------------------------------------

# TL derives Gemma configs from the official model name; these templates are then resized to the tiny model.
GEMMA_TEMPLATES = {"gemma": "google/gemma-2b", "gemma2": "google/gemma-2-2b", "gemma3_text": "google/gemma-3-1b-pt"}
NO_PROCESSING = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)


def tl_model(hf_model: transformers.PreTrainedModel, model_class=None, **processing):
    """A HookedTransformer (or `model_class`, e.g. SAELens' HookedSAETransformer) with `hf_model`'s weights,
    converted and processed by TransformerLens."""
    pytest.importorskip("transformer_lens")
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config, get_pretrained_state_dict

    config = hf_model.config
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
        warnings.simplefilter("ignore")
        if config.model_type in GEMMA_TEMPLATES:
            name = GEMMA_TEMPLATES[config.model_type]
            cfg = convert_hf_model_config(name)
            cfg.update(
                d_model=config.hidden_size, d_head=config.head_dim, n_heads=config.num_attention_heads,
                d_mlp=config.intermediate_size, n_layers=config.num_hidden_layers, d_vocab=config.vocab_size,
                n_key_value_heads=config.num_key_value_heads, rotary_dim=config.head_dim,
                act_fn=getattr(config, "hidden_activation", None) or config.hidden_act,
                attn_scale=getattr(config, "query_pre_attn_scalar", config.head_dim) ** 0.5,
            )
            if "attn_types" in cfg:
                cfg["attn_types"] = cfg["attn_types"][: config.num_hidden_layers]
        else:  # TL reads a local config folder like a hub model
            name = folder
            saved = config.__class__(**config.to_dict())
            saved.architectures = [type(hf_model).__name__]
            if saved.model_type == "gpt2":
                saved.n_ctx = saved.n_positions
            saved.save_pretrained(folder)
            cfg = convert_hf_model_config(folder)
        cfg.pop("tokenizer_name", None)
        cfg.update(n_ctx=64, device="cpu", dtype=torch.float32)
        fields = HookedTransformerConfig.__dataclass_fields__
        cfg = HookedTransformerConfig(**{key: value for key, value in cfg.items() if key in fields})
        model = (model_class or HookedTransformer)(cfg)
        state_dict = get_pretrained_state_dict(name, cfg, hf_model)
        model.load_and_process_state_dict(state_dict, **{**NO_PROCESSING, **processing})
    model.set_use_hook_mlp_in(True)
    return model


def tl_cache(tl, hf_model, ids):
    logits, cache = tl.run_with_cache(ids)
    torch.testing.assert_close(logits, hf_model(ids).logits, **CLOSE)  # TL computes the same function
    # TL's hook_z is [b, pos, heads, d_head]; nnsae reads it flat, head-major.
    return {name: value.flatten(-2) if name.endswith("hook_z") else value for name, value in cache.items()}


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_every_tl_hook_matches_transformer_lens(family):
    model, ids, _ = family_case(family)
    cache = tl_cache(tl_model(model), model, ids)
    hooks = [hook for hook in ALL_HOOKS if hook in cache]  # all but mlp.hook_in, which SAELens adds
    assert len(hooks) == len(ALL_HOOKS) - N_LAYERS * (2 if family == "gpt_neox" else 1)
    got = capture(model, ids, {hook: resolve_hook(model, hook_name=hook).read for hook in hooks})
    for hook in hooks:
        torch.testing.assert_close(got[hook], cache[hook], **CLOSE, msg=lambda m, hook=hook: f"{family} {hook}: {m}")


@pytest.mark.parametrize(
    ("family", "processing"),
    [
        ("gpt2", {"center_writing_weights": True}),
        ("gpt_neox", {"center_writing_weights": True}),
        ("llama", {"center_writing_weights": True}),  # TL ignores it for RMSNorm models
        ("gpt2", {"fold_ln": True, "center_writing_weights": True}),
        ("gemma2", {"fold_ln": True}),
    ],
)
@torch.no_grad()
def test_processed_tl_models_match(family, processing):
    model, ids, _ = family_case(family)
    cache = tl_cache(tl_model(model, **processing), model, ids)
    hooks = [hook for hook in ALL_HOOKS if hook in cache]
    points = {hook: resolve_hook(model, hook_name=hook, model_from_pretrained_kwargs=processing).read for hook in hooks}
    got = capture(model, ids, points)
    for hook in hooks:
        torch.testing.assert_close(got[hook], cache[hook], **CLOSE, msg=lambda m, hook=hook: f"{family} {hook}: {m}")


@pytest.mark.parametrize("option", ["fold_value_biases", "refactor_factored_attn_matrices"])
@torch.no_grad()
def test_processing_that_changes_hook_z_warns(option):
    model, ids = tiny_model("gpt2"), tiny_tokens()
    model.transformer.h[0].attn.c_attn.bias.normal_()  # HF initialises biases to 0; b_V must matter
    with pytest.warns(UserWarning, match=option):
        point = resolve_hook(model, hook_name="blocks.0.attn.hook_z", model_from_pretrained_kwargs={option: True}).read
    tl_z = tl_cache(tl_model(model, **{option: True}), model, ids)["blocks.0.attn.hook_z"]
    assert not torch.allclose(capture(model, ids, {"z": point})["z"], tl_z, **CLOSE)  # the warning is warranted


# ---------------------------------------------------------------------------------------------------------------
# Gemma embedding scale, multimodal Gemma 3, base models
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_gemma_hook_embed_scale_is_rounded_to_model_dtype():
    """sqrt(48) = 6.928 rounds to 6.9375 in bf16; HF (and TL) scale by the rounded value."""
    torch.manual_seed(0)
    config = transformers.GemmaConfig(
        vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, pad_token_id=0,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = tiny_tokens()
    spec = resolve_hook(model, hook_name="hook_embed")
    got = capture(model, ids, {"embed": spec.read})["embed"]
    weight = model.model.embed_tokens.weight
    assert torch.equal(got, weight[ids] * torch.tensor(48**0.5, dtype=torch.bfloat16))
    assert not torch.equal(got, (weight[ids].float() * 48**0.5).bfloat16())


@torch.no_grad()
def test_multimodal_gemma3_text_decoder():
    torch.manual_seed(0)
    text = CONFIGS["gemma3"]()
    vision = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
    )
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    ids = tiny_tokens()
    hooks = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post",
             "blocks.1.hook_attn_out"]
    points = {hook: resolve_hook(model, hook_name=hook).read for hook in hooks}
    assert points["blocks.1.hook_resid_post"].module == "model.language_model.layers.1"
    got = capture(model, ids, points)
    hidden = model(ids, output_hidden_states=True).hidden_states
    language_model = model.model.language_model
    torch.testing.assert_close(got["hook_embed"], language_model.embed_tokens.weight[ids] * math.sqrt(text.hidden_size))
    torch.testing.assert_close(got["blocks.0.hook_resid_pre"], hidden[0])
    torch.testing.assert_close(got["blocks.1.hook_resid_post"], hidden[2])
    torch.testing.assert_close(hidden[1] + got["blocks.1.hook_attn_out"], got["blocks.1.hook_resid_mid"])


def test_base_model_paths_drop_the_causal_lm_prefix():
    model, ids, truth = family_case("llama")
    base = model.model  # a bare LlamaModel
    spec = resolve_hook(base, hook_name="blocks.1.hook_resid_post")
    assert spec.read.module == "layers.1"
    assert get_module(base, "model.layers.1") is base.layers[1]
    assert resolve_hook(base, hook="model.layers.1").read == spec.read
    torch.testing.assert_close(capture(base, ids, {"x": spec.read})["x"], truth["blocks.1.hook_resid_post"])


# ---------------------------------------------------------------------------------------------------------------
# Weight-processing options (model_from_pretrained_kwargs)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_center_writing_weights_centres_residual_hooks_of_layernorm_models(family):
    model, ids, truth = family_case(family)
    centred = ["hook_embed", "blocks.1.hook_resid_pre", "blocks.2.hook_resid_post", "blocks.1.hook_attn_out",
               "blocks.1.hook_mlp_out", "blocks.1.hook_mlp_in"]
    untouched = ["blocks.1.attn.hook_z", "blocks.1.mlp.hook_in", "blocks.1.mlp.hook_post"]
    sae = fake_sae(hook_name="unused", model_from_pretrained_kwargs={"center_writing_weights": True})
    points = {hook: resolve_hook(model, sae, hook_name=hook).read for hook in centred + untouched}
    got = capture(model, ids, points)
    for hook in centred:
        assert points[hook].center
        torch.testing.assert_close(got[hook], truth[hook] - truth[hook].mean(-1, keepdim=True), **CLOSE)
        torch.testing.assert_close(points[hook].from_sae(got[hook], truth[hook]), truth[hook], **CLOSE)
    for hook in untouched:
        assert not points[hook].center
        torch.testing.assert_close(got[hook], truth[hook], **CLOSE)


def test_center_writing_weights_is_ignored_for_rmsnorm_models_like_tl():
    model, _, _ = family_case("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = resolve_hook(
            model, hook_name="blocks.1.hook_resid_post", model_from_pretrained_kwargs={"center_writing_weights": True}
        )
    assert not spec.read.center


def test_explicit_processing_kwargs_override_the_saes():
    model, _, _ = family_case("gpt2")
    sae = fake_sae(hook_name="blocks.1.hook_resid_pre", model_from_pretrained_kwargs={"center_writing_weights": True})
    assert resolve_hook(model, sae).read.center
    assert not resolve_hook(model, sae, model_from_pretrained_kwargs={}).read.center


def test_hf_paths_are_not_processed():
    model, _, _ = family_case("gpt2")
    spec = resolve_hook(
        model, hook="transformer.h.1.input", model_from_pretrained_kwargs={"center_writing_weights": True}
    )
    assert spec.read == HookPoint("transformer.h.1", "input")


def test_fold_ln_makes_mlp_hook_in_the_normalized_residual():
    model, ids, truth = family_case("gemma2")
    point = resolve_hook(model, hook_name="blocks.1.mlp.hook_in", model_from_pretrained_kwargs={"fold_ln": True}).read
    assert point == translate_tl_hook("blocks.1.ln2.hook_normalized", model.config)
    torch.testing.assert_close(capture(model, ids, {"x": point})["x"], truth["blocks.1.ln2.hook_normalized"], **CLOSE)


# ---------------------------------------------------------------------------------------------------------------
# Resolution precedence and HF path parsing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("model.layers.1", HookPoint("model.layers.1", "output")),  # Qwen Scope: bare path = output
        ("model.layers.1.output", HookPoint("model.layers.1", "output")),  # Gemma Scope 2
        ("model.layers.1.input", HookPoint("model.layers.1", "input")),
        ("model.layers.1.self_attn.o_proj.input", HookPoint("model.layers.1.self_attn.o_proj", "input")),
    ],
)
def test_hf_path_suffixes(path, expected):
    model, _, _ = family_case("llama")
    assert resolve_hook(model, hook=path).read == expected
    assert resolve_hook(model, hf_hook_name=path).read == expected


def test_read_precedence():
    model, _, _ = family_case("llama")
    sae = fake_sae(hook_name="blocks.0.hook_resid_pre", hf_hook_name="model.layers.1.output")
    assert resolve_hook(model, sae).read == HookPoint("model.layers.1", "output")  # SAE: hf beats TL
    tl_only = fake_sae(hook_name="blocks.0.hook_resid_pre")  # other metadata attributes missing
    assert resolve_hook(model, tl_only).read == HookPoint("model.layers.0", "input")
    explicit_tl = resolve_hook(model, sae, hook_name="blocks.2.hook_resid_post")
    assert explicit_tl.read == HookPoint("model.layers.2", "output")  # explicit beats the SAE's
    explicit_hf = resolve_hook(model, sae, hook_name="blocks.2.hook_resid_post", hf_hook_name="model.layers.2.input")
    assert explicit_hf.read == HookPoint("model.layers.2", "input")  # explicit: hf beats TL
    hook_first = resolve_hook(model, sae, hook="model.norm", hf_hook_name="model.layers.2.input")
    assert hook_first.read == HookPoint("model.norm")


def test_write_side_for_transcoders_and_plain_saes():
    model, _, _ = family_case("gemma2")
    transcoder = fake_sae(hook_name="blocks.1.mlp.hook_in", hook_name_out="blocks.1.hook_mlp_out")
    spec = resolve_hook(model, transcoder)
    assert spec == HookSpec(
        read=HookPoint("model.layers.1.mlp", "input"),
        write=HookPoint("model.layers.1.post_feedforward_layernorm", "output"),
    )
    gemma_scope_2 = fake_sae(
        hook_name="blocks.1.hook_mlp_in", hf_hook_name="model.layers.1.pre_feedforward_layernorm.output",
        hook_name_out="blocks.1.hook_mlp_out", hf_hook_name_out="model.layers.1.post_feedforward_layernorm.output",
    )
    assert resolve_hook(model, gemma_scope_2) == HookSpec(
        read=HookPoint("model.layers.1.pre_feedforward_layernorm"),
        write=HookPoint("model.layers.1.post_feedforward_layernorm"),
    )
    overridden = resolve_hook(model, gemma_scope_2, hook_name_out="blocks.2.hook_resid_post")
    assert overridden.write == HookPoint("model.layers.2")
    # A plain SAE whose *_out repeats its input hook: overriding the read point moves the write point too.
    plain = fake_sae(hf_hook_name="model.layers.1.output", hf_hook_name_out="model.layers.1.output")
    spec = resolve_hook(model, plain, hook="model.layers.2")
    assert spec.read == spec.write == HookPoint("model.layers.2")


# ---------------------------------------------------------------------------------------------------------------
# nnsight wrappers
# ---------------------------------------------------------------------------------------------------------------


def test_nnsight_wrapped_models():
    model, ids, truth = family_case("llama")
    wrapped = nnsight.NNsight(model)
    hook = "blocks.1.attn.hook_z"
    spec = resolve_hook(wrapped, hook_name=hook)
    assert spec == resolve_hook(model, hook_name=hook)
    assert get_module(wrapped, spec.read.module) is model.model.layers[1].self_attn.o_proj
    torch.testing.assert_close(capture(wrapped, ids, {hook: spec.read})[hook], truth[hook], **CLOSE)
    # The same point read the nnsight way: `.input` is the first positional argument, like HookPoint's.
    with wrapped.trace(ids):
        z = wrapped.get(f"{spec.read.module}.{spec.read.io}").save()
    torch.testing.assert_close(spec.read.to_sae(z), truth[hook], **CLOSE)


def test_transformers_model_wrapper():
    from nnsight.modeling.transformers import TransformersModel

    model, _, _ = family_case("gpt2")
    wrapped = TransformersModel(model, tokenizer=tiny_tokenizer())
    assert resolve_hook(wrapped, hook_name="blocks.1.hook_resid_mid").read == HookPoint("transformer.h.1.ln_2", "input")
    assert get_module(wrapped, "transformer.h.1.ln_2") is model.transformer.h[1].ln_2


# ---------------------------------------------------------------------------------------------------------------
# Transforms and errors
# ---------------------------------------------------------------------------------------------------------------


def test_hook_point_transforms():
    x = torch.randn(2, 3, 8) + 5
    centred = HookPoint("m", "output", center=True)
    torch.testing.assert_close(centred.to_sae(x).mean(-1), torch.zeros(2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(centred.from_sae(centred.to_sae(x), x), x)
    with pytest.raises(ValueError, match="original"):
        centred.from_sae(x)
    assert HookPoint("m").from_sae(x) is x
    with pytest.raises(ValueError, match="read point"):
        HookPoint("m", "input", normalize="rmsnorm", eps=1e-6).from_sae(x)
    low = HookPoint("m", "input", normalize="layernorm", eps=1e-5).to_sae(x.bfloat16())
    assert low.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="io"):
        HookPoint("m", "inputs")
    with pytest.raises(ValueError, match="normalize"):
        HookPoint("m", "input", normalize="batchnorm")


def test_unknown_model_type():
    with pytest.raises(ValueError, match=r"model_type 'opt'.*gemma2.*hook='model.layers.6'"):
        translate_tl_hook("blocks.0.hook_resid_post", SimpleNamespace(model_type="opt"))


@pytest.mark.parametrize(
    "hook", ["blocks.0.hook_resid_postt", "blocks.0.attn.hook_q", "hook_pos_embed", "blocks.x.hook_resid_pre"]
)
def test_unknown_hook_name(hook):
    model, _, _ = family_case("llama")
    with pytest.raises(ValueError, match=r"Unsupported TransformerLens hook.*blocks\.L\.hook_resid_pre"):
        resolve_hook(model, hook_name=hook)


def test_layer_out_of_range():
    model, _, _ = family_case("qwen2")
    with pytest.raises(ValueError, match=r"layer 3 is out of range.*3 layers"):
        resolve_hook(model, hook_name="blocks.3.hook_resid_post")


def test_missing_module_suggests_close_paths():
    model, _, _ = family_case("llama")
    with pytest.raises(ValueError, match=r"model.layers.1.self_atn.o_proj.*Closest: model.layers.1.self_attn.o_proj"):
        resolve_hook(model, hook="model.layers.1.self_atn.o_proj.input")
    with pytest.raises(ValueError, match="Closest"):
        get_module(nnsight.NNsight(model), "model.layer.1")


def test_no_hook_at_all():
    model, _, _ = family_case("llama")
    with pytest.raises(ValueError, match="No hook point"):
        resolve_hook(model)
    with pytest.raises(ValueError, match="No hook point"):
        resolve_hook(model, fake_sae(model_name="x"))
