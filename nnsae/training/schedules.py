"""Learning-rate and coefficient schedules as closed forms of the step number (nothing to checkpoint).

They reproduce SAELens 6: the LR is `SequentialLR` of a linear warm-up `LinearLR(1/W → 1, W−1 iters)`, a main
phase (constant, `CosineAnnealingLR(T_max=T−W−D, eta_min=lr_end)` or `CosineAnnealingWarmRestarts(T_0=(T−W−D) //
cycles)`), and a linear decay `LinearLR(lr_end/lr → 0, D)` (from lr for the constant schedule). The value at
step t is the LR used by the t-th optimizer step (0-based). Sparsity coefficients warm up as `c·min(t, W)/W`.
"""

from __future__ import annotations

import math

from nnsae.training.config import TrainConfig


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    lr, lr_end = cfg.lr, cfg.lr_end
    warm, decay = cfg.lr_warm_up_steps, cfg.lr_decay_steps
    if step < warm:
        if warm == 1:
            return lr
        return lr * (1 / warm + (1 - 1 / warm) * min(step, warm - 1) / (warm - 1))
    decay_start = total_steps - decay
    if decay > 0 and step >= decay_start:
        start = 1.0 if cfg.lr_scheduler == "constant" else lr_end / lr
        return lr * start * (1 - min(step - decay_start, decay) / decay)
    i, main = step - warm, total_steps - warm - decay
    if cfg.lr_scheduler == "constant":
        return lr
    if cfg.lr_scheduler == "cosineannealingwarmrestarts":
        period = main // cfg.n_restart_cycles
        i, main = i % period, period
    return lr_end + (lr - lr_end) * (1 + math.cos(math.pi * i / main)) / 2


def coefficient_at(final: float, warm_up_steps: int, step: int) -> float:
    if warm_up_steps <= 0:
        return final
    return final * min(step, warm_up_steps) / warm_up_steps
