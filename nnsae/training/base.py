"""The training wrapper every architecture shares: an inference `SAE` holding the parameters, plus the training
forward pass (losses) and the export to an inference SAE in SAELens layout.

Losses follow SAELens 6 (`TrainingSAE.training_forward_pass`): `x` is the (scaled) input batch, `x̃ = x − b_dec`
when `apply_b_dec_to_input`, and `MSE = mean_batch Σ_d (x̂ − x)²`; each architecture adds its own terms.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from nnsae.config import SAEConfig, parse_dtype
from nnsae.architectures import SAE
from nnsae.training import sparse
from nnsae.training.config import TrainConfig


@dataclass
class StepContext:
    """What a training forward pass needs besides the batch."""

    coefficients: dict[str, float] = field(default_factory=dict)  # scheduled sparsity coefficients
    dead_mask: torch.Tensor | None = None  # (d_sae,) bool, latents dead before this step
    comm: Any = None  # nnsae.training.distributed.Comm in data-parallel runs
    target: torch.Tensor | None = None  # transcoders: what the output should be (None: the input itself)


@dataclass
class StepOutput:
    loss: torch.Tensor
    losses: dict[str, torch.Tensor]  # "mse_loss", "l1_loss", ... (summed into `loss`)
    x: torch.Tensor  # what the SAE reconstructs (a transcoder's target)
    x_hat: torch.Tensor  # its reconstruction
    fired: torch.Tensor  # (d_sae,) number of tokens in which each latent was non-zero
    l0: torch.Tensor  # mean number of non-zero latents per token
    metrics: dict[str, float] = field(default_factory=dict)


def mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """SAELens' `mse_loss`: the squared error summed over the features, averaged over tokens."""
    return sparse.squared_error(x_hat, x)


