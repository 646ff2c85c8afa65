"""One hook resolver behind every entry point: TL names, HF paths and SAE metadata give the same place on GPT-2,
GPT-NeoX, Llama, Gemma 2 and Gemma 3 (text-only and the multimodal `Gemma3ForConditionalGeneration`), and `attach`,
`splice`, `run_with_saes`, `Harvester` and `evaluate` all equal a plain torch hook doing ``sae(x)`` at the module the
test names independently."""

from __future__ import annotations

import nnsight
import pytest
import torch
import transformers

import nnsae
from nnsae import SAE, SAEConfig
from nnsae.attachment import attach, run_with_saes, splice
from nnsae.harvest import Harvester
from nnsae.hooks import resolve_hook
from tests.tiny_models import D_MODEL, N_HEADS, VOCAB, _LLAMA_LIKE, tiny_model, tiny_tokens

IDS = tiny_tokens(batch=2, seq=8)


def gemma3_multimodal() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    text = {k: v for k, v in _LLAMA_LIKE.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = transformers.Gemma3Config(
        text_config=dict(text, head_dim=D_MODEL // N_HEADS),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def build(family: str) -> transformers.PreTrainedModel:
    return gemma3_multimodal() if family == "gemma3-mm" else tiny_model(family)


# The expected HF modules, written out by hand for each family (not derived from the resolver's table).
LAYER = {"gpt2": "transformer.h.1", "gpt_neox": "gpt_neox.layers.1", "llama": "model.layers.1",
         "gemma2": "model.layers.1", "gemma3": "model.layers.1", "gemma3-mm": "model.language_model.layers.1"}
MLP_OUT = {"gpt2": "transformer.h.1.mlp", "gpt_neox": "gpt_neox.layers.1.mlp", "llama": "model.layers.1.mlp",
           "gemma2": "model.layers.1.post_feedforward_layernorm",
           "gemma3": "model.layers.1.post_feedforward_layernorm",
           "gemma3-mm": "model.language_model.layers.1.post_feedforward_layernorm"}
O_PROJ = {"gpt2": "transformer.h.1.attn.c_proj", "gpt_neox": "gpt_neox.layers.1.attention.dense",
          "llama": "model.layers.1.self_attn.o_proj", "gemma2": "model.layers.1.self_attn.o_proj",
          "gemma3": "model.layers.1.self_attn.o_proj", "gemma3-mm": "model.language_model.layers.1.self_attn.o_proj"}
FAMILIES = list(LAYER)

# (TL name, expected module per family, io, SAE reshape)
POINTS = {
    "resid_post": ("blocks.1.hook_resid_post", LAYER, "output", "none"),
    "resid_pre": ("blocks.1.hook_resid_pre", LAYER, "input", "none"),
    "mlp_out": ("blocks.1.hook_mlp_out", MLP_OUT, "output", "none"),
    "hook_z": ("blocks.1.attn.hook_z", O_PROJ, "input", "hook_z"),
}


def make_sae(reshape: str = "none", architecture: str = "standard", **metadata) -> SAE:
    cfg = dict(architecture=architecture, d_in=D_MODEL, d_sae=96, reshape_activations=reshape, metadata=metadata)
    if architecture == "topk":
        cfg["k"] = 8
    sae = SAE.from_config(SAEConfig(**cfg))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return sae


def reference_logits(hf: torch.nn.Module, sae: SAE, module: str, io: str) -> torch.Tensor:
    """Logits with a plain torch hook replacing the activation at ``module`` by ``sae(x)``."""
    target = hf.get_submodule(module)

    def apply(x: torch.Tensor) -> torch.Tensor:
        if sae.cfg.reshape_activations == "hook_z":
            return sae(x.unflatten(-1, (N_HEADS, -1))).flatten(-2)
        return sae(x)

    if io == "output":
        handle = target.register_forward_hook(
            lambda m, args, out: (apply(out[0]), *out[1:]) if isinstance(out, tuple) else apply(out))
    else:
        handle = target.register_forward_pre_hook(lambda m, args: (apply(args[0]), *args[1:]))
    try:
        with torch.no_grad():
            return hf(IDS).logits
    finally:
        handle.remove()


def reference_activation(hf: torch.nn.Module, module: str, io: str) -> torch.Tensor:
    seen = []
    target = hf.get_submodule(module)
    if io == "output":
        handle = target.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    else:
        handle = target.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            hf(IDS)
    finally:
        handle.remove()
    return seen[0]


@pytest.fixture(scope="module")
def models():
    return {family: build(family) for family in FAMILIES}


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_way_of_naming_a_hook_resolves_to_the_same_module(models, family, point):
    hf = models[family]
    tl_name, expected, io, _ = POINTS[point]
    path = expected[family]
    hf_name = path if io == "output" else f"{path}.input"
    model = nnsight.NNsight(hf)
    for target in (tl_name, hf_name, make_sae(hook_name=tl_name), make_sae(hf_hook_name=hf_name)):
        spec = resolve_hook(model, target)
        assert (spec.read.module, spec.read.io) == (path, io), target
        assert spec.write == spec.read
    if family == "gemma3-mm":  # a path written for Gemma3ForCausalLM resolves against the wrapped text model
        short = path.replace("model.language_model.", "model.")
        assert resolve_hook(model, short if io == "output" else f"{short}.input").read.module == path


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_attach_splice_and_run_with_saes_equal_a_plain_torch_hook(models, family, point):
    hf = models[family]
    tl_name, expected, io, reshape = POINTS[point]
    sae = make_sae(reshape, hook_name=tl_name)
    reference = reference_logits(hf, sae, expected[family], io)
    model = nnsight.NNsight(hf)
    path = expected[family]
    hf_name = path if io == "output" else f"{path}.input"
    with torch.no_grad():
        for hook in (None, tl_name, hf_name):
            with model.trace(IDS):
                attach(model, sae, hook=hook)
                attached = model.output.logits.save()
            with model.trace(IDS):
                splice(model, sae, hook=hook)
                inline = model.output.logits.save()
            torch.testing.assert_close(attached, reference, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(inline, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run_with_saes(model, IDS, saes=[sae]), reference, rtol=1e-5, atol=1e-5)
    assert nnsae.attached(model) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_harvester_reads_what_a_plain_hook_reads(models, family):
    hf = models[family]
    points = [POINTS["resid_post"], POINTS["mlp_out"], POINTS["resid_pre"]]
    names = [points[0][0], points[1][1][family], f"{points[2][1][family]}.input"]  # TL name, HF path, HF input
    acts = Harvester(hf, names)(IDS)
    for (_, expected, io, _), got in zip(points, acts):
        torch.testing.assert_close(got, reference_activation(hf, expected[family], io), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_and_extract_read_where_a_plain_hook_reads(models, family, tmp_path):
    """L0 from `evaluate` and firing counts from `extract` equal `sae.encode` of what a plain torch hook captures at
    the expected module, for the SAE named by a TL name, an HF path and hf_hook_name."""
    from nnsae.data import iter_documents, pack, special_token_ids
    from tests.tiny_models import tiny_tokenizer

    hf, tok = models[family], tiny_tokenizer()
    texts = [f"text number {i} about some things and other things." for i in range(12)]
    ctx = 16
    chunks = list(pack(iter_documents(texts), tok, ctx))[:4]
    tokens = torch.stack([c.tokens for c in chunks])
    tl_name, expected, io, _ = POINTS["resid_post"]
    target = hf.get_submodule(expected[family])
    seen = []
    handle = target.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hf(tokens)
    handle.remove()
    keep = ~torch.isin(tokens, torch.tensor(sorted(special_token_ids(tok))))
    for metadata in ({"hook_name": tl_name}, {"hf_hook_name": expected[family]}, {"hook_name": expected[family]}):
        sae = make_sae(**metadata)
        with torch.no_grad():
            feats = sae.encode(seen[0])[keep]
        record = nnsae.evaluate(hf, sae, texts, tokenizer=tok, n_tokens=tokens.numel(), n_ce_tokens=None,
                                context_size=ctx, batch_size_prompts=4, progress=False)
        assert record["metrics"]["sparsity"]["l0"] == pytest.approx((feats > 0).sum(-1).float().mean().item())
        out = nnsae.extract(hf, {"s": sae}, texts, tmp_path / f"{family}-{len(str(metadata))}", tokenizer=tok,
                            context_size=ctx, batch_size_prompts=4, n_tokens=tokens.numel(), progress=False)
        assert torch.equal(nnsae.load_feature_stats(out, "s")["firing_count"].long(), (feats > 0).sum(0).long())


def test_unknown_names_get_one_clear_error_with_the_closest_paths(models):
    model = nnsight.NNsight(models["llama"])
    with pytest.raises(ValueError, match=r"No module 'model.layer.1'.*Closest: model.layers.1"):
        resolve_hook(model, "model.layer.1")
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        resolve_hook(model, "blocks.9.hook_resid_post")
    with pytest.raises(ValueError, match="Unsupported TransformerLens hook"):
        resolve_hook(model, "blocks.1.hook_nothing")
    with pytest.raises(ValueError, match="No hook point"):
        resolve_hook(model, make_sae())


def test_a_mount_on_another_device_copies_the_weights_and_leaves_the_callers_sae_alone():
    from nnsae.seam import fresh_hook_view

    sae = make_sae()
    view = fresh_hook_view(sae, {"hook_sae_acts_post": torch.nn.Identity()}, torch.device("cpu"))
    with torch.no_grad():
        view.W_dec.add_(1.0)
    assert view.W_dec is not sae.W_dec and not torch.equal(view.W_dec, sae.W_dec)
    assert view.hook_sae_acts_post is not sae.hook_sae_acts_post and view.hook_sae_input is sae.hook_sae_input
    shared = fresh_hook_view(sae, {})
    assert shared.W_dec is sae.W_dec
