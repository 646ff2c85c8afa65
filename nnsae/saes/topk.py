"""TopK and AbsTopK SAEs: keep the k largest pre-activations per token (`torch.topk(..., sorted=False)`)."""

from __future__ import annotations

import torch

from nnsae.saes.base import SAE


class TopKSAE(SAE):
    """With `rescale_acts_by_decoder_norm`, features are selected on z·‖W_dec_i‖ and decoded with W_dec_i/‖W_dec_i‖."""

    architecture = "topk"
    config_fields = ("k", "rescale_acts_by_decoder_norm")

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.k is None:
            cfg.k = 100  # SAELens' default
        if not 0 < cfg.k <= cfg.d_sae:
            raise ValueError(f"k={cfg.k} must be between 1 and d_sae={cfg.d_sae}.")

    def activation(self, pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        values, indices = self.select(pre)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the k active features per token."""
        values, indices = torch.topk(pre, self.cfg.k, dim=-1, sorted=False)
        return torch.relu(values), indices

    def decoder_matmul(self, feature_acts: torch.Tensor) -> torch.Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            feature_acts = feature_acts * (1 / self.W_dec.norm(dim=-1))
        return feature_acts @ self.W_dec

    def fold_W_dec_norm(self) -> None:
        if not self.cfg.rescale_acts_by_decoder_norm:
            raise ValueError(
                "fold_W_dec_norm() would change which features a TopK SAE selects unless "
                "rescale_acts_by_decoder_norm=True; it is not supported for this SAE."
            )
        SAE.fold_W_dec_norm(self)


class AbsTopKSAE(TopKSAE):
    """Top-k by |z|, keeping signed values (no ReLU)."""

    architecture = "abstopk"

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.topk(pre.abs(), self.cfg.k, dim=-1, sorted=False).indices
        return pre.gather(-1, indices), indices
