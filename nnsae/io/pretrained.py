"""Loading a pretrained SAE by release name (or Hugging Face repo id) and SAE id, as SAELens' `from_pretrained` does.

Flow: look the SAE up in the registry → download its files → read them with its format → apply the release's
`config_overrides`, its Neuronpedia id (into `metadata.neuronpedia_id`), `device` and `dtype` → build the SAE →
fold the registry's `norm_scaling_factor` when the SAE expects `expected_average_only_in` input scaling → cast →
optionally `fold_W_dec_norm()`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nnsae.config import SAEConfig, dtype_name, parse_dtype
from nnsae.io import hub, registry
from nnsae.io.formats import get_format, norm_scaling_factor

if TYPE_CHECKING:
    from nnsae.architectures import SAE

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


def load_pretrained(release: str, sae_id: str, *, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = "float32", force_download: bool = False, revision: str | None = None,
                    fold_W_dec_norm: bool = False, cache_dir: str | Path | None = None,
                    token: str | bool | None = None) -> tuple[SAE, dict[str, Any], torch.Tensor | None]:
    """(SAE, its config dict, log10 feature sparsity or None) for `sae_id` of `release`.

    `release` is a name from the registry (`nnsae.io.registry.list_pretrained()`), or a Hugging Face repo id
    with `sae_id` the SAE's folder in that repo (layout detected: SAELens first, then the other formats).
    `revision`, `cache_dir`, `force_download` and `token` go to `huggingface_hub`; `HF_HUB_OFFLINE=1` loads from
    the cache only. The config dict returned is the SAE's `cfg.to_dict()` (before any `fold_W_dec_norm`).
    """
    from nnsae.architectures import SAE

    entry = registry.lookup(release, sae_id)
    if not entry.in_registry:
        names = registry.releases_for_repo(entry.repo_id)
        if names:
            warnings.warn(
                f"Loading {entry.repo_id!r} by repo id; it is registered as release(s) {names}. Loading by release "
                f"name (e.g. load_pretrained({names[0]!r}, '<sae_id>')) also applies the release's config overrides, "
                f"Neuronpedia id and norm scaling factor.", UserWarning, stacklevel=2,
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

    sae = SAE.from_dict(cfg_dict, state_dict, device=device, dtype=dtype)
    if log_sparsity is not None:
        log_sparsity = log_sparsity.to(device=torch.device(device))
    sae.log_feature_sparsity = log_sparsity
    if sae.cfg.normalize_activations == "expected_average_only_in":
        factor = entry.norm_scaling_factor or norm_scaling_factor(format_name, folder)
        if factor is not None:
            sae.fold_activation_norm_scaling_factor(factor)
        else:
            warnings.warn(
                f"SAE {sae_id!r} of {release!r} expects inputs scaled by a norm factor "
                f"(normalize_activations='expected_average_only_in') but the registry has no norm_scaling_factor "
                f"for it; the factor is not folded, so scale inputs yourself.", UserWarning, stacklevel=2,
            )
    sae = sae.to(device=torch.device(device), dtype=parse_dtype(dtype))  # guarantee the requested placement
    returned_cfg = sae.cfg.to_dict()
    if fold_W_dec_norm:
        sae.fold_W_dec_norm()
    return sae, returned_cfg, log_sparsity


__all__ = ["apply_overrides", "load_pretrained"]