class TrainingSAE(nn.Module):
    """Base class. Subclasses set `architecture`, `holder_architecture` and implement `forward`.

    A transcoder (`cfg.hook_out` set) reads `x` (d_in) and predicts `ctx.target` (d_out): its parameters live in a
    SAELens transcoder (`transcoder_holder`, or its `skip_` form with `W_skip` [d_out, d_in] when
    `cfg.skip_connection`), its input gets no b_dec subtraction, and `x̂` includes the skip path `x W_skipᵀ`."""

    architecture: ClassVar[str]
    holder_architecture: ClassVar[str]  # the inference SAE class whose parameters are trained
    transcoder_holder: ClassVar[str] = "transcoder"  # the same, for transcoders (without the skip connection)
    coefficients: ClassVar[dict[str, tuple[str, str]]] = {}  # name → (TrainConfig value field, warm-up field)

    def __init__(self, cfg: TrainConfig, d_in: int, d_out: int | None = None):
        nn.Module.__init__(self)
        if cfg.d_sae is None or cfg.lr is None:
            raise ValueError("TrainingSAE needs a resolved TrainConfig (cfg.resolve(d_in, batch_size_tokens)).")
        self.cfg = cfg
        self.d_in = d_in
        self.d_out = (d_out or d_in) if cfg.is_transcoder else d_in
        self.n_latents = cfg.d_sae
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.sae = SAE.from_config(self.holder_config())
            self.initialize()
        self.sae.to(torch.device(cfg.device))

    @property
    def transcoder(self) -> bool:
        return self.cfg.is_transcoder

    def holder_name(self) -> str:
        if not self.transcoder:
            return self.holder_architecture
        if not self.cfg.skip_connection:
            return self.transcoder_holder
        return self.transcoder_holder.replace("transcoder", "skip_transcoder")

    def holder_config(self) -> SAEConfig:
        cfg = self.cfg
        extra: dict[str, Any] = {}
        if self.transcoder:
            return SAEConfig(d_in=self.d_in, d_sae=cfg.d_sae, dtype=cfg.dtype, device="cpu",
                             apply_b_dec_to_input=False, architecture=self.holder_name(), d_out=self.d_out)
        if self.holder_architecture in ("topk", "abstopk"):
            extra = dict(k=int(cfg.k), rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm)
        return SAEConfig(d_in=self.d_in, d_sae=cfg.d_sae, dtype=cfg.dtype, device="cpu",
                         apply_b_dec_to_input=cfg.apply_b_dec_to_input,
                         normalize_activations=cfg.normalize_activations, architecture=self.holder_architecture,
                         **extra)

    def initialize(self) -> None:
        """SAELens' training init: kaiming decoder rows rescaled to `decoder_init_norm`, encoder = decoderᵀ."""
        with torch.no_grad():
            if self.cfg.decoder_init_norm is not None:
                W_dec = self.sae.W_dec
                W_dec.div_(W_dec.norm(dim=-1, keepdim=True)).mul_(self.cfg.decoder_init_norm)
            if not self.transcoder:
                self.sae.W_enc.copy_(self.sae.W_dec.T)
                return
            # A transcoder's encoder reads another space than its decoder writes: drawn on its own, its columns
            # scaled like the decoder rows (W_skip and the biases start at zero, as in SAELens).
            W_enc = torch.empty(self.cfg.d_sae, self.d_in, dtype=self.sae.W_enc.dtype)
            nn.init.kaiming_uniform_(W_enc)
            if self.cfg.decoder_init_norm is not None:
                W_enc.div_(W_enc.norm(dim=-1, keepdim=True)).mul_(self.cfg.decoder_init_norm)
            self.sae.W_enc.copy_(W_enc.T)
            for name in ("b_enc", "b_dec", "W_skip"):
                if hasattr(self.sae, name):
                    getattr(self.sae, name).zero_()

    def target(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """What x̂ is compared with: the transcoder's target, else the input (both in the training dtype)."""
        if not self.transcoder:
            return x
        if ctx.target is None:
            raise ValueError("A transcoder's training step needs ctx.target (the activation at hook_out).")
        return ctx.target.to(self.dtype)

    def skip(self, x: torch.Tensor) -> torch.Tensor | float:
        """The skip path x W_skipᵀ of a skip transcoder (0 otherwise)."""
        return x @ self.sae.W_skip.T if self.transcoder and self.cfg.skip_connection else 0.0

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.cfg.dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.cfg.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.cfg.device).type, dtype=torch.bfloat16)

    def sae_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x in the SAE dtype, x̃ = x − b_dec if apply_b_dec_to_input)."""
        x = x.to(self.dtype)
        return x, (x - self.sae.b_dec if self.cfg.apply_b_dec_to_input else x)

    def before_step(self) -> None:
        """Called before each forward (JumpReLU projects its threshold here)."""

    def forward(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- export -------------------------------------------------------------------------------------------------

    def export(self, scaling_factor: float | None = None, output_scaling_factor: float | None = None) -> SAE:
        """The inference SAE, SAELens' `save_inference_model` form: the activation scaling factor folded
        (`W_enc·s, W_dec/s, b_dec/s`; a transcoder trained on `s_in·x` to predict `s_out·y`: `W_enc·s_in`,
        `W_dec/s_out`, `b_dec/s_out`, `W_skip·s_in/s_out`), plus the architecture's own export rules
        (`export_rules`, given the factor its decoder was divided by)."""
        sae = copy.deepcopy(self.sae)
        for p in sae.parameters():
            p.requires_grad_(False)
            p.data = p.data.contiguous()
        if scaling_factor is not None and self.transcoder:
            with torch.no_grad():
                sae.W_enc.mul_(scaling_factor)
                sae.W_dec.div_(output_scaling_factor)
                sae.b_dec.div_(output_scaling_factor)
                if self.cfg.skip_connection:
                    sae.W_skip.mul_(scaling_factor / output_scaling_factor)
            scaling_factor = output_scaling_factor
        elif scaling_factor is not None:
            sae.fold_activation_norm_scaling_factor(scaling_factor)
        sae = self.export_rules(sae, scaling_factor)
        for p in sae.parameters():
            p.requires_grad_(True)
        return sae

    def export_rules(self, sae: SAE, scaling_factor: float | None) -> SAE:
        return sae


def fired_dense(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-latent firing counts, mean L0) of dense feature activations."""
    fired = torch.count_nonzero(f.detach(), dim=0).to(torch.float32)
    return fired, fired.sum() / f.shape[0]


