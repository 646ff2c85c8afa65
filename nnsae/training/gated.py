"""Gated SAE training (Rajamanoharan et al. 2024), SAELens 6 losses.

`π_gate = x̃ W_enc + b_gate`, `f = 1[π_gate > 0] ⊙ ReLU(x̃ (W_enc ⊙ exp(r_mag)) + b_mag)`, `x̂ = f W_dec + b_dec`.
Loss = MSE + `l1_loss = c · mean_batch Σ_i ReLU(π_gate)_i ‖W_dec_i‖`
     + `auxiliary_reconstruction_loss = mean_batch ‖ReLU(π_gate) W_dec + b_dec − x‖²` (no stop-gradient).
Every gradient lives on the gate-open entries (π_gate > 0), so once those are sparse (`DensityAdaptive`) the step
runs on them only; the magnitude path reuses the gate's dot products: `x̃ (W_enc ⊙ e^r) = e^r ⊙ (π_gate − b_gate)`.
"""

from __future__ import annotations

import torch

from nnsae.training import sparse
from nnsae.training.sparse import at
from nnsae.training.base import DensityAdaptive, StepContext, StepOutput, fired_dense, mse


class GatedTrainingSAE(DensityAdaptive):
    architecture = "gated"
    holder_architecture = "gated"
    coefficients = {"l1": ("l1_coefficient", "l1_warm_up_steps")}

    def forward(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        if self.use_sparse(ctx):
            return self._sparse_forward(x, ctx)
        sae = self.sae
        with self.autocast():
            x, x_in = self.sae_in(x)
            pi_gate = x_in @ sae.W_enc + sae.b_gate
            magnitude = torch.relu(x_in @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag)
            f = (pi_gate > 0).to(magnitude.dtype) * magnitude
            x_hat = f @ sae.W_dec + sae.b_dec
            mse_loss = mse(x_hat, x)
            gate_acts = torch.relu(pi_gate)
            l1_loss = ctx.coefficients["l1"] * (gate_acts * sae.W_dec.norm(dim=1)).sum(dim=-1).mean()
            aux_loss = mse(gate_acts @ sae.W_dec + sae.b_dec, x)
        self.record_density(pi_gate.detach() > 0)
        fired, l0 = fired_dense(f)
        losses = {"mse_loss": mse_loss, "l1_loss": l1_loss, "auxiliary_reconstruction_loss": aux_loss}
        return StepOutput(mse_loss + l1_loss + aux_loss, losses, x, x_hat, fired, l0)

    def _sparse_forward(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        sae = self.sae
        x, pattern, gate_p = self.positive_preacts(x, sae.b_gate)
        cols = pattern.cols
        magnitude = torch.relu(at(sae.r_mag.exp(), cols) * (gate_p - at(sae.b_gate, cols)) + at(sae.b_mag, cols))
        f_p = (gate_p.detach() > 0).to(magnitude.dtype) * magnitude
        x_hat = sparse.decode(sae.W_dec, f_p, pattern) + sae.b_dec
        mse_loss = mse(x_hat, x)
        gate_acts = torch.relu(gate_p)
        l1_loss = ctx.coefficients["l1"] * (gate_acts * at(sae.W_dec.norm(dim=1), cols)).sum() / x.shape[0]
        aux_loss = mse(sparse.decode(sae.W_dec, gate_acts, pattern) + sae.b_dec, x)
        fired, l0 = self.sparse_firing(f_p, pattern, x.shape[0])
        losses = {"mse_loss": mse_loss, "l1_loss": l1_loss, "auxiliary_reconstruction_loss": aux_loss}
        return StepOutput(mse_loss + l1_loss + aux_loss, losses, x, x_hat, fired, l0)
