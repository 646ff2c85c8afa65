"""EleutherAI sparsify (and its predecessor `sae`): `cfg.json` + `sae.safetensors` in a folder named after the
hookpoint, e.g. `layers.10/`, with the training run's `config.json` one level up.

`sae.safetensors`: `encoder.weight`[d_sae,d_in], `encoder.bias`, `W_dec`[d_sae,d_in] (already SAELens' row-per-
feature layout, so NOT transposed), `b_dec`[d_in], optional `W_skip`[d_in,d_in]. `cfg.json`: `d_in`, `num_latents`
(0 → `expansion_factor`·d_in), `k`, `activation` (topk | groupmax), `normalize_decoder`, `skip_connection`,
`transcode`, legacy `signed`.

sparsify's encode is `topk(relu(encoder(x - b_dec)), k)` with the `- b_dec` done for every autoencoder (only
transcoders skip it; `normalize_decoder` has nothing to do with it), decode is `Σ acts·W_dec[idx] + b_dec`. That is
SAELens' `topk` with `apply_b_dec_to_input=True` and `rescale_acts_by_decoder_norm=False` (ReLU-then-top-k and
top-k-then-ReLU give the same dense vector). Legacy `signed` SAEs select by |z| without ReLU: `abstopk`.

Hooks: sparsify hooks the OUTPUT (first element if a tuple) of `model.base_model.get_submodule(hookpoint)`, so the
hookpoint is relative to the base model. `hf_hook_name` is the full module path (`model.layers.10` for Llama-family
models, `transformer.h.10` for GPT-2, `gpt_neox.layers.10` for Pythia), recorded when the model is known from the
run's `config.json`; a bare path means the module output (as for Qwen Scope). `hook_name` is the TransformerLens
equivalent when there is one: `embed_tokens`/`wte`/`embed_in` → `hook_embed` (not for Gemma), `layers.N`/`h.N` →
`blocks.N.hook_resid_post`, `….mlp` → `hook_mlp_out`, `….self_attn`/`….attn`/`….attention` → `hook_attn_out`
(the last two not for Gemma 2/3, whose TransformerLens hooks sit after an extra norm).

Not supported (no SAELens architecture): transcoders (`transcode`, a top-k transcoder), skip connections on
autoencoders, and `groupmax` activations.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import torch

from nnsae.config import SAELENS_FORMAT_VERSION
from nnsae.io.files import read_json, read_safetensors, require

NAME = "sparsify"
CFG, WEIGHTS, RUN_CONFIG = "cfg.json", "sae.safetensors", "config.json"


def files(path_in_repo: str) -> tuple[list[str], list[str]]:
    path = PurePosixPath(path_in_repo.strip("/"))
    run_config = path.parent / RUN_CONFIG if path.parts else PurePosixPath(RUN_CONFIG)
    return [str(path / CFG), str(path / WEIGHTS)], [str(run_config)]


def detect(directory: Path) -> bool:
    return (directory / CFG).is_file() and (directory / WEIGHTS).is_file()


def load(directory: Path, *, sae_id: str | None = None, repo_id: str | None = None
         ) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor | None]:
    directory = Path(directory)
    cfg = read_json(require(directory / CFG))
    raw = read_safetensors(require(directory / WEIGHTS))

    if cfg.get("transcode"):
        raise NotImplementedError(f"{directory}: sparsify transcoders are top-k transcoders, which have no SAELens "
                                  f"architecture (SAELens transcoders are ReLU or JumpReLU).")
    if cfg.get("skip_connection") or "W_skip" in raw:
        raise NotImplementedError(f"{directory}: an autoencoder with a skip connection has no SAELens architecture.")
    if cfg.get("activation", "topk") != "topk":
        raise NotImplementedError(f"{directory}: activation={cfg['activation']!r} is not supported (only topk).")
    missing = sorted({"encoder.weight", "W_dec"} - set(raw))
    if missing:
        raise ValueError(f"{directory / WEIGHTS} is not a sparsify file: it lacks {missing}.")

    W_enc = raw["encoder.weight"].float().T.contiguous()
    d_in, d_sae = W_enc.shape
    if cfg.get("d_in", d_in) != d_in or d_sae != (cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 32)):
        raise ValueError(f"{directory}: encoder.weight has shape {tuple(raw['encoder.weight'].shape)}, but cfg.json "
                         f"says d_in={cfg.get('d_in')}, num_latents={cfg.get('num_latents')}, "
                         f"expansion_factor={cfg.get('expansion_factor')}.")
    state_dict = {
        "W_enc": W_enc,
        "W_dec": raw["W_dec"].float(),
        "b_enc": raw["encoder.bias"].float() if "encoder.bias" in raw else torch.zeros(d_sae),
        "b_dec": raw["b_dec"].float() if "b_dec" in raw else torch.zeros(d_in),
    }

    hookpoint = PurePosixPath(sae_id.strip("/")) if sae_id else PurePosixPath(directory.name)
    run_dir = directory.parent
    if re.fullmatch(r"seed\d+", hookpoint.name):  # multi-seed runs save to <hookpoint>/seedN
        hookpoint = hookpoint.parent if sae_id else PurePosixPath(directory.parent.name)
        run_dir = directory.parent.parent
    hookpoint = hookpoint.name
    run = read_json(run_dir / RUN_CONFIG) if (run_dir / RUN_CONFIG).is_file() else {}
    model_name = run.get("model")
    metadata = {
        "model_name": model_name, "hook_name": tl_hook_name(hookpoint, model_name), "hook_head_index": None,
        "prepend_bos": True, "dataset_path": run.get("dataset", "togethercomputer/RedPajama-Data-1T-Sample"),
        "context_size": run.get("ctx_len", 2048), "neuronpedia_id": None,
        "hf_hook_name": hf_hook_name(hookpoint, model_name),
    }
    out = {
        "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None, **metadata},
        "k": int(cfg["k"]), "rescale_acts_by_decoder_norm": False,
        "architecture": "abstopk" if cfg.get("signed") else "topk",
    }
    return out, state_dict, None


def base_model_prefix(model_name: str | None) -> str | None:
    """The attribute holding the base model in the model's *ForCausalLM class (sparsify's hookpoint root)."""
    if not model_name:
        return None
    name = model_name.lower()
    if "pythia" in name or "neox" in name:
        return "gpt_neox"
    if re.search(r"gpt2|gpt-j|gptj|bloom|falcon", name):
        return "transformer"
    return "model"  # Llama, Mistral, Qwen, Gemma, SmolLM, OLMo, Phi-3, ...


def hf_hook_name(hookpoint: str, model_name: str | None) -> str | None:
    prefix = base_model_prefix(model_name)
    return f"{prefix}.{hookpoint}" if prefix else None


def tl_hook_name(hookpoint: str, model_name: str | None) -> str | None:
    """The TransformerLens hook equivalent to the output of `hookpoint`, or None when there is none."""
    gemma = re.search(r"gemma", (model_name or "").lower()) is not None
    if hookpoint in ("embed_tokens", "wte", "embed_in"):
        return None if gemma else "hook_embed"  # TransformerLens' Gemma hook_embed includes the √d_model scale
    match = re.fullmatch(r"(?:decoder\.)?(?:layers|h)\.(\d+)(\.(mlp|self_attn|attn|attention))?", hookpoint)
    if match is None:
        return None
    layer, site = match.group(1), match.group(3)
    if site is None:
        return f"blocks.{layer}.hook_resid_post"
    if gemma and re.search(r"gemma-?[23]", model_name.lower()):
        return None  # Gemma 2/3 hook_mlp_out / hook_attn_out are the post-norm outputs, not the module's
    return f"blocks.{layer}.hook_mlp_out" if site == "mlp" else f"blocks.{layer}.hook_attn_out"
