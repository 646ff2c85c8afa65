"""Cross-layer transcoder (CLT) training: layer i's features read layer i's MLP input and write to the MLP outputs of
every layer j ≥ i.

Parameters per source layer i (n layers, d_sae latents each): `W_enc.i` [d_in, d_sae] (SAELens orientation),
`b_enc.i` [d_sae], `W_dec.i` [d_sae, n − i, d_out] (`W_dec.i[:, j − i]` writes to layer j, circuit-tracer's layout),
`b_dec` [n, d_out], and for JumpReLU `threshold.i` [d_sae]. With `z_i = x_i W_enc.i + b_enc.i`:

- TopK: `a_i` keeps the k largest entries of `h_i = z_i ⊙ n_i` per token (n_i the norm of each latent's whole
  decoder `W_dec.i[f]` when `rescale_acts_by_decoder_norm`, else 1) with the values `z_i`, **no ReLU**: the
  activation of circuit-tracer's TopK (`x · 1[x in the top k]`), so the exported CLT computes exactly what was
  trained. (Export folds n_i into the encoder, as SAELens does for TopK SAEs.)
- JumpReLU: `a_i = z_i · 1[z_i > θ_i]` with SAELens' straight-through estimators (`nnsae.training.jumprelu`), and
  `l0_loss = c · mean_batch Σ_i Σ_f H(z_if − θ_if)` (the step mode).

`ŷ_j = Σ_{i ≤ j} a_i W_dec.i[:, j − i] + b_dec_j`; `mse_loss = Σ_j mean_batch ‖ŷ_j − y_j‖²` (summed over output
layers). No AuxK term.

Memory: the dense pre-activations exist for one layer at a time (for the selection, without grad); only the
active entries of each layer are kept for the backward (TopK: k per token; JumpReLU: the active ones and those in
the straight-through window). Decoding is sparse (`nnsae.training.sparse`) and accumulates into one [N, n, d_out]
reconstruction, so no [n_layers, N, d_sae] tensor and no per-(source, output) [N, d_out] tensor is materialised.

Inputs (from the trainer): `x` [N, n, d_in], the MLP inputs of layers 0..n−1, and `ctx.target` [N, n, d_out], their
MLP outputs, both token-major.
"""

from __future__ import annotations

import copy
import re
from typing import ClassVar

import torch
from torch import nn
from torch.autograd import Function

from nnsae import kernels, native
from nnsae.circuits import CrossLayerTranscoder
from nnsae.training import sparse
from nnsae.training.base import StepContext, StepOutput
from nnsae.training.config import TrainConfig
from nnsae.training.jumprelu import jumprelu, step
from nnsae.training.sparse import Pattern

_LAYER_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")


def clt_hook_names(cfg: TrainConfig) -> tuple[str, str]:
    """(input hook, output hook) as TransformerLens names relative to a layer (e.g. `mlp.hook_in`,
    `hook_mlp_out`), checked to be `blocks.i.<name>` for i = 0..n−1: circuit-tracer's files index layers from 0."""
    names = []
    for hooks in (cfg.hook, cfg.hook_out):
        matches = [_LAYER_HOOK.fullmatch(h) for h in hooks]
        suffixes = {m.group(2) for m in matches if m}
        layers = [int(m.group(1)) for m in matches if m]
        if len(suffixes) != 1 or layers != list(range(len(hooks))):
            raise ValueError(
                f"A cross-layer transcoder reads and writes TransformerLens hooks blocks.0.X .. blocks.{len(hooks) - 1}"
                f".X of one name X per side, in layer order (circuit-tracer's layout indexes layers from 0); got "
                f"{hooks}. Use e.g. hooks=[f'blocks.{{i}}.mlp.hook_in' for i in range(n)].")
        names.append(suffixes.pop())
    return names[0], names[1]


