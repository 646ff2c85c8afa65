"""Gated SAE (Rajamanoharan et al. 2024): a gate path and a magnitude path sharing W_enc."""

from __future__ import annotations

import torch

from nnsae.architectures.base import SAE


class GatedSAE(SAE):
    architecture = "gated"
    param_shapes = {"W_enc": "in,sae", "W_dec": "sae,in", "b_gate": "sae", "b_mag": "sae", "r_mag": "sae",
                    "b_dec": "in"}

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        # The magnitude path is what SAELens exposes at hook_sae_acts_pre.
        return x @ (self.W_enc * self.r_mag.exp()) + self.b_mag

    def activation(self, pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate = (x @ self.W_enc + self.b_gate > 0).to(pre.dtype)
        return gate * torch.relu(pre)

    def fold_encoder_scale(self, norms: torch.Tensor) -> None:
        # r_mag is a multiplicative factor on the already-rescaled W_enc, so it stays.
        self.b_gate.mul_(norms)
        self.b_mag.mul_(norms)
