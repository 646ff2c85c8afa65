"""Gemma Scope 2 (google/gemma-scope-2-{270m,1b,4b,12b,27b}-{pt,it}): `config.json` + `params.safetensors` per SAE.

`params.safetensors` holds `w_enc`[d_in,d_sae], `w_dec`[d_sae,d_out], `b_enc`, `b_dec`, `threshold` and, for affine
("skip") transcoders, `affine_skip_connection`[d_in,d_out]. `config.json` holds `architecture` (must be `jump_relu`),
`model_name`, `hf_hook_point_in`/`hf_hook_point_out`, `affine_connection` and `type` (sae, transcoder, clt, ...).
When `config.json` is absent it is inferred from the folder name (`resid_post/layer_17_width_16k_l0_big`) and the
repository id, as SAELens does.

The result matches SAELens' `gemma_3` loader (after its config defaulting):
- every SAE is JumpReLU with `apply_b_dec_to_input=False`;
- resid_post → `blocks.L.hook_resid_post`, mlp_out → `blocks.L.hook_mlp_out`, attn_out → `blocks.L.attn.hook_z`
  but with `reshape_activations="none"`: these SAEs read the flat o_proj input, [..., n_heads·d_head];
- transcoders → `jumprelu_transcoder` (or `jumprelu_skip_transcoder` when `affine_connection`, with
  `W_skip = affine_skip_connection.T`), from `blocks.L.hook_mlp_in` to `blocks.L.hook_mlp_out`, d_out from w_dec;
- `hf_hook_name` = `hf_hook_point_in` (and, for transcoders only, `hf_hook_name_out` = `hf_hook_point_out`), kept
  verbatim with their `.input`/`.output` suffixes;
- `model_name` is normalised to the Hugging Face id (`google/` prefix, `-v3` → `-3`, no `-pt` for 270m).

Not supported: cross-layer transcoders (`clt/`, one file per layer with a per-target-layer decoder) and
crosscoders; they are not single-hook SAEs.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import torch

from nnsae.config import SAELENS_FORMAT_VERSION
from nnsae.io.files import read_json, read_safetensors, require
from nnsae.io.formats.gemma_scope import hub_location

NAME = "gemma_scope_2"
CONFIG, PARAMS = "config.json", "params.safetensors"


def files(path_in_repo: str) -> tuple[list[str], list[str]]:
    return [_join(path_in_repo, PARAMS)], [_join(path_in_repo, CONFIG)]


def detect(directory: Path) -> bool:
    return (directory / PARAMS).is_file()


def load(directory: Path, *, sae_id: str | None = None, repo_id: str | None = None
         ) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor | None]:
    directory = Path(directory)
    guessed_repo, guessed_path = hub_location(directory)
    repo_id = repo_id or guessed_repo
    folder = sae_id or guessed_path or "/".join(directory.absolute().parts[-2:])

    raw = read_safetensors(require(directory / PARAMS))
    if (directory / CONFIG).is_file():
        raw_cfg = read_json(directory / CONFIG)
    else:
        raw_cfg = _infer_raw_config(folder, repo_id)
    if raw_cfg.get("architecture") != "jump_relu":
        raise ValueError(f"{directory}: Gemma Scope 2 SAEs are 'jump_relu'; this one is "
                         f"{raw_cfg.get('architecture')!r}.")
    kind = _kind(folder, raw_cfg)
    if kind in ("clt", "crosscoder"):
        raise NotImplementedError(f"{directory}: Gemma Scope 2 {kind}s are not single-hook SAEs and are not supported.")
    missing = sorted({"w_enc", "w_dec", "b_enc", "b_dec", "threshold"} - set(raw))
    if missing:
        raise ValueError(f"{directory / PARAMS} is not a Gemma Scope 2 file: it lacks {missing}.")

    layer = _layer(folder, raw_cfg)
    d_in, d_sae = raw["w_enc"].shape
    state_dict = {"W_enc": raw["w_enc"], "W_dec": raw["w_dec"], "b_enc": raw["b_enc"], "b_dec": raw["b_dec"],
                  "threshold": raw["threshold"]}
    metadata = {"model_name": _model_name(raw_cfg.get("model_name")), "hook_name": None, "hook_head_index": None,
                "prepend_bos": True, "dataset_path": "monology/pile-uncopyrighted", "context_size": 1024,
                "neuronpedia_id": None, "hf_hook_name": raw_cfg.get("hf_hook_point_in")}
    extra: dict = {}
    architecture = "jumprelu"
    if kind == "transcoder":
        affine = bool(raw_cfg.get("affine_connection", False))
        architecture = "jumprelu_skip_transcoder" if affine else "jumprelu_transcoder"
        extra["d_out"] = raw["w_dec"].shape[-1]
        if affine:
            if "affine_skip_connection" not in raw:
                raise ValueError(f"{directory / PARAMS}: an affine transcoder needs 'affine_skip_connection'.")
            state_dict["W_skip"] = raw["affine_skip_connection"].T.contiguous()  # stored [d_in, d_out]
        metadata["hook_name"] = f"blocks.{layer}.hook_mlp_in" if layer is not None else None
        metadata["hook_name_out"] = f"blocks.{layer}.hook_mlp_out" if layer is not None else None
        metadata["hf_hook_name_out"] = raw_cfg.get("hf_hook_point_out")
    elif layer is not None:
        metadata["hook_name"] = {"resid_post": f"blocks.{layer}.hook_resid_post",
                                 "attn_out": f"blocks.{layer}.attn.hook_z",
                                 "mlp_out": f"blocks.{layer}.hook_mlp_out"}.get(kind)

    cfg = {
        "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None, **metadata},
        **extra, "architecture": architecture,
    }
    return cfg, {k: v.float() for k, v in state_dict.items()}, None


def _kind(folder: str, raw_cfg: dict) -> str | None:
    """resid_post, attn_out, mlp_out, transcoder, clt or crosscoder: from the folder name, else from config.json."""
    for kind in ("transcoder", "clt", "crosscoder", "resid_post", "attn_out", "mlp_out"):
        if kind in folder:
            return kind
    kind = raw_cfg.get("type")
    if kind in ("transcoder", "clt", "crosscoder"):
        return kind
    hook_in = raw_cfg.get("hf_hook_point_in") or ""
    if hook_in.endswith("self_attn.o_proj.input"):
        return "attn_out"
    if hook_in.endswith("post_feedforward_layernorm.output"):
        return "mlp_out"
    if re.fullmatch(r"model\.layers\.\d+\.output", hook_in):
        return "resid_post"
    return None


def _layer(folder: str, raw_cfg: dict) -> int | None:
    match = re.search(r"layer_(\d+)", folder) or re.search(r"layers\.(\d+)\.", raw_cfg.get("hf_hook_point_in") or "")
    return int(match.group(1)) if match else None


def _model_name(name: str | None) -> str | None:
    if not name:
        return None
    if "google" not in name:
        name = "google/" + name
    name = name.replace("-v3", "-3")
    return name.replace("-pt", "") if "270m" in name else name


def _infer_raw_config(folder: str, repo_id: str | None) -> dict:
    """What config.json would say, from the folder name and repository (for SAEs published without one)."""
    match = re.search(r"layer_(\d+)", folder)
    if match is None:
        raise ValueError(f"No {CONFIG} next to the weights and no layer_N in the SAE's folder name {folder!r}: "
                         f"pass sae_id= (the SAE's path in its repository).")
    layer = int(match.group(1))
    kind = _kind(folder, {})
    hooks = {
        "transcoder": (f"model.layers.{layer}.pre_feedforward_layernorm.output",
                       f"model.layers.{layer}.post_feedforward_layernorm.output"),
        "clt": (f"model.layers.{layer}.pre_feedforward_layernorm.output",
                f"model.layers.{layer}.post_feedforward_layernorm.output"),
        "resid_post": (f"model.layers.{layer}.output", None),
        "attn_out": (f"model.layers.{layer}.self_attn.o_proj.input", None),
        "mlp_out": (f"model.layers.{layer}.post_feedforward_layernorm.output", None),
    }
    if kind not in hooks:
        raise ValueError(f"Cannot tell which hook the Gemma Scope 2 SAE {folder!r} reads: its folder name names none "
                         f"of resid_post, attn_out, mlp_out, transcoder.")
    cfg = {"architecture": "jump_relu", "model_name": repo_id.replace("gemma-scope-2", "gemma-3") if repo_id else None,
           "hf_hook_point_in": hooks[kind][0]}
    if hooks[kind][1] is not None:
        cfg["hf_hook_point_out"] = hooks[kind][1]
    if kind in ("transcoder", "clt"):
        cfg["affine_connection"] = "affine" in folder
    return cfg


def _join(path_in_repo: str, name: str) -> str:
    path_in_repo = path_in_repo.strip("/")
    return str(PurePosixPath(path_in_repo) / name) if path_in_repo else name
