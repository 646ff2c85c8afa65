"""What the `nnsae` subcommands (`nnsae.cli`, `nnsae.dashboards.cli`) share: how an SAE is named on the command line."""

from __future__ import annotations

from pathlib import Path

from nnsae.architectures import SAE


def load_sae_arg(spec: str, device: str = "cpu", dtype: str | None = None, format: str | None = None) -> SAE:
    """An SAE named on the command line: a local directory (any supported format) or `RELEASE:SAE_ID`."""
    if Path(spec).exists():
        return SAE.load_from_disk(spec, device=device, dtype=dtype, format=format)
    release, sep, sae_id = spec.partition(":")
    if not sep:
        raise SystemExit(f"error: {spec!r} is neither an existing directory nor RELEASE:SAE_ID.")
    return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype or "float32")


__all__ = ["load_sae_arg"]
