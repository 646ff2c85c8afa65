"""Small, safe file helpers shared by the formats: clear errors naming the file, atomic writes, no pickle."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


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
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated.") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    require(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); the file is corrupt or truncated.") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide saved SAEs from other users


def atomic_write(path: Path, write: Callable[[str], object], prefix: str = ".", fsync: bool = False) -> None:
    """Write `path` through `write(tmp_path)` into a temp file beside it (named `{prefix}{name}.*.tmp`), optionally
    fsync it, then `os.replace` it into place: readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{prefix}{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)  # after writing: some writers (safetensors) replace the file they are given
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)

    atomic_write(path, write)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
