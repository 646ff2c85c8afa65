"""Reading a pretrained SAE by release name (or Hugging Face repo id) and SAE id, as SAELens' `from_pretrained` does.

Flow: look the SAE up in the registry → download its files → read them with its format → apply the release's
`config_overrides`, its Neuronpedia id (into `metadata.neuronpedia_id`), `device` and `dtype`. `read_pretrained`
stops there (files in, dicts and tensors out; nothing here knows the SAE classes); `SAE.from_pretrained` then
builds the SAE, folds the `norm_scaling_factor` when the SAE expects `expected_average_only_in` input scaling,
casts, and optionally runs `fold_W_dec_norm()`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch

from nnsae.config import SAEConfig, dtype_name
from nnsae.io import hub, registry
from nnsae.io.formats import get_format, norm_scaling_factor

# SAEConfig fields an override may set directly; every other override key is metadata.
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(SAEConfig)) - {"metadata"}


def apply_overrides(cfg_dict: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `cfg_dict` with `overrides` applied: config fields at the top level, anything else in metadata.

    (SAELens adds YAML overrides such as `neuronpedia_id` at the top level, where a 6.x config then drops them;
    in nnsae they land in `metadata`, where they belong.)
    """
    out = copy.deepcopy(cfg_dict)
    metadata = dict(out.get("metadata") or {})
    for key, value in overrides.items():
        if key in _CONFIG_FIELDS:
            out[key] = copy.deepcopy(value)
        else:
            metadata[key] = copy.deepcopy(value)
    out["metadata"] = metadata
    return out


@dataclasses.dataclass
class PretrainedFiles:
    """One pretrained SAE as read from its files and the registry, before an SAE object is built from it."""

    cfg: dict[str, Any]  # SAELens cfg dict with the release's overrides, Neuronpedia id, device and dtype applied
    state_dict: dict[str, torch.Tensor]
    log_sparsity: torch.Tensor | None  # log10 feature density, when the files have it
    norm_scaling_factor: float | None  # the registry's, else what the files record; None when neither says


def read_pretrained(release: str, sae_id: str, *, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = "float32", force_download: bool = False, revision: str | None = None,
                    cache_dir: str | Path | None = None, token: str | bool | None = None) -> PretrainedFiles:
    """Download (or find in the cache) and read `sae_id` of `release`; `SAE.from_pretrained` builds the SAE.

    `release` is a name from the registry (`nnsae.io.registry.list_pretrained()`), or a Hugging Face repo id
    with `sae_id` the SAE's folder in that repo (layout detected: SAELens first, then the other formats).
    `revision`, `cache_dir`, `force_download` and `token` go to `huggingface_hub`; `HF_HUB_OFFLINE=1` reads from
    the cache only.
    """
    entry = registry.lookup(release, sae_id)
    if not entry.in_registry:
        names = registry.releases_for_repo(entry.repo_id)
        if names:
            warnings.warn(
                f"Loading {entry.repo_id!r} by repo id; it is registered as release(s) {names}. Loading by release "
                f"name (e.g. SAE.from_pretrained({names[0]!r}, '<sae_id>')) also applies the release's config "
                f"overrides, Neuronpedia id and norm scaling factor.", UserWarning, stacklevel=3,
            )
    folder, format_name = hub.download_sae(entry.repo_id, entry.path, format=entry.format, revision=revision,
                                           cache_dir=cache_dir, force_download=force_download, token=token)
    cfg_dict, state_dict, log_sparsity = get_format(format_name).load(folder, sae_id=entry.path,
                                                                      repo_id=entry.repo_id)

    overrides = dict(entry.config_overrides)
    if entry.neuronpedia is not None:
        overrides["neuronpedia_id"] = entry.neuronpedia
    overrides["device"] = str(device)
    overrides["dtype"] = dtype_name(dtype)
    cfg_dict = apply_overrides(cfg_dict, overrides)
    factor = None
    if cfg_dict.get("normalize_activations") == "expected_average_only_in":
        factor = entry.norm_scaling_factor or norm_scaling_factor(format_name, folder)
    return PretrainedFiles(cfg=cfg_dict, state_dict=state_dict, log_sparsity=log_sparsity, norm_scaling_factor=factor)


__all__ = ["PretrainedFiles", "apply_overrides", "read_pretrained"]
