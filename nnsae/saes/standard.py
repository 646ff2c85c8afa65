"""ReLU SAE: f = ReLU(x̃ W_enc + b_enc)."""

from __future__ import annotations

from nnsae.saes.base import SAE


class StandardSAE(SAE):
    architecture = "standard"
