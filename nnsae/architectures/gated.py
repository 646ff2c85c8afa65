"""Gated SAE (Rajamanoharan et al. 2024): a gate path and a magnitude path sharing W_enc."""

from __future__ import annotations

import torch

from nnsae import kernels
from nnsae.architectures.base import SAE, native_kernels


class GatedSAE(SAE):
    architecture = "gated"
    param_shapes = {"W_enc": "in,sae", "W_dec": "sae,in", "b_gate": "sae", "b_mag": "sae", "r_mag": "sae",
                    "b_dec": "in"}

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        # The magnitude path is what SAELens exposes at hook_sae_acts_pre: x (W_enc·exp(r_mag)) + b_mag, computed as
        # (x W_enc)·exp(r_mag) + b_mag so that `encode` shares the one product x W_enc with the gate.
        return self._magnitude(x @ self.W_enc)

    def _magnitude(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * self.r_mag.exp() + self.b_mag

    def activation(self, pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate = (x @ self.W_enc + self.b_gate > 0).to(pre.dtype)
        return gate * torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """`activation(pre_activation(x), x)` through the hook points, with x W_enc computed once."""
        sae_in = self.process_sae_in(x)
        hidden = sae_in @ self.W_enc
        if self.may_fuse(sae_in):  # nothing sees the magnitude pre-activation: gate and magnitude in one pass
            acts = kernels.bias_activation(hidden, self.b_gate, "gated", scale=self.r_mag.exp(), b2=self.b_mag,
                                           native=native_kernels())
        else:
            pre = self._hook("hook_sae_acts_pre", self._magnitude(hidden))
            acts = (hidden + self.b_gate > 0).to(pre.dtype) * torch.relu(pre)
        return self._hook("hook_sae_acts_post", acts)

    def fold_encoder_scale(self, norms: torch.Tensor) -> None:
        # r_mag is a multiplicative factor on the already-rescaled W_enc, so it stays.
        self.b_gate.mul_(norms)
        self.b_mag.mul_(norms)
