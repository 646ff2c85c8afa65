"""Reading files safely (clear errors naming the file, no pickle) and the cache folder. Writing is `nnsae.rundir`'s
(atomic files); `atomic_write` is re-exported here for callers that still import it from this module."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nnsae.rundir import atomic_write  # noqa: F401  (nnsae.dashboards.build imports it from here)


def cache_dir(kind: str) -> Path:
    """Where nnsae keeps derived files of `kind` (compiled kernels, parsed docstrings): `$NNSAE_CACHE/kind`, by
    default `~/.cache/nnsae/kind` (or under `$XDG_CACHE_HOME`). Anything in it can be deleted."""
    root = os.environ.get("NNSAE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nnsae"
    return Path(root) / kind


def require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"Missing SAE file {path}.")
    return path


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(require(path)) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated.") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    require(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); the file is corrupt or truncated.") from None
