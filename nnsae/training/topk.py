"""TopK and AbsTopK SAE training (Gao et al. 2024), SAELens 6 semantics, with a sparse forward/backward.

`z = x̃ W_enc + b_enc`; with `rescale_acts_by_decoder_norm` (default) the hidden pre-activation is `h = z ⊙ n`,
`n_i = ‖W_dec_i‖` (differentiable), else `h = z`. TopK keeps the k largest `h` per token and ReLUs them; AbsTopK
keeps the k largest `|h|` with their signs. `x̂ = (f ⊙ 1/n) W_dec + b_dec` (`f W_dec + b_dec` without rescaling).
Loss = MSE + AuxK when some latents are dead (not fired for `dead_feature_window` steps):
`k_aux = d_in // 2`, `scale = min(n_dead / k_aux, 1)`, the top `min(k_aux, n_dead)` dead `h` (by `|h|` for
AbsTopK; not ReLU'd) decoded without b_dec, `auxiliary_reconstruction_loss = aux_coef · scale ·
mean_batch ‖e_aux − (x − x̂).detach()‖²`.

With `sparse_kernels` (default) only the selection matmul is dense; all gradients go through the selected
entries (`nnsae.training.sparse`). With `autocast`, that selection matmul runs in bf16 (5× faster than float32 on
CPUs with AMX) and only proposes candidates: the top 2k per token by bf16 value are re-scored with exact float
dot products and the exact top k kept, so rounding and bf16 ties do not bias which latents are chosen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nnsae import kernels, native
from nnsae.architectures import SAE
from nnsae.config import SAEConfig
from nnsae.training import sparse
from nnsae.training.base import StepContext, StepOutput, TrainingSAE, mse
from nnsae.training.sparse import Pattern


class TopKTrainingSAE(TrainingSAE):
    architecture = "topk"
    holder_architecture = "topk"

    def initialize(self) -> None:
        TrainingSAE.initialize(self)
        self.native = native.library()  # the C++ row top-k on CPU; None without a compiler
        if self.cfg.sparse_kernels:
            # W_enc keeps its [d_in, d_sae] shape but is stored latent-major, the layout its sparse gradient has.
            self.sae.W_enc = nn.Parameter(self.sae.W_enc.detach().t().contiguous().t())

    # ---- selection (no grad) ------------------------------------------------------------------------------------

    @property
    def rescale(self) -> bool:
        return self.cfg.rescale_acts_by_decoder_norm

    def shifted_input(self, x: torch.Tensor) -> torch.Tensor:
        """x̃ = x − b_dec (x itself without apply_b_dec_to_input), detached: computed once per step."""
        return (x - self.sae.b_dec).detach() if self.cfg.apply_b_dec_to_input else x.detach()

    def selection_preacts(self, x_in: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
        """h = (x̃ W_enc + b_enc) ⊙ n as one (possibly bf16) matmul, without grad, into the step buffer (h is not
        used after the step's forward)."""
        dtype = torch.bfloat16 if self.cfg.autocast else x_in.dtype
        with torch.no_grad():
            out = sparse.step_buffer((x_in.shape[0], self.cfg.d_sae), dtype, x_in.device)
            return sparse.biased_matmul(x_in, self.sae.W_enc, self.sae.b_enc, dtype, col_scale=norms, out=out)

    @property
    def refine(self) -> bool:
        """bf16 selection matmul: search candidates in bf16, decide on exact float32 values."""
        return self.cfg.autocast and self.cfg.sparse_kernels

    def raw_values(self, x_in: torch.Tensor, h: torch.Tensor, pattern: Pattern, norms: torch.Tensor | None
                   ) -> torch.Tensor:
        """The pre-activations x̃ W_enc + b_enc (before ×n) at the pattern, (nnz,), without grad: exact float
        dot products (O(nnz·d_in)) when the selection matmul ran in bf16, else read from h."""
        sae = self.sae
        with torch.no_grad():
            if self.refine:
                return sparse.row_dots(x_in, sae.W_enc.t(), pattern) + sae.b_enc[pattern.cols]
            if pattern.k is not None:
                values = h.gather(1, pattern.cols.view(pattern.n_rows, pattern.k)).reshape(-1).to(self.dtype)
            else:
                values = h[pattern.rows, pattern.cols].to(self.dtype)
            return values / norms[pattern.cols] if norms is not None else values

    @property
    def absolute(self) -> bool:
        return self.architecture == "abstopk"

    def key(self, h: torch.Tensor) -> torch.Tensor:
        return h.abs() if self.absolute else h

    def select(self, x_in: torch.Tensor, h: torch.Tensor, norms: torch.Tensor | None, ctx: StepContext
               ) -> tuple[Pattern, torch.Tensor]:
        """(pattern of the k latents per token, their raw pre-activations)."""
        n_rows, n_cols = h.shape
        k = int(self.cfg.k)
        if not self.refine:
            pattern = Pattern.from_topk(kernels.row_topk(h, k, self.native, self.absolute), n_cols)
            return pattern, self.raw_values(x_in, h, pattern, norms)
        # Ties and rounding in bf16 would bias the choice; the top 2k by bf16 contain the exact top k.
        m = min(2 * k, n_cols)
        candidates = kernels.row_topk(h, m, self.native, self.absolute)
        raw = self.raw_values(x_in, h, Pattern.from_topk(candidates, n_cols), norms).view(n_rows, m)
        exact = raw * norms[candidates] if norms is not None else raw
        pos = torch.topk(self.key(exact), k, dim=-1, sorted=False).indices
        return Pattern.from_topk(candidates.gather(1, pos), n_cols), raw.gather(1, pos).reshape(-1)

    def activation(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.architecture == "abstopk" else torch.relu(hidden)

    def select_aux(self, x_in: torch.Tensor, h: torch.Tensor, norms: torch.Tensor | None, dead: torch.Tensor,
                   lo: int = 0, hi: int | None = None) -> tuple[Pattern, torch.Tensor, float] | None:
        """(pattern, raw pre-activations, loss scale) of the top dead latents among columns lo:hi per token."""
        dead_idx = dead[lo:hi].nonzero().squeeze(1) + lo
        n_dead = dead_idx.numel()
        if n_dead == 0:
            return None
        k_aux = self.d_in // 2
        scale = min(n_dead / k_aux, 1.0)
        pos = kernels.row_topk(h.index_select(1, dead_idx), min(k_aux, n_dead), self.native, self.absolute)
        pattern = Pattern.from_topk(dead_idx[pos], h.shape[1])
        return pattern, self.raw_values(x_in, h, pattern, norms), scale

    def aux_groups(self, x_in: torch.Tensor, h: torch.Tensor, norms: torch.Tensor | None, dead: torch.Tensor
                   ) -> list[tuple[Pattern, torch.Tensor, float, int | None]]:
        """AuxK selections as (pattern, raw values, scale, level): level None fits the residual of x̂."""
        group = self.select_aux(x_in, h, norms, dead)
        return [] if group is None else [(*group, None)]

    # ---- differentiable values at a pattern ---------------------------------------------------------------------

    def hidden_at(self, x: torch.Tensor, x_in: torch.Tensor, raw: torch.Tensor, pattern: Pattern,
                  norms: torch.Tensor | None) -> torch.Tensor:
        """h at the pattern's entries, (nnz,), differentiable w.r.t. the parameters (sparse backward).

        `raw` holds the (detached) forward values of x̃ W_enc + b_enc there (`raw_values`)."""
        sae = self.sae
        if not self.cfg.sparse_kernels:
            return sparse.at(self._dense_hidden(x, norms).reshape(-1), pattern.rows * pattern.n_cols + pattern.cols)
        b_dec = sae.b_dec if self.cfg.apply_b_dec_to_input else None
        pre = sparse.preacts(x, b_dec, sae.W_enc, sae.b_enc, raw, pattern, x_in)
        return pre * sparse.at(norms, pattern.cols) if norms is not None else pre

    def _dense_hidden(self, x: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
        # Plain dense autograd (sparse_kernels=False), as SAELens computes it; cached for the step.
        if getattr(self, "_dense_cache", None) is None:
            sae = self.sae
            with self.autocast():
                x_in = x - sae.b_dec if self.cfg.apply_b_dec_to_input else x
                z = x_in @ sae.W_enc + sae.b_enc
                self._dense_cache = z * norms if norms is not None else z
        return self._dense_cache

    def decode_at(self, coef: torch.Tensor, pattern: Pattern, norms: torch.Tensor | None) -> torch.Tensor:
        """Σ_e coef_e / n_col · W_dec[col] per token (no bias)."""
        W_dec = self.sae.W_dec
        if norms is not None:
            coef = coef * sparse.at(1 / norms, pattern.cols)
        if self.cfg.sparse_kernels:
            return sparse.decode(W_dec, coef, pattern)
        with self.autocast():
            return sparse.to_dense(coef, pattern) @ W_dec

    def reconstruct(self, acts: torch.Tensor, pattern: Pattern, norms: torch.Tensor | None,
                    base: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """(x̂, [(width, partial reconstruction)] for nested architectures); `base` is what x̂ has without any
        latent (b_dec, plus a skip transcoder's skip path)."""
        return self.decode_at(acts, pattern, norms) + base, []

    # ---- the step -----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        self._dense_cache = None
        try:
            return self._forward(x, ctx)
        finally:
            self._dense_cache = None

    def _forward(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        sae = self.sae
        x = x.to(self.dtype)
        y = self.target(x, ctx)
        norms = sparse.row_norms(sae.W_dec) if self.rescale else None
        norms_d = None if norms is None else norms.detach()
        x_in = self.shifted_input(x)
        if self.cfg.sparse_kernels:
            h = self.selection_preacts(x_in, norms_d)  # bf16 with autocast
        else:
            h = self._dense_hidden(x, norms).detach()
        dead = ctx.dead_mask
        groups = self.aux_groups(x_in, h, norms_d, dead) if dead is not None and bool(dead.any()) else []
        pattern, raw = self.select(x_in, h, norms_d, ctx)
        acts = self.activation(self.hidden_at(x, x_in, raw, pattern, norms))
        x_hat, partials = self.reconstruct(acts, pattern, norms, sae.b_dec + self.skip(x))
        losses = {"mse_loss": mse(x_hat, y)}
        for width, partial in partials[:-1]:
            losses[f"inner_mse_loss_{width}"] = mse(partial, y)
        aux = x_hat.new_zeros(())
        for aux_pattern, aux_raw, scale, level in groups:
            residual = y - (x_hat if level is None else partials[level][1])
            recons = self.decode_at(self.hidden_at(x, x_in, aux_raw, aux_pattern, norms), aux_pattern, norms)
            aux = aux + scale * mse(recons, residual.detach())
        losses["auxiliary_reconstruction_loss"] = self.cfg.aux_loss_coefficient * aux
        metrics = self.after_forward(acts, ctx)
        with torch.no_grad():
            active = acts.detach() != 0
            fired = torch.bincount(pattern.cols[active], minlength=self.cfg.d_sae).to(torch.float32)
            l0 = active.sum().to(torch.float32) / x.shape[0]
        return StepOutput(sum(losses.values()), losses, y, x_hat, fired, l0, metrics)

    def after_forward(self, acts: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        return {}

    # ---- export -------------------------------------------------------------------------------------------------

    def export_rules(self, sae: SAE, scaling_factor: float | None) -> SAE:
        if self.transcoder:
            return self.export_transcoder(sae)
        if self.rescale:
            sae.fold_W_dec_norm()  # SAELens saves TopK with the norms folded (rescale flag kept, now a no-op)
        return sae

    def export_transcoder(self, sae: SAE) -> SAE:
        """SAELens has no TopK transcoder: nnsae's `topk_transcoder` (`topk_skip_transcoder`), the norms folded so
        that it selects on the plain pre-activation (rescale_acts_by_decoder_norm false)."""
        if self.rescale:
            SAE.fold_W_dec_norm(sae)
        architecture = "topk_skip_transcoder" if self.cfg.skip_connection else "topk_transcoder"
        return convert_holder(sae, architecture, k=int(self.cfg.k))


def convert_holder(sae: SAE, architecture: str, **fields: Any) -> SAE:
    """The trained holder's parameters (plus `fields.pop("extra", {})` tensors) as an SAE of `architecture`."""
    extra = fields.pop("extra", {})
    cfg = SAEConfig(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, dtype=sae.cfg.dtype, device=sae.cfg.device,
                    apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input,
                    normalize_activations=sae.cfg.normalize_activations, metadata=sae.cfg.metadata,
                    architecture=architecture, d_out=sae.cfg.d_out, **fields)
    state = {name: p.detach() for name, p in sae.state_dict().items()}
    return SAE.from_dict(cfg, {**state, **extra})


class AbsTopKTrainingSAE(TopKTrainingSAE):
    architecture = "abstopk"
    holder_architecture = "abstopk"
