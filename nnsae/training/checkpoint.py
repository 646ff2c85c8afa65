"""Atomic checkpoint directories, and state dicts split into JSON + safetensors (no pickle).

A checkpoint's files are written (each fsynced) into `{root}/.tmp-step-N-<pid>/`, renamed to `{root}/step-N/` when
complete, so a run killed at any moment leaves either the previous checkpoint or the new one, never a half-written
one. Older checkpoints are removed once a newer one is in place.

Only the optimizer state goes through `torch.save` (loaded back with `weights_only=True`); everything else is
JSON (plain values) plus safetensors (tensors). `split_state` turns a nested state (dicts, lists, tensors, plain
values) into a JSON tree whose tensors are references into a flat tensor dict, and `join_state` undoes it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from nnsae.rundir import fsync_dir

_STEP_DIR = re.compile(r"^step-(\d+)$")


def split_state(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(state, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = state.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(state, dict):
        if not all(isinstance(k, str) for k in state):
            raise TypeError(f"Cannot checkpoint {prefix or 'state'}: dict keys must be strings.")
        return {k: split_state(v, f"{prefix}.{k}" if prefix else k, tensors) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    if hasattr(state, "item") and callable(state.item):  # numpy scalars
        return state.item()
    raise TypeError(f"Cannot checkpoint {prefix or 'state'} of type {type(state).__name__}: use tensors, "
                    f"dicts, lists and plain values.")


def join_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        return {k: join_state(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_state(v, tensors) for v in tree]
    return tree


def rng_state(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Global RNG states (torch CPU tensor → `tensors`, Python's and NumPy's as JSON)."""
    tensors["rng.torch"] = torch.get_rng_state()
    version, internal, gauss = random.getstate()
    out: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover
        pass
    return out


def set_rng_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def latest(root: Path) -> Path | None:
    """The most recent complete checkpoint under root, or None."""
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def begin(root: Path, step: int) -> Path:
    """A fresh temporary directory to write checkpoint `step` into."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(root: Path, tmp: Path, step: int) -> Path:
    """Atomically publish `tmp` as `step-N`, then delete older checkpoints and stale temporary directories."""
    final = root / f"step-{step}"
    if final.exists():  # re-checkpointing the same step (e.g. a signal right after a periodic checkpoint)
        shutil.rmtree(tmp)
        return final
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(root)
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if (m and int(m.group(1)) < step) or p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
    return final

