"""SAE file formats. Each format is one module with `NAME`, `files`, `detect` and `load` (see `saelens.py`)."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import torch

# Detection order: the most specific file sets first.
FORMAT_NAMES = ("saelens", "sparsify", "gemma_scope_2", "dictionary_learning", "llama_scope", "gemma_scope")


def get_format(name: str) -> ModuleType:
    if name not in FORMAT_NAMES:
        raise ValueError(f"Unknown SAE format {name!r}; supported formats: {list(FORMAT_NAMES)}.")
    return importlib.import_module(f"nnsae.io.formats.{name}")


def detect_format(directory: Path) -> str:
    """The name of the format whose files are in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"SAE directory {directory} does not exist.")
    for name in FORMAT_NAMES:
        if get_format(name).detect(directory):
            return name
    found = sorted(p.name for p in directory.iterdir())[:20]
    raise ValueError(
        f"Could not detect the SAE format of {directory} (files: {found}). Supported formats: {list(FORMAT_NAMES)}; "
        f"pass format=... if the files are there under other names."
    )


def load_directory(directory: Path, format: str | None = None, *, sae_id: str | None = None,
                   repo_id: str | None = None) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor | None]:
    """(SAELens cfg dict, state dict, log10 sparsity or None) of the SAE stored in `directory`."""
    directory = Path(directory)
    name = format or detect_format(directory)
    try:
        return get_format(name).load(directory, sae_id=sae_id, repo_id=repo_id)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a file with missing entries or wrong types
        raise ValueError(f"Cannot read the {name} SAE in {directory}: its files are malformed "
                         f"({type(e).__name__}: {e}).") from e


def norm_scaling_factor(name: str, directory: Path) -> float | None:
    """The input scale an `expected_average_only_in` SAE of this format was trained with, when its files say."""
    reader = getattr(get_format(name), "norm_scaling_factor", None)
    return reader(Path(directory)) if reader is not None else None
