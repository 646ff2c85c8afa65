"""TopK and AbsTopK SAEs: keep the k largest pre-activations per token.

Where nothing can observe the dense activations (`SAE.observed`), encoding selects the k latents without a dense
float32 pre-activation matrix (`nnsae.kernels.topk_preacts`: a bf16 ranking, float32 values, a proven bound, dense
fallback per row) and reconstruction decodes only those k rows of W_dec; otherwise the dense path runs, so hook
modules see (and may edit) exactly what SAELens computes. Both give the dense result up to float summation order.
"""

from __future__ import annotations

import torch

from nnsae import kernels
from nnsae.architectures.base import SAE, native_kernels


class TopKSAE(SAE):
    """With `rescale_acts_by_decoder_norm`, features are selected on z·‖W_dec_i‖ and decoded with W_dec_i/‖W_dec_i‖."""

    architecture = "topk"
    config_fields = ("k", "rescale_acts_by_decoder_norm")
    absolute = False  # select by |z| and keep signs (AbsTopK) instead of by z with a ReLU

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
        return self._scatter(values, indices, pre.shape)

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the k active features per token."""
        values, indices = kernels.dense_topk(pre.reshape(-1, pre.shape[-1]), self.cfg.k, self.absolute,
                                             native_kernels())
        values = values if self.absolute else torch.relu(values)
        return values.view(*pre.shape[:-1], values.shape[-1]), indices.view(*pre.shape[:-1], indices.shape[-1])

    def decoder_matmul(self, feature_acts: torch.Tensor) -> torch.Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            feature_acts = feature_acts * (1 / self.W_dec.norm(dim=-1))
        return SAE.decoder_matmul(self, feature_acts)

    # ---- the sparse path ----------------------------------------------------------------------------------------

    def _sparse_allowed(self, x: torch.Tensor, hooks: tuple[str, ...]) -> bool:
        # Autograd needs the dense graph; hook points someone can observe need the dense tensors.
        needs_grad = self._grad_mode() and (x.requires_grad or self.W_enc.requires_grad)
        return not needs_grad and not self.observed(*hooks)

    def sparse_encode(self, x: torch.Tensor, ordered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each (..., k): the active features of `encode(x)` without the dense tensors (a value
        may be 0 where fewer than k pre-activations are positive), in no particular order or, if `ordered`, by
        pre-activation descending then index ascending. Skips `hook_sae_acts_pre`/`_post`."""
        sae_in = self.process_sae_in(x)
        flat = sae_in.reshape(-1, sae_in.shape[-1])
        scale = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        weights, native = None, native_kernels()
        if kernels.bf16_is_fast(flat.device, flat.dtype):
            cache = self.__dict__.setdefault("_bf16_cache", {})  # not a buffer: never saved nor pickled
            weights = kernels.bf16_weights(cache, self.W_enc, self.b_enc,
                                           self.W_dec if scale is not None else None, scale)
        values, indices = kernels.topk_preacts(flat, self.W_enc, self.b_enc, self.cfg.k, absolute=self.absolute,
                                               relu=not self.absolute, scale=scale, weights=weights,
                                               ordered=ordered, native=native)
        values = values if self.absolute else torch.relu(values)
        return values.view(*sae_in.shape[:-1], values.shape[-1]), indices.view(*sae_in.shape[:-1], indices.shape[-1])

    def sparse_decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`decode` of the activations `sparse_encode` gave, reading only their k rows of W_dec."""
        if self.cfg.rescale_acts_by_decoder_norm:
            values = values * (1 / self.W_dec.norm(dim=-1)).index_select(0, indices.reshape(-1)).view_as(values)
        flat = kernels.sparse_decode(values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1]),
                                     self.W_dec)
        recons = self._hook("hook_sae_recons", flat.view(*values.shape[:-1], flat.shape[-1]) + self.b_dec)
        return self._reshape_out(self._normalize_out(recons))

    def __getstate__(self) -> dict:
        # The bf16 weight cache is derived data: never ship it with a pickled SAE (e.g. a payload sent to NDIF).
        state = self.__dict__.copy()
        state.pop("_bf16_cache", None)
        return state

    def _scatter(self, values: torch.Tensor, indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return torch.zeros(shape, dtype=values.dtype, device=values.device).scatter_(-1, indices, values)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if not self._sparse_allowed(x, ("hook_sae_acts_pre",)):
            return SAE.encode(self, x)
        values, indices = self.sparse_encode(x)
        shape = (*values.shape[:-1], self.cfg.d_sae)
        return self._hook("hook_sae_acts_post", self._scatter(values, indices, shape))

    def encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._sparse_allowed(x, ("hook_sae_acts_pre", "hook_sae_acts_post")):
            return SAE.encode_decode(self, x)
        values, indices = self.sparse_encode(x)
        return (self._scatter(values, indices, (*values.shape[:-1], self.cfg.d_sae)),
                self.sparse_decode(values, indices))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        if not self._sparse_allowed(x, ("hook_sae_acts_pre", "hook_sae_acts_post")):
            return SAE.reconstruct(self, x)
        return self.sparse_decode(*self.sparse_encode(x))

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
    absolute = True
