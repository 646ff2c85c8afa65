"""BatchTopK and Matryoshka BatchTopK training (Bussmann et al. 2024/2025), SAELens 6 semantics.

BatchTopK: `h` as for TopK (`z ⊙ n` with rescaling), `f` = the top `int(k·N)` values of `ReLU(h)` over the whole
flattened batch of N tokens (k is a float: the mean per token). Losses as TopK (MSE + AuxK). After each step the
buffer `topk_threshold` (float64) moves as an EMA, `θ ← (1−lr)θ + lr·min(positive f)`, lr = `topk_threshold_lr`.
Export (SAELens `save_inference_model`): a **jumprelu** SAE with the decoder norms folded (`b_enc·n, W_enc·n,
W_dec/n` when rescaling) and `threshold = θ` for every latent — its activations are exactly
`ReLU(h)·1[h > θ]`, the threshold inference of the trained model (`encode_with_threshold`).

Matryoshka: nested prefixes `matryoshka_widths` (d_sae last).
`x̂_w = b_dec + Σ_{levels ≤ w} (f/n)[:, level] W_dec[level]`
and `inner_mse_loss_{w} = mean_batch ‖x̂_w − x‖²` for every width but the last (whose reconstruction is x̂).
With `use_matryoshka_aux_loss`, AuxK is computed per level, dead latents of each level fitting the residual of
that level's partial reconstruction, the level losses summed.

In data-parallel runs the batch-level selection is global: the `int(k·N_global)`-th largest value over all ranks
is found from each rank's candidates, so ranks select exactly what one process would on the whole batch.
"""

from __future__ import annotations

import torch

from nnsae.architectures import SAE
from nnsae.training.base import StepContext
from nnsae.training.sparse import Pattern, top_positive_flat
from nnsae.training.topk import TopKTrainingSAE, convert_holder


class BatchTopKTrainingSAE(TopKTrainingSAE):
    architecture = "batchtopk"
    holder_architecture = "standard"  # same parameters (W_enc, W_dec, b_enc, b_dec); exported as jumprelu

    def __init__(self, cfg, d_in, d_out=None):
        TopKTrainingSAE.__init__(self, cfg, d_in, d_out)
        self.register_buffer("topk_threshold", torch.tensor(0.0, dtype=torch.float64, device=cfg.device))

    def select(self, x_in, h, norms, ctx):
        n_rows, n_cols = h.shape
        world = ctx.comm.world_size if ctx.comm is not None else 1
        flat = h.reshape(-1)
        m = int(self.cfg.k * n_rows * world)  # ReLU(h)'s top m over the (global) batch: only positives matter
        raw = None
        if self.refine:  # bf16 proposes 2m candidates, exact float values decide
            candidates = top_positive_flat(flat, min(2 * m, flat.numel()))
            raw_c = self.raw_values(x_in, h, Pattern.from_flat(candidates, n_rows, n_cols), norms)
            exact = raw_c * norms[candidates % n_cols] if norms is not None else raw_c
            keep = top_positive_flat(exact, m)
            idx, raw, values = candidates[keep], raw_c[keep], exact[keep]
        else:
            idx = top_positive_flat(flat, m)
            values = flat[idx]
        if ctx.comm is not None:  # the m-th largest over all ranks: each rank's local top m are the candidates
            everything = ctx.comm.all_gather_cat(values)
            if everything.numel() > m:
                tau = torch.topk(everything, m, sorted=False).values.min()
                keep = values >= tau
                idx = idx[keep]
                raw = raw[keep] if raw is not None else None
        pattern = Pattern.from_flat(idx, n_rows, n_cols)
        return pattern, raw if raw is not None else self.raw_values(x_in, h, pattern, norms)

    def after_forward(self, acts: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        with torch.no_grad():
            positive = acts.detach()[acts.detach() > 0]
            local_min = positive.min().to(torch.float64) if positive.numel() else \
                torch.tensor(float("inf"), dtype=torch.float64, device=acts.device)
            if ctx.comm is not None:
                local_min = ctx.comm.all_reduce(local_min, op="min")
            if torch.isfinite(local_min):
                lr = self.cfg.topk_threshold_lr
                self.topk_threshold.copy_((1 - lr) * self.topk_threshold + lr * local_min)
        return {"topk_threshold": float(self.topk_threshold)}

    # ---- threshold inference and export -------------------------------------------------------------------------

    @torch.no_grad()
    def encode_with_threshold(self, x: torch.Tensor) -> torch.Tensor:
        """Inference activations of the trained model: `ReLU(h) · 1[h > topk_threshold]` (dense, per token)."""
        sae = self.sae
        x = x.to(self.dtype)
        x_in = x - sae.b_dec if self.cfg.apply_b_dec_to_input else x
        h = x_in @ sae.W_enc + sae.b_enc
        if self.rescale:
            h = h * sae.W_dec.norm(dim=-1)
        theta = self.topk_threshold.to(h.dtype)
        return torch.relu(h) * (h > theta).to(h.dtype)

    def export_rules(self, sae: SAE, scaling_factor: float | None) -> SAE:
        theta = float(self.topk_threshold)
        if self.rescale:
            if scaling_factor is not None:
                theta /= scaling_factor  # θ is in units of z·‖W_dec_i‖ and the fold divided W_dec by s
            SAE.fold_W_dec_norm(sae)
        if not self.transcoder:
            architecture = "jumprelu"
        else:  # as SAELens saves BatchTopK SAEs: the JumpReLU form of the threshold inference
            architecture = "jumprelu_skip_transcoder" if self.cfg.skip_connection else "jumprelu_transcoder"
        return convert_holder(sae, architecture, extra={"threshold": torch.full_like(sae.b_enc.detach(), theta)})


class MatryoshkaBatchTopKTrainingSAE(BatchTopKTrainingSAE):
    architecture = "matryoshka_batchtopk"

    def levels(self) -> list[tuple[int, int]]:
        widths = self.cfg.matryoshka_widths
        return list(zip([0, *widths[:-1]], widths))

    def reconstruct(self, acts, pattern, norms, base):
        """x̂ = base + Σ over levels, accumulated level by level; the partial sums are the inner reconstructions."""
        decoded, partials = base, []
        for lo, hi in self.levels():
            mask = (pattern.cols >= lo) & (pattern.cols < hi)
            decoded = self.decode_at(acts[mask], pattern.subset(mask), norms) + decoded
            partials.append((hi, decoded))
        return decoded, partials

    def aux_groups(self, x_in, h, norms, dead):
        if not self.cfg.use_matryoshka_aux_loss:
            return BatchTopKTrainingSAE.aux_groups(self, x_in, h, norms, dead)
        groups = []
        for level, (lo, hi) in enumerate(self.levels()):
            group = self.select_aux(x_in, h, norms, dead, lo, hi)
            if group is not None:
                groups.append((*group, level))
        return groups
