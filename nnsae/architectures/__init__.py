"""The SAE family: one base class, one small class per architecture, and the table that maps names to classes."""

from __future__ import annotations

from nnsae.architectures.base import SAE
from nnsae.architectures.gated import GatedSAE
from nnsae.architectures.jumprelu import JumpReLUSAE
from nnsae.architectures.standard import StandardSAE
from nnsae.architectures.topk import AbsTopKSAE, TopKSAE
from nnsae.architectures.transcoder import JumpReLUSkipTranscoder, JumpReLUTranscoder, SkipTranscoder, Transcoder

ARCHITECTURES: dict[str, type[SAE]] = {
    cls.architecture: cls
    for cls in (StandardSAE, GatedSAE, JumpReLUSAE, TopKSAE, AbsTopKSAE, Transcoder, SkipTranscoder,
                JumpReLUTranscoder, JumpReLUSkipTranscoder)
}


def architecture_class(architecture: str) -> type[SAE]:
    """The SAE class for an architecture name, with an error listing the known ones."""
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"Unknown SAE architecture {architecture!r}; known architectures: {sorted(ARCHITECTURES)}."
        ) from None


def register_architecture(cls: type[SAE]) -> type[SAE]:
    """Register an SAE subclass under `cls.architecture` (usable as a class decorator)."""
    if cls.architecture in ARCHITECTURES:
        raise ValueError(f"Architecture {cls.architecture!r} is already registered.")
    ARCHITECTURES[cls.architecture] = cls
    return cls


__all__ = ["ARCHITECTURES", "SAE", "AbsTopKSAE", "GatedSAE", "JumpReLUSAE", "JumpReLUSkipTranscoder",
           "JumpReLUTranscoder", "SkipTranscoder", "StandardSAE", "TopKSAE", "Transcoder", "architecture_class",
           "register_architecture"]
