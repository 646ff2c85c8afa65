"""ReLU SAE: f = ReLU(x̃ W_enc + b_enc)."""

from __future__ import annotations

from nnsae.architectures.base import SAE


class StandardSAE(SAE):
    architecture = "standard"