class _Decode(Function):
    """ŷ [N, n, d] = Σ_i scatter of layer i's sparse decode into output layers i..n−1, with a sparse backward."""

    @staticmethod
    def forward(ctx, patterns, n_layers, d_out, *tensors):  # type: ignore[override]
        W_decs, coefs = tensors[:n_layers], tensors[n_layers:]
        ctx.patterns, ctx.n_layers, ctx.d_out = patterns, n_layers, d_out
        ctx.save_for_backward(*tensors)
        n_rows = patterns[0].n_rows
        out = W_decs[0].new_zeros(n_rows, n_layers, d_out)
        for i, (W_dec, coef, pattern) in enumerate(zip(W_decs, coefs, patterns)):
            indices, offsets = pattern.row_bags()
            part = sparse.bags(W_dec.reshape(W_dec.shape[0], -1), indices, offsets, coef.to(W_dec.dtype))
            out[:, i:] += part.view(n_rows, n_layers - i, d_out)
            del part
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        n = ctx.n_layers
        tensors = ctx.saved_tensors
        W_decs, coefs = tensors[:n], tensors[n:]
        grads_W: list[torch.Tensor | None] = [None] * n
        grads_c: list[torch.Tensor | None] = [None] * n
        for i, (W_dec, coef, pattern) in enumerate(zip(W_decs, coefs, ctx.patterns)):
            flat_W = W_dec.reshape(W_dec.shape[0], -1)
            g = grad[:, i:].reshape(grad.shape[0], -1)
            if not g.is_contiguous() or g.dtype != W_dec.dtype:  # into reused memory: fresh copies fault in
                g = sparse.step_buffer(g.shape, W_dec.dtype, g.device).copy_(g)
            if ctx.needs_input_grad[3 + i]:
                grads_W[i] = sparse.col_bag_sum(g, coef.to(W_dec.dtype), pattern).view_as(W_dec)
            if ctx.needs_input_grad[3 + n + i]:
                grads_c[i] = sparse.row_dots(g, flat_W, pattern).to(coef.dtype)
            del g
        return (None, None, None, *grads_W, *grads_c)


