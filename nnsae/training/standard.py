"""Standard (ReLU) SAE training: `f = ReLU(x̃ W_enc + b_enc)`, loss = MSE + L1.

`l1_loss = mean_batch c · ‖f ⊙ ‖W_dec_i‖‖_p` (p = lp_norm, 1 by default), c warmed up over `l1_warm_up_steps`.
Once the latents are sparse (`DensityAdaptive`), the step runs on the active entries only (p = 1).
"""

from __future__ import annotations

import torch

from nnsae.training import sparse
from nnsae.training.base import DensityAdaptive, StepContext, StepOutput, fired_dense, mse


class StandardTrainingSAE(DensityAdaptive):
    architecture = "standard"
    holder_architecture = "standard"
    coefficients = {"l1": ("l1_coefficient", "l1_warm_up_steps")}

    def use_sparse(self, ctx: StepContext) -> bool:
        return DensityAdaptive.use_sparse(self, ctx) and self.cfg.lp_norm == 1

    def forward(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        if self.use_sparse(ctx):
            return self._sparse_forward(x, ctx)
        sae = self.sae
        with self.autocast():
            x, x_in = self.sae_in(x)
            y = self.target(x, ctx)
            f = torch.relu(x_in @ sae.W_enc + sae.b_enc)
            x_hat = f @ sae.W_dec + sae.b_dec + self.skip(x)
            mse_loss = mse(x_hat, y)
            sparsity = (f * sae.W_dec.norm(dim=1)).norm(p=self.cfg.lp_norm, dim=-1)
            l1_loss = (ctx.coefficients["l1"] * sparsity).mean()
        fired, l0 = fired_dense(f)
        self.record_density(float(fired.sum()) / f.numel())  # the active entries are all a sparse step needs
        losses = {"mse_loss": mse_loss, "l1_loss": l1_loss}
        return StepOutput(mse_loss + l1_loss, losses, y, x_hat, fired, l0)

    def _sparse_forward(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        sae = self.sae
        x, pattern, z_p = self.positive_preacts(x, sae.b_enc)
        f_p = torch.relu(z_p)
        y = self.target(x, ctx)
        x_hat = sparse.decode(sae.W_dec, f_p, pattern) + sae.b_dec + self.skip(x)
        mse_loss = mse(x_hat, y)
        weighted = f_p * sparse.at(sae.W_dec.norm(dim=1), pattern.cols)
        l1_loss = ctx.coefficients["l1"] * weighted.abs().sum() / x.shape[0]
        fired, l0 = self.sparse_firing(f_p, pattern, x.shape[0])
        losses = {"mse_loss": mse_loss, "l1_loss": l1_loss}
        return StepOutput(mse_loss + l1_loss, losses, y, x_hat, fired, l0)
