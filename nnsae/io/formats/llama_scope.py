"""Llama Scope (fnlp/Llama3_1-8B-Base-LX{R,A,M,TC}-{8x,32x}; OpenMOSS lm-saes): `hyperparams.json` +
`checkpoints/final.safetensors` per SAE.

The checkpoint is an lm-saes SparseAutoEncoder: `encoder.weight`[d_sae,d_model], `encoder.bias`,
`decoder.weight`[d_model,d_sae], `decoder.bias`, trained on activations rescaled to norm √d_model
("dataset-wise" normalisation: x·s with s = √d_model / dataset_average_activation_norm.in) and with one scalar
`jump_relu_threshold`.

SAEs (hook_point_in == hook_point_out) load exactly as SAELens' `llama_scope` loader produces them: JumpReLU,
`apply_b_dec_to_input=False`, `hook_name = hook_point_in`, `normalize_activations="expected_average_only_in"`
(the SAE expects x·s; fold it with `sae.fold_activation_norm_scaling_factor(norm_scaling_factor(directory))`, which
is what SAELens' `from_pretrained` does with the YAML value, equal to s) and `threshold = jump_relu_threshold · s`
broadcast to [d_sae] (lm-saes compares the unnormalised pre-activation with the raw threshold at inference, which is
the normalised one with θ·s).

Transcoders (LXTC: hook_point_in `blocks.L.ln2.hook_normalized` ≠ hook_point_out `blocks.L.hook_mlp_out`; SAELens
has no loader for them) read x·s_in and predict y·s_out with two different factors, which `expected_average_only_in`
cannot express, so both are folded here: `jumprelu_transcoder`, `W_enc·s_in`, `threshold = θ·s_in`,
`W_dec/s_out`, `b_dec/s_out`, `normalize_activations="none"`.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath

import torch

from nnsae.config import SAELENS_FORMAT_VERSION
from nnsae.io.files import read_json, read_safetensors, require

NAME = "llama_scope"
HYPERPARAMS, WEIGHTS = "hyperparams.json", "checkpoints/final.safetensors"


def files(path_in_repo: str) -> tuple[list[str], list[str]]:
    return [_join(path_in_repo, HYPERPARAMS), _join(path_in_repo, WEIGHTS)], []


def detect(directory: Path) -> bool:
    return (directory / HYPERPARAMS).is_file() and (directory / WEIGHTS).is_file()


def norm_scaling_factor(directory: Path, which: str = "in") -> float | None:
    """s = √d_model / dataset_average_activation_norm[which] from hyperparams.json (None if it has no norms)."""
    hp = read_json(Path(directory) / HYPERPARAMS)
    norms = hp.get("dataset_average_activation_norm") or {}
    if hp.get("norm_activation", "dataset-wise") != "dataset-wise" or norms.get(which) is None:
        return None
    return math.sqrt(hp["d_model"]) / norms[which]


def load(directory: Path, *, sae_id: str | None = None, repo_id: str | None = None
         ) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor | None]:
    directory = Path(directory)
    hp = read_json(require(directory / HYPERPARAMS))
    raw = read_safetensors(require(directory / WEIGHTS))
    missing = sorted({"encoder.weight", "encoder.bias", "decoder.weight"} - set(raw))
    if missing:
        raise ValueError(f"{directory / WEIGHTS} is not a Llama Scope checkpoint: it lacks {missing}.")
    if hp.get("use_glu_encoder"):
        raise NotImplementedError(f"{directory}: lm-saes SAEs with a GLU encoder have no SAELens architecture.")
    if "jump_relu_threshold" not in hp:
        raise ValueError(f"{directory / HYPERPARAMS} has no 'jump_relu_threshold'.")
    act_fn = str(hp.get("act_fn", "jumprelu")).lower()
    # lm-saes runs a topk SAE with a positive jump_relu_threshold as JumpReLU at inference (how Llama Scope ships).
    if not (act_fn == "jumprelu" or (act_fn == "topk" and hp["jump_relu_threshold"] > 0)):
        raise NotImplementedError(f"{directory}: act_fn={hp.get('act_fn')!r} with jump_relu_threshold="
                                  f"{hp['jump_relu_threshold']} is not supported (only JumpReLU inference).")
    if hp.get("norm_activation", "dataset-wise") not in ("dataset-wise", "inference", "none"):
        raise NotImplementedError(f"{directory}: norm_activation={hp['norm_activation']!r} is not supported "
                                  f"(dataset-wise, inference, none).")

    W_enc = raw["encoder.weight"].float().T.contiguous()
    W_dec = raw["decoder.weight"].float().T.contiguous()
    d_in, d_sae = W_enc.shape
    d_out = W_dec.shape[1]
    b_dec = raw["decoder.bias"].float() if "decoder.bias" in raw else torch.zeros(d_out)
    s_in = norm_scaling_factor(directory, "in")
    normalized, s_in = s_in is not None, s_in or 1.0
    s_out = norm_scaling_factor(directory, "out") or s_in
    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out", hp.get("hook_point_in"))
    threshold = torch.ones(d_sae, dtype=torch.float32) * (hp["jump_relu_threshold"] * s_in)
    apply_b_dec = bool(hp.get("apply_decoder_bias_to_pre_encoder", False)) and "decoder.bias" in raw
    metadata = {"model_name": _model_name(hp, repo_id, directory), "hook_name": hook_in, "hook_head_index": None,
                "prepend_bos": True, "dataset_path": "cerebras/SlimPajama-627B", "context_size": 1024,
                "neuronpedia_id": None}
    state_dict = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": raw["encoder.bias"].float(), "b_dec": b_dec,
                  "threshold": threshold}
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": "expected_average_only_in" if normalized else "none",
           "reshape_activations": "none"}

    if hook_out is not None and hook_out != hook_in:
        if apply_b_dec:
            raise NotImplementedError(f"{directory}: a transcoder that subtracts its output bias from its input "
                                      f"has no SAELens architecture.")
        state_dict["W_enc"] = W_enc * s_in
        state_dict["W_dec"] = W_dec / s_out
        state_dict["b_dec"] = b_dec / s_out
        cfg["normalize_activations"] = "none"
        metadata.update(hook_name_out=hook_out, hook_head_index_out=None)
        cfg.update(d_out=d_out, architecture="jumprelu_transcoder")
    else:
        cfg["architecture"] = "jumprelu"
    cfg["metadata"] = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None, **metadata}
    cfg["architecture"] = cfg.pop("architecture")  # last, as in cfg.json
    return cfg, state_dict, None


def _model_name(hp: dict, repo_id: str | None, directory: Path) -> str | None:
    # Llama Scope's hyperparams.json names no model; SAELens hard-codes the one all its releases are for.
    if "Llama3_1-8B-Base" in (repo_id or "") or "Llama3_1-8B-Base" in str(directory):
        return "meta-llama/Llama-3.1-8B"
    return hp.get("model_name") or ("meta-llama/Llama-3.1-8B" if repo_id is None else None)


def _join(path_in_repo: str, name: str) -> str:
    path_in_repo = path_in_repo.strip("/")
    return str(PurePosixPath(path_in_repo) / name) if path_in_repo else name
