"""SAELens 6 layout, nnsae's own: cfg.json + sae_weights.safetensors (+ sparsity.safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nnsae.config import SAEConfig, migrate_legacy_config
from nnsae.io.files import read_json, read_safetensors
from nnsae.rundir import write_json, write_safetensors

if TYPE_CHECKING:
    from nnsae.architectures import SAE

NAME = "saelens"
CFG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"


def files(path_in_repo: str) -> tuple[list[str], list[str]]:
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo.strip("/") else ""
    return [prefix + CFG, prefix + WEIGHTS], [prefix + SPARSITY]


def detect(directory: Path) -> bool:
    return (directory / CFG).is_file() and (directory / WEIGHTS).is_file()


def load(directory: Path, *, sae_id: str | None = None, repo_id: str | None = None
         ) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor | None]:
    cfg = read_json(directory / CFG)
    try:  # checked here, where the file is known: a wrong type or value names cfg.json and the key
        SAEConfig.from_dict(cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{directory / CFG}: {e} Fix the file (see the SAELens cfg.json format) or "
                         "re-save the SAE.") from None
    cfg = migrate_legacy_config(cfg)
    state_dict = read_safetensors(directory / WEIGHTS)
    _fold_legacy_scaling_factor(state_dict)
    log_sparsity = None
    if (directory / SPARSITY).is_file():
        log_sparsity = read_safetensors(directory / SPARSITY).get("sparsity")
        if log_sparsity is None or log_sparsity.shape != (cfg.get("d_sae"),):
            raise ValueError(f"{directory / SPARSITY} must hold a 'sparsity' tensor of shape [d_sae].")
    return cfg, state_dict, log_sparsity


def _fold_legacy_scaling_factor(state_dict: dict[str, torch.Tensor]) -> None:
    """Pre-6.0 SAEs may carry `scaling_factor` (decode was `(f * s) @ W_dec`); fold it into W_dec's rows."""
    scale = state_dict.pop("scaling_factor", None)
    if scale is not None and not torch.all(scale == 1):
        state_dict["W_dec"] = state_dict["W_dec"] * scale[:, None].to(state_dict["W_dec"].dtype)


def save(sae: SAE, directory: Path, log_sparsity: torch.Tensor | None = None) -> tuple[Path, Path]:
    """Write `sae` (weights first, config last, each atomically) and return (weights path, cfg path)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS, sae.state_dict())
    if log_sparsity is not None:
        write_safetensors(directory / SPARSITY, {"sparsity": log_sparsity.float()})
    write_json(directory / CFG, sae.cfg.to_dict())
    return directory / WEIGHTS, directory / CFG
