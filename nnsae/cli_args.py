"""What the `nnsae` subcommands (`nnsae.cli`, `nnsae.dashboards.cli`) share: how an SAE is named on the command line."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch

from nnsae.architectures import SAE
from nnsae.models import SMOLLM2, load_model


def load_sae_arg(spec: str, device: str = "cpu", dtype: str | None = None, format: str | None = None) -> SAE:
    """An SAE named on the command line: a local directory (any supported format) or `RELEASE:SAE_ID`."""
    if Path(spec).exists():
        return SAE.load_from_disk(spec, device=device, dtype=dtype, format=format)
    release, sep, sae_id = spec.partition(":")
    if not sep:
        raise SystemExit(f"error: {spec!r} is neither an existing directory nor RELEASE:SAE_ID.")
    return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype or "float32")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `nnsae train: error: argument --k: ... (see nnsae train --help)`; its
    subparsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def token_count(minimum: int = 1) -> Callable[[str], int]:
    """An argparse type for token counts: '200000', '2e5' or '200_000' → 200000; at least `minimum`, whole."""
    def parse(text: str) -> int:
        try:
            value = float(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of tokens") from None
        if not math.isfinite(value) or value < minimum or value != int(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= {minimum}")
        return int(value)

    return parse


def boolean(text: str) -> bool:
    """An argparse type for true/false flags given a value: 1/true/yes or 0/false/no."""
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: use true or false")
    return value in ("1", "true", "yes")


def check_device(device: str) -> str:
    """`--device`: a torch device string whose backend this machine has."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a torch device: use cpu, cuda, cuda:N or mps.") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if kind in available and not available[kind]():
        raise ValueError(f"--device {device}: {kind.upper() if kind == 'cuda' else kind} is not available on this "
                         "machine (or in this torch build); use --device cpu.")
    return device


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


def load_model_arg(name: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """`--model`: 'smollm2', a local model folder or an HF model id, with errors that name what is missing."""
    path = Path(name).expanduser()
    if name != SMOLLM2 and path.exists() and not (path / "config.json").is_file():
        raise ValueError(f"--model {name}: no model at {path} (expected a folder with config.json and the weights, "
                         "as save_pretrained writes).")
    if name != SMOLLM2 and not path.exists() and _looks_like_path(name):
        raise ValueError(f"--model {name}: no model at {path} (no such folder); pass a local model folder, an HF "
                         "model id such as 'gpt2' or 'org/name', or 'smollm2'.")
    return load_model(name, device=device, dtype=dtype)


__all__ = ["Parser", "boolean", "check_device", "load_model_arg", "load_sae_arg", "token_count"]