class DensityAdaptive(TrainingSAE):
    """For ReLU-like architectures whose latents become sparse during training: once the previous step needed at most
    `SPARSE_MAX_DENSITY` of the (token, latent) entries, the step runs on the sparse kernels (exact), else dense.

    Measured crossover (JumpReLU, d_in 576, d_sae 4608, batch 4096, CPU): sparse 2.6× faster at 0.8% density, 1.9× at
    3.6%, 1.3× at 7%, 0.85× at 14%. The density is a buffer, so it is checkpointed and a resumed run takes the same
    path at every step."""

    SPARSE_MAX_DENSITY = 0.08

    def __init__(self, cfg: TrainConfig, d_in: int, d_out: int | None = None):
        TrainingSAE.__init__(self, cfg, d_in, d_out)
        self.register_buffer("density", torch.tensor(1.0, dtype=torch.float64, device=cfg.device))

    def use_sparse(self, ctx: StepContext) -> bool:
        return self.cfg.sparse_kernels and float(self.density) <= self.SPARSE_MAX_DENSITY

    def record_density(self, needed: torch.Tensor | float) -> None:
        """`needed`: bool mask of the entries a sparse step would have to visit (or their fraction)."""
        if self.cfg.sparse_kernels:
            with torch.no_grad():
                if isinstance(needed, torch.Tensor):
                    needed = float(torch.count_nonzero(needed)) / needed.numel()
                self.density.fill_(needed)

    def selection_matmul(self, x_in: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        from nnsae.training.sparse import biased_matmul

        with torch.no_grad():
            return biased_matmul(x_in, W, b, torch.bfloat16 if self.cfg.autocast else None)

    def above(self, z: torch.Tensor, threshold: torch.Tensor | float, x_in: torch.Tensor, W: torch.Tensor,
              b: torch.Tensor) -> torch.Tensor:
        """The entries whose exact pre-activation may exceed `threshold`. For a bf16 selection matmul this widens
        the test by the rounding bound |Δz| ≤ 2⁻⁷(‖x‖‖w‖ + |b|) (8-bit inputs and output, float accumulation), so no
        needed entry is missed; the exact values computed afterwards decide."""
        if z.dtype != torch.bfloat16:
            return z > threshold
        margin = torch.outer(x_in.norm(dim=1), W.norm(dim=0)).add_(b.abs()).mul_(2 ** -7)
        return margin.add_(z) > threshold

    def pattern_of(self, needed: torch.Tensor) -> Any:
        from nnsae.training.sparse import Pattern

        pattern = Pattern.from_flat(needed.reshape(-1).nonzero().squeeze(1), needed.shape[0], needed.shape[1])
        self.density.fill_(pattern.nnz / needed.numel())
        return pattern

    def dots_at(self, x_in: torch.Tensor, W: torch.Tensor, b: torch.Tensor, z: torch.Tensor, pattern: Any
                ) -> torch.Tensor:
        """Forward values of x_in W + b at the pattern (recomputed exactly when the selection ran in bf16)."""
        from nnsae.training import sparse

        with torch.no_grad():
            if self.cfg.autocast:
                return sparse.row_dots(x_in, W.t(), pattern) + b[pattern.cols]
            return z[pattern.rows, pattern.cols].to(self.dtype)

    def positive_preacts(self, x: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Sparse step shared by the ReLU family: (x in the training dtype, the pattern of entries whose
        pre-activation x̃ W_enc + b is positive, those pre-activations with gradient)."""
        sae = self.sae
        x = x.to(self.dtype)
        b_dec = sae.b_dec if self.cfg.apply_b_dec_to_input else None
        with torch.no_grad():
            x_in = x - b_dec if b_dec is not None else x
            z = self.selection_matmul(x_in, sae.W_enc, b)
            pattern = self.pattern_of(self.above(z, 0.0, x_in, sae.W_enc, b))
            values = self.dots_at(x_in, sae.W_enc, b, z, pattern)
        return x, pattern, sparse.preacts(x, b_dec, sae.W_enc, b, values, pattern)

    def sparse_firing(self, f_p: torch.Tensor, pattern: Any, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-latent firing counts, mean L0) of sparse activations `f_p` at `pattern`."""
        with torch.no_grad():
            active = f_p.detach() != 0
            fired = torch.bincount(pattern.cols[active], minlength=self.cfg.d_sae).to(torch.float32)
            return fired, active.sum().to(torch.float32) / n_tokens

