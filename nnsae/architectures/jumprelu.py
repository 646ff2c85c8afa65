"""JumpReLU SAE: f = ReLU(z) · 1[z > θ] with a per-feature threshold θ (strict inequality)."""

from __future__ import annotations

import torch

from nnsae.architectures.base import SAE


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    param_shapes = {**SAE.param_shapes, "threshold": "sae"}

    def activation(self, pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    activation.fused_kind = "jumprelu"  # what `kernels.bias_activation` computes for this exact method

    def fold_encoder_scale(self, norms: torch.Tensor) -> None:
        self.b_enc.mul_(norms)
        self.threshold.mul_(norms)
