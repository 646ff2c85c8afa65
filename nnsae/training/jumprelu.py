"""JumpReLU SAE training with straight-through estimators (Rajamanoharan et al. 2024), SAELens 6 semantics.

`z = x̃ W_enc + b_enc`, `f = z ⊙ 1[z > θ]`, `x̂ = f W_dec + b_dec`. θ is a parameter (float32 or wider) projected to
θ ≥ 0 before every step. With ε = `jumprelu_bandwidth` and `rect(u) = 1[|u| < ½]`, the pseudo-derivatives are
- JumpReLU: ∂f/∂z = 1[z > θ];  ∂f/∂θ = −(θ/ε) rect((z−θ)/ε)  (added to ∂z too when `jumprelu_ste_to_input`);
- Step H(z−θ): ∂/∂θ = −(1/ε) rect((z−θ)/ε);  ∂/∂z = +(1/ε) rect(...) only when `jumprelu_ste_to_input`, else 0.
Sparsity loss `l0_loss`, c warmed up over `l0_warm_up_steps`:
- step: c · mean_batch Σ_i H(z_i − θ_i);
- quadratic: c · mean_batch 2/target_l0 · (Σ_i H(z_i − θ_i) − target_l0)²;
- tanh: c · mean_batch Σ_i tanh(scale · f_i ‖W_dec_i‖).
Optional `pre_act_loss = coef · mean_batch Σ_i ReLU(θ_i − z_i) · dead_i · ‖W_dec_i‖` (0 when nothing is dead).

Sparse path (`sparse_kernels`, once the previous step's density is at most `SPARSE_MAX_DENSITY`, see
`DensityAdaptive`): every gradient
above is zero outside the entries that are active (z > θ) or inside the STE window (|z − θ| < ε/2), so only those
entries go through the sparse kernels of `nnsae.training.sparse`, as for TopK; the encoder matmul stays dense. Exact,
like the TopK kernels. Dense while the latents are dense (early training) or with `pre_act_loss_coefficient`.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from nnsae.training import sparse
from nnsae.training.base import DensityAdaptive, StepContext, StepOutput, fired_dense, mse


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _reduce_like(grad: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    # θ is per latent ([d_sae], broadcast over the batch) or per entry (the sparse path gathers it)
    return grad if grad.shape == theta.shape else grad.sum(dim=0)


class _JumpReLU(Function):
    @staticmethod
    def forward(ctx, z, theta, bandwidth, ste_to_input):  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        ste = (theta / ctx.bandwidth) * _rect((z - theta) / ctx.bandwidth) * grad
        grad_z = (z > theta).to(grad.dtype) * grad
        if ctx.ste_to_input:
            grad_z = grad_z + ste
        return grad_z, _reduce_like(-ste, theta), None, None


class _Step(Function):
    @staticmethod
    def forward(ctx, z, theta, bandwidth, ste_to_input):  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        ste = (1.0 / ctx.bandwidth) * _rect((z - theta) / ctx.bandwidth) * grad
        return (ste if ctx.ste_to_input else None), _reduce_like(-ste, theta), None, None


def jumprelu(z: torch.Tensor, theta: torch.Tensor, bandwidth: float, ste_to_input: bool = False) -> torch.Tensor:
    return _JumpReLU.apply(z, theta, bandwidth, ste_to_input)


def step(z: torch.Tensor, theta: torch.Tensor, bandwidth: float, ste_to_input: bool = False) -> torch.Tensor:
    return _Step.apply(z, theta, bandwidth, ste_to_input)


class JumpReLUTrainingSAE(DensityAdaptive):
    architecture = "jumprelu"
    holder_architecture = "jumprelu"
    transcoder_holder = "jumprelu_transcoder"
    coefficients = {"l0": ("l0_coefficient", "l0_warm_up_steps")}

    def initialize(self) -> None:
        DensityAdaptive.initialize(self)
        with torch.no_grad():
            self.sae.threshold.fill_(self.cfg.jumprelu_init_threshold)

    def before_step(self) -> None:
        with torch.no_grad():
            self.sae.threshold.clamp_(min=0.0)

    def use_sparse(self, ctx: StepContext) -> bool:
        return DensityAdaptive.use_sparse(self, ctx) and self.cfg.pre_act_loss_coefficient is None

    def forward(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        if self.use_sparse(ctx):
            return self._sparse_forward(x, ctx)
        sae, cfg = self.sae, self.cfg
        with self.autocast():
            x, x_in = self.sae_in(x)
            z = x_in @ sae.W_enc + sae.b_enc
            theta = sae.threshold.to(z.dtype)
            f = jumprelu(z, theta, cfg.jumprelu_bandwidth, cfg.jumprelu_ste_to_input)
            y = self.target(x, ctx)
            x_hat = f @ sae.W_dec + sae.b_dec + self.skip(x)
            mse_loss = mse(x_hat, y)
            W_dec_norm = sae.W_dec.norm(dim=1)
            c = ctx.coefficients["l0"]
            if cfg.jumprelu_sparsity_loss_mode == "tanh":
                per_item = torch.tanh(cfg.jumprelu_tanh_scale * f * W_dec_norm).sum(dim=-1)
            else:
                per_item = step(z, theta, cfg.jumprelu_bandwidth, cfg.jumprelu_ste_to_input).sum(dim=-1)
                if cfg.jumprelu_sparsity_loss_mode == "quadratic":
                    per_item = 2 / cfg.target_l0 * (per_item - cfg.target_l0) ** 2
            losses = {"mse_loss": mse_loss, "l0_loss": (c * per_item).mean()}
            if cfg.pre_act_loss_coefficient is not None:
                dead = ctx.dead_mask
                if dead is None or not bool(dead.any()):
                    losses["pre_act_loss"] = z.new_zeros(())
                else:
                    per_item = (torch.relu(theta - z) * dead.to(z.dtype) * W_dec_norm).sum(dim=-1)
                    losses["pre_act_loss"] = cfg.pre_act_loss_coefficient * per_item.mean()
        fired, l0 = fired_dense(f)
        if cfg.sparse_kernels:  # active (z > θ) or in the STE window (|z − θ| < ε/2)  ⇔  z > θ − ε/2
            self.record_density(z.detach() > theta.detach() - cfg.jumprelu_bandwidth / 2)
        loss = sum(losses.values())
        return StepOutput(loss, losses, y, x_hat, fired, l0)

    def _sparse_forward(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        sae, cfg = self.sae, self.cfg
        x = x.to(self.dtype)
        b_dec = sae.b_dec if cfg.apply_b_dec_to_input else None
        n_rows, n_cols = x.shape[0], cfg.d_sae
        with torch.no_grad():
            x_in = x - b_dec if b_dec is not None else x
            z = self.selection_matmul(x_in, sae.W_enc, sae.b_enc)
            # active or inside the STE window: the only entries with a gradient
            window_start = sae.threshold.detach() - cfg.jumprelu_bandwidth / 2
            pattern = self.pattern_of(self.above(z, window_start, x_in, sae.W_enc, sae.b_enc))
            values = self.dots_at(x_in, sae.W_enc, sae.b_enc, z, pattern)
        z_p = sparse.preacts(x, b_dec, sae.W_enc, sae.b_enc, values, pattern)
        theta_p = sparse.at(sae.threshold.to(z_p.dtype), pattern.cols)
        f_p = jumprelu(z_p, theta_p, cfg.jumprelu_bandwidth, cfg.jumprelu_ste_to_input)
        y = self.target(x, ctx)
        x_hat = sparse.decode(sae.W_dec, f_p, pattern) + sae.b_dec + self.skip(x)
        losses = {"mse_loss": mse(x_hat, y)}
        c = ctx.coefficients["l0"]
        if cfg.jumprelu_sparsity_loss_mode == "tanh":
            W_dec_norm = sae.W_dec.norm(dim=1)
            terms = torch.tanh(cfg.jumprelu_tanh_scale * f_p * sparse.at(W_dec_norm, pattern.cols))
        else:
            terms = step(z_p, theta_p, cfg.jumprelu_bandwidth, cfg.jumprelu_ste_to_input)
        per_item = x.new_zeros(n_rows).index_add(0, pattern.rows, terms)
        if cfg.jumprelu_sparsity_loss_mode == "quadratic":
            per_item = 2 / cfg.target_l0 * (per_item - cfg.target_l0) ** 2
        losses["l0_loss"] = (c * per_item).mean()
        with torch.no_grad():
            active = f_p.detach() != 0
            fired = torch.bincount(pattern.cols[active], minlength=n_cols).to(torch.float32)
            l0 = active.sum().to(torch.float32) / n_rows
        return StepOutput(sum(losses.values()), losses, y, x_hat, fired, l0)