class CrossLayerTrainingSAE(nn.Module):
    """A CLT being trained; same interface as `TrainingSAE` for the trainer (forward → `StepOutput`, `export`)."""

    architecture: ClassVar[str] = "clt"
    coefficients: ClassVar[dict[str, tuple[str, str]]] = {}

    def __init__(self, cfg: TrainConfig, d_in: int, d_out: int | None = None):
        nn.Module.__init__(self)
        if cfg.d_sae is None or cfg.lr is None:
            raise ValueError("CrossLayerTrainingSAE needs a resolved TrainConfig.")
        d_out = d_out or d_in
        if d_out != d_in:
            raise ValueError(f"circuit-tracer's cross-layer transcoders read and write d_model-wide activations; the "
                             f"input hooks are {d_in} wide and the output hooks {d_out}.")
        self.cfg, self.d_in, self.d_out = cfg, d_in, d_out
        self.native = native.library()  # the C++ row top-k on CPU; None without a compiler
        self.n_layers = len(cfg.hook)
        self.n_latents = self.n_layers * cfg.d_sae
        self.input_hook, self.output_hook = clt_hook_names(cfg)
        if cfg.architecture == "jumprelu":
            self.coefficients = {"l0": ("l0_coefficient", "l0_warm_up_steps")}
        dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
        n, d_sae = self.n_layers, cfg.d_sae
        init_norm = cfg.decoder_init_norm if cfg.decoder_init_norm is not None else 0.1
        W_enc, W_dec = [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for i in range(n):
                enc = torch.empty(d_sae, d_in, dtype=dtype)
                nn.init.kaiming_uniform_(enc)
                W_enc.append(enc.div_(enc.norm(dim=-1, keepdim=True)).mul_(init_norm).t())  # latent-major
                dec = torch.empty(d_sae, n - i, d_out, dtype=dtype)
                nn.init.kaiming_uniform_(dec)
                # each latent's whole decoder (all the layers it writes to) starts at norm decoder_init_norm
                W_dec.append(dec.div_(dec.flatten(1).norm(dim=-1)[:, None, None]).mul_(init_norm))
        device = torch.device(cfg.device)
        self.W_enc = nn.ParameterList([nn.Parameter(w.to(device)) for w in W_enc])
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
                                       for _ in range(n)])
        self.W_dec = nn.ParameterList([nn.Parameter(w.to(device)) for w in W_dec])
        self.b_dec = nn.Parameter(torch.zeros(n, d_out, dtype=dtype, device=device))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.ParameterList([
                nn.Parameter(torch.full((d_sae,), cfg.jumprelu_init_threshold, dtype=dtype, device=device))
                for _ in range(n)])

    @property
    def dtype(self) -> torch.dtype:
        return self.b_dec.dtype

    @property
    def rescale(self) -> bool:
        return self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm

    def before_step(self) -> None:
        if self.cfg.architecture == "jumprelu":
            with torch.no_grad():
                for theta in self.threshold:
                    theta.clamp_(min=0.0)

    # ---- one source layer -----------------------------------------------------------------------------------------

    def _select_topk(self, x_i: torch.Tensor, i: int) -> tuple[Pattern, torch.Tensor]:
        """(pattern of the k selected latents per token, their pre-activations z), without grad."""
        W, b, k = self.W_enc[i], self.b_enc[i], int(self.cfg.k)
        with torch.no_grad():
            norms = self.W_dec[i].flatten(1).norm(dim=-1) if self.rescale else None
            h = sparse.biased_matmul(x_i, W, b, col_scale=norms)
            indices = kernels.row_topk(h, k, self.native)
            pattern = Pattern.from_topk(indices, h.shape[1])
            values = h.gather(1, indices).reshape(-1).to(self.dtype)
            return pattern, values / norms.index_select(0, pattern.cols) if norms is not None else values

    def _select_jumprelu(self, x_i: torch.Tensor, i: int) -> tuple[Pattern, torch.Tensor]:
        """(pattern of the entries with a gradient: z > θ − ε/2, their pre-activations z), without grad."""
        with torch.no_grad():
            z = sparse.biased_matmul(x_i, self.W_enc[i], self.b_enc[i])
            needed = z > (self.threshold[i] - self.cfg.jumprelu_bandwidth / 2)
            pattern = Pattern.from_flat(needed.reshape(-1).nonzero().squeeze(1), z.shape[0], z.shape[1])
            return pattern, z[pattern.rows, pattern.cols]

    # ---- the step -------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        cfg = self.cfg
        if ctx.target is None:
            raise ValueError("A cross-layer transcoder's training step needs ctx.target (the MLP outputs).")
        x = x.to(self.dtype)
        y = ctx.target.to(self.dtype)
        n_rows, n = x.shape[0], self.n_layers
        patterns, coefs, fired, l0_terms = [], [], [], []
        for i in range(n):
            x_i = x[:, i].contiguous()
            if cfg.architecture == "topk":
                pattern, values = self._select_topk(x_i, i)
            else:
                pattern, values = self._select_jumprelu(x_i, i)
            z_p = sparse.preacts(x_i, None, self.W_enc[i], self.b_enc[i], values, pattern)
            if cfg.architecture == "topk":
                coef = z_p
            else:
                theta_p = sparse.at(self.threshold[i].to(z_p.dtype), pattern.cols)
                coef = jumprelu(z_p, theta_p, cfg.jumprelu_bandwidth, cfg.jumprelu_ste_to_input)
                l0_terms.append(step(z_p, theta_p, cfg.jumprelu_bandwidth, cfg.jumprelu_ste_to_input).sum())
            with torch.no_grad():
                active = coef.detach() != 0
                fired.append(torch.bincount(pattern.cols[active], minlength=cfg.d_sae).to(torch.float32))
            patterns.append(pattern)
            coefs.append(coef)
        x_hat = _Decode.apply(patterns, n, self.d_out, *self.W_dec, *coefs) + self.b_dec
        losses = {"mse_loss": (x_hat - y).pow(2).sum(dim=(1, 2)).mean()}
        if cfg.architecture == "jumprelu":
            losses["l0_loss"] = ctx.coefficients["l0"] * sum(l0_terms) / n_rows
        fired_all = torch.cat(fired)
        l0 = fired_all.sum() / (n_rows * n)  # mean active latents per token and layer
        return StepOutput(sum(losses.values()), losses, y.reshape(n_rows, -1), x_hat.reshape(n_rows, -1),
                          fired_all, l0)

    # ---- export ---------------------------------------------------------------------------------------------------

    def export(self, scaling_factor: list[float] | None = None, output_scaling_factor: list[float] | None = None
               ) -> CrossLayerTranscoder:
        """The trained CLT as an `nnsae.circuits.CrossLayerTranscoder` (circuit-tracer's orientation). For TopK with
        `rescale_acts_by_decoder_norm` the decoder norms are folded into the encoder first (same selections and
        outputs); then per-layer activation scaling (trained on `s_in_i·x_i` to predict `s_out_j·y_j`): `W_enc_i·s_in_i`,
        `W_dec_i[:, j − i] / s_out_j`, `b_dec_j / s_out_j`."""
        n = self.n_layers
        s_in = scaling_factor if scaling_factor is not None else [1.0] * n
        s_out = torch.tensor(output_scaling_factor if output_scaling_factor is not None else [1.0] * n,
                             dtype=self.dtype)
        W_enc, b_enc, W_dec = [], [], []
        for i in range(n):
            enc, bias, dec = (copy.deepcopy(t.detach()) for t in (self.W_enc[i], self.b_enc[i], self.W_dec[i]))
            if self.rescale:
                norms = dec.flatten(1).norm(dim=-1).clamp(min=1e-8)
                enc, bias, dec = enc * norms, bias * norms, dec / norms[:, None, None]
            W_enc.append((enc * s_in[i]).t().contiguous())
            b_enc.append(bias)
            W_dec.append((dec / s_out[i:].to(dec.device)[None, :, None]).contiguous())
        jump = self.cfg.architecture == "jumprelu"
        threshold = torch.stack([t.detach().clone() for t in self.threshold]) if jump else None
        return CrossLayerTranscoder(
            torch.stack(W_enc), W_dec, torch.stack(b_enc), self.b_dec.detach() / s_out.to(self.b_dec.device)[:, None],
            activation="jumprelu" if jump else "topk", threshold=threshold,
            k=None if jump else int(self.cfg.k), feature_input_hook=self.input_hook,
            feature_output_hook=self.output_hook)
