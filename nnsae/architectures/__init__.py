"""The SAE family: one base class, one small class per architecture, and their registration in the table that maps
names to classes (`ARCHITECTURES`, kept in `nnsae.config` so configs can be checked against it)."""

from __future__ import annotations

from nnsae.architectures.base import SAE
from nnsae.architectures.gated import GatedSAE
from nnsae.architectures.jumprelu import JumpReLUSAE
from nnsae.architectures.standard import StandardSAE
from nnsae.architectures.topk import AbsTopKSAE, TopKSAE
from nnsae.architectures.transcoder import (JumpReLUSkipTranscoder, JumpReLUTranscoder, SkipTranscoder,
                                           TopKSkipTranscoder, TopKTranscoder, Transcoder)
from nnsae.config import ARCHITECTURES, architecture_class


def register_architecture(cls: type[SAE]) -> type[SAE]:
    """Register an SAE subclass under `cls.architecture` (usable as a class decorator)."""
    if cls.architecture in ARCHITECTURES:
        raise ValueError(f"Architecture {cls.architecture!r} is already registered.")
    ARCHITECTURES[cls.architecture] = cls
    return cls


for _builtin in (StandardSAE, GatedSAE, JumpReLUSAE, TopKSAE, AbsTopKSAE, Transcoder, SkipTranscoder,
                 JumpReLUTranscoder, JumpReLUSkipTranscoder, TopKTranscoder, TopKSkipTranscoder):
    register_architecture(_builtin)
del _builtin


__all__ = ["ARCHITECTURES", "SAE", "AbsTopKSAE", "GatedSAE", "JumpReLUSAE", "JumpReLUSkipTranscoder",
           "JumpReLUTranscoder", "SkipTranscoder", "StandardSAE", "TopKSAE", "TopKSkipTranscoder", "TopKTranscoder",
           "Transcoder", "architecture_class",
           "register_architecture"]
