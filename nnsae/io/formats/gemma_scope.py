"""Gemma Scope 1 (google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att,transcoders}): one `params.npz` per SAE.

The archive holds `w_enc`[d_in,d_sae], `w_dec`[d_sae,d_in], `b_enc`, `b_dec` and a per-feature `threshold`: a
JumpReLU SAE already in SAELens' layout, that does not subtract b_dec from its input. Everything else (model, hook,
width) lives only in the repository and folder names (`google/gemma-scope-2b-pt-res` + `layer_12/width_16k/...`),
so `load` reads them from `repo_id`/`sae_id`, or failing that from the directory path (a Hugging Face cache path
`.../models--google--gemma-scope-2b-pt-res/snapshots/<rev>/layer_12/...` or any path with a `gemma-scope-*`
component). Without them, d_in/d_sae come from the arrays and unknown metadata is left None.

The result matches SAELens' `gemma_2` / `gemma_2_transcoder` loaders (after its config defaulting):
- res → `blocks.L.hook_resid_post`; the `embedding/` SAEs → `hook_embed`, with W_enc/√d_in and W_dec·√d_in because
  TransformerLens' `hook_embed` for Gemma already includes the √d_model embedding scale the SAEs were trained without;
- mlp → `blocks.L.hook_mlp_out`;
- att → `blocks.L.attn.hook_z` with `reshape_activations="hook_z"` (input [..., n_heads, d_head]);
- transcoders → `jumprelu_transcoder` from `blocks.L.ln2.hook_normalized` to `blocks.L.hook_mlp_out`.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from nnsae.config import SAELENS_FORMAT_VERSION
from nnsae.io.files import require

NAME = "gemma_scope"
PARAMS = "params.npz"

# Substrings of the repository id, checked in this order (as SAELens does: "2b-it" before "2b").
_MODELS = (("2b-it", "gemma-2-2b-it"), ("9b-it", "gemma-2-9b-it"), ("27b-it", "gemma-2-27b-it"),
           ("2b", "gemma-2-2b"), ("9b", "gemma-2-9b"), ("27b", "gemma-2-27b"))
_KEYS = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}


def files(path_in_repo: str) -> tuple[list[str], list[str]]:
    return [_join(path_in_repo, PARAMS)], []


def detect(directory: Path) -> bool:
    return (directory / PARAMS).is_file()


def load(directory: Path, *, sae_id: str | None = None, repo_id: str | None = None
         ) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor | None]:
    directory = Path(directory)
    state_dict = read_npz(require(directory / PARAMS))
    missing = sorted(set(_KEYS.values()) - set(state_dict))
    if missing:
        raise ValueError(f"{directory / PARAMS} is not a Gemma Scope archive: it lacks {missing}.")
    d_in, d_sae = state_dict["W_enc"].shape
    d_out = state_dict["W_dec"].shape[1]

    guessed_repo, guessed_path = hub_location(directory)
    repo_id = repo_id or guessed_repo or ""
    folder = sae_id or guessed_path or ""
    match = re.search(r"layer_(\d+)", folder)
    layer = int(match.group(1)) if match else None
    model_name = next((name for key, name in _MODELS if key in repo_id), None)
    metadata = {"model_name": model_name, "hook_name": None, "hook_head_index": None, "prepend_bos": True,
                "dataset_path": "monology/pile-uncopyrighted", "context_size": 1024, "neuronpedia_id": None}

    if "transcoders" in repo_id or d_out != d_in:
        metadata["hook_name"] = f"blocks.{layer}.ln2.hook_normalized" if layer is not None else None
        metadata["hook_name_out"] = f"blocks.{layer}.hook_mlp_out" if layer is not None else None
        metadata["hook_head_index_out"] = None
        cfg = _cfg("jumprelu_transcoder", d_in, d_sae, metadata, d_out=d_out)
        return cfg, state_dict, None

    reshape = "none"
    if "embedding" in folder:
        metadata["hook_name"] = "hook_embed"
        scale = math.sqrt(d_in)
        state_dict["W_enc"] = state_dict["W_enc"] / scale
        state_dict["W_dec"] = state_dict["W_dec"] * scale
    elif layer is not None and "res" in repo_id:
        metadata["hook_name"] = f"blocks.{layer}.hook_resid_post"
    elif layer is not None and "mlp" in repo_id:
        metadata["hook_name"] = f"blocks.{layer}.hook_mlp_out"
    elif layer is not None and "att" in repo_id:
        metadata["hook_name"] = f"blocks.{layer}.attn.hook_z"
        reshape = "hook_z"
    return _cfg("jumprelu", d_in, d_sae, metadata, reshape=reshape), state_dict, None


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """The arrays of a Gemma Scope `params.npz` as float32 tensors with SAELens names (`w_enc` → `W_enc`)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {_KEYS.get(key, key): torch.from_numpy(np.asarray(data[key], dtype=np.float32)).clone()
                    for key in data.files}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .npz archive ({e}); the file is corrupt or truncated.") from None


def hub_location(directory: Path) -> tuple[str | None, str | None]:
    """(repo_id, path in repo) guessed from a local path, or (None, None).

    Understands the Hugging Face cache layout (`models--org--name/snapshots/<rev>/<path>`) and, failing that, a path
    component naming a Gemma Scope repository (`.../gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82`).
    """
    parts = Path(directory).absolute().parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            repo = part.removeprefix("models--").replace("--", "/", 1)
            return repo, "/".join(parts[i + 3:]) or None
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith("gemma-scope"):
            return f"google/{parts[i]}", "/".join(parts[i + 1:]) or None
    # No repository in the path: the Gemma Scope folder layout is layer_N/width_W/average_l0_X (or embedding/...).
    for i in range(len(parts) - 1, -1, -1):
        if re.fullmatch(r"layer_\d+|embedding", parts[i]):
            return None, "/".join(parts[i:])
    return None, None


def _cfg(architecture: str, d_in: int, d_sae: int, metadata: dict, reshape: str = "none", **extra) -> dict:
    return {
        "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "reshape_activations": reshape,
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None, **metadata},
        **extra, "architecture": architecture,
    }


def _join(path_in_repo: str, name: str) -> str:
    path_in_repo = path_in_repo.strip("/")
    return str(PurePosixPath(path_in_repo) / name) if path_in_repo else name
