"""Sparse forward/backward for the TopK family: gradients flow only through the selected latents.

A batch's active latents form a `Pattern`: entries `(rows[e], cols[e])` (token, latent), grouped by row. Dense
autograd of a TopK SAE spends five of its six (N × d_in × d_sae) matmuls on zeros: the decoder forward, both
decoder gradients and both encoder gradients. Here only the encoder forward stays dense (it is needed to select
the latents); everything else costs O(nnz · d_in):

- `preacts(x, b_dec, W_enc, b_enc, values, pattern)`: the pre-activations `(x − b_dec) W_enc + b_enc` at the
  pattern's entries. The forward values are computed by the caller (from the dense selection matmul); the backward
  gives  ∂b_enc = Σ_e g_e (per column),  ∂W_enc[:, i] = Σ_{e: col=i} g_e x̃_row  (an `embedding_bag` over x̃ with
  one bag per latent),  ∂b_dec = −W_enc ∂b_enc  (a mat-vec), and ∂x only if x requires grad.
- `decode(W_dec, coef, pattern)`: `Σ_e coef_e W_dec[col_e]` per row (`embedding_bag` with per-sample weights);
  backward ∂W_dec[i] = Σ_{e: col=i} coef_e ∂out_row (again one bag per latent) and ∂coef_e = W_dec[col_e]·∂out_row.

Both are exact: they equal dense autograd up to float summation order (tested in float64).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch.autograd import Function

from nnsae import seam


class Pattern:
    """The (row, col) entries of a sparse (n_rows × n_cols) activation matrix, sorted by row."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int, k: int | None = None):
        self.rows, self.cols, self.n_rows, self.n_cols, self.k = rows, cols, n_rows, n_cols, k
        self._by_col: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._row_offsets: torch.Tensor | None = None

    @classmethod
    def from_topk(cls, indices: torch.Tensor, n_cols: int) -> Pattern:
        """From (n_rows, k) indices: k entries per row."""
        n_rows, k = indices.shape
        rows = torch.arange(n_rows, device=indices.device).repeat_interleave(k)
        return cls(rows, indices.reshape(-1), n_rows, n_cols, k=k)

    @classmethod
    def from_flat(cls, flat: torch.Tensor, n_rows: int, n_cols: int) -> Pattern:
        """From ascending flat indices `row · n_cols + col`."""
        return cls(torch.div(flat, n_cols, rounding_mode="floor"), flat % n_cols, n_rows, n_cols)

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    def subset(self, mask: torch.Tensor) -> Pattern:
        """The entries where `mask` holds (row order is kept)."""
        return Pattern(self.rows[mask], self.cols[mask], self.n_rows, self.n_cols)

    # embedding_bag arguments grouping the entries by row: (input, offsets)
    def row_bags(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.k is not None:
            return self.cols.view(self.n_rows, self.k), None
        if self._row_offsets is None:
            self._row_offsets = _offsets(self.rows, self.n_rows)
        return self.cols, self._row_offsets

    def row_offsets(self) -> torch.Tensor:
        if self.k is not None:
            return torch.arange(self.n_rows, device=self.cols.device) * self.k
        return self.row_bags()[1]

    def by_col(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, rows[order], offsets): the entries grouped by column, one bag per column (empty bags allowed)."""
        if self._by_col is None:
            # a stable int32 sort is several times faster than argsort of int64 on CPU
            order = torch.sort(self.cols.to(torch.int32), stable=True).indices
            self._by_col = (order, self.rows[order], _offsets(self.cols, self.n_cols))
        return self._by_col


def _offsets(sorted_or_any_keys: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(sorted_or_any_keys, minlength=n)
    offsets = torch.zeros(n, dtype=torch.long, device=counts.device)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    return offsets


def bags(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor | None,
         per_sample_weights: torch.Tensor) -> torch.Tensor:
    """Per bag, Σ per_sample_weights_e · weight[indices_e] (`embedding_bag` sum; 2-D `indices`: one bag per row)."""
    if indices.dim() == 2:
        per_sample_weights = per_sample_weights.view(indices.shape)
    return F.embedding_bag(indices, weight, offsets, mode="sum", per_sample_weights=per_sample_weights)


def col_bag_sum(dense: torch.Tensor, weights: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """(n_cols, d): row i = Σ_{e: col_e = i} weights_e · dense[row_e]."""
    order, rows_by_col, col_offsets = pattern.by_col()
    return bags(dense, rows_by_col, col_offsets, weights[order])


class _Preacts(Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, values, pattern, x_in):  # type: ignore[override]
        ctx.pattern = pattern
        ctx.save_for_backward(x, b_dec, W_enc, x_in)
        ctx.has_b_dec = b_dec is not None
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, b_dec, W_enc, x_in = ctx.saved_tensors
        pattern: Pattern = ctx.pattern
        grad = grad.contiguous().to(W_enc.dtype)
        need_x, need_b_dec, need_W_enc, need_b_enc = ctx.needs_input_grad[:4]
        grad_b_enc = torch.zeros(pattern.n_cols, dtype=grad.dtype, device=grad.device).index_add_(
            0, pattern.cols, grad)
        grad_x = grad_b_dec = grad_W_enc = None
        if need_W_enc:
            if x_in is None:
                x_in = x - b_dec if ctx.has_b_dec else x
            x_in = x_in.to(W_enc.dtype)
            grad_W_enc = col_bag_sum(x_in, grad, pattern).t()  # (d_in, d_sae), laid out like a transposed view
        if need_b_dec and ctx.has_b_dec:
            grad_b_dec = -(W_enc @ grad_b_enc)
        if need_x:
            indices, offsets = pattern.row_bags()
            grad_x = bags(W_enc.t().contiguous(), indices, offsets, grad).to(x.dtype)
        return grad_x, grad_b_dec, grad_W_enc, grad_b_enc if need_b_enc else None, None, None, None


def preacts(x: torch.Tensor, b_dec: torch.Tensor | None, W_enc: torch.Tensor, b_enc: torch.Tensor,
            values: torch.Tensor, pattern: Pattern, x_in: torch.Tensor | None = None) -> torch.Tensor:
    """`((x − b_dec) @ W_enc + b_enc)` at the pattern's entries, shape (nnz,), with a sparse backward.

    `values` must hold exactly those forward values (computed without grad by the caller); `x_in`, if the caller
    has it, the detached `x − b_dec` (the backward then does not recompute it).
    """
    return _Preacts.apply(x, b_dec, W_enc, b_enc, values, pattern, x_in)


def row_dots(rows: torch.Tensor, weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """(nnz,): e ↦ weight[col_e] · rows[row_e], without materialising (nnz, d) (embedding_bag's own kernel for the
    per-sample-weight gradient). `rows` is (n_rows, d), `weight` (n_cols, d)."""
    return seam.row_dots(rows.contiguous(), weight.contiguous(), pattern.cols, pattern.row_offsets(), pattern.rows)


def _per_sample_weights_grad(grad_out: torch.Tensor, W_dec: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """∂coef_e = W_dec[col_e] · grad_out[row_e]."""
    return row_dots(grad_out, W_dec, pattern)


class _Decode(Function):
    @staticmethod
    def forward(ctx, W_dec, coef, pattern):  # type: ignore[override]
        ctx.pattern = pattern
        ctx.save_for_backward(W_dec, coef)
        indices, offsets = pattern.row_bags()
        return bags(W_dec, indices, offsets, coef.to(W_dec.dtype))

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        W_dec, coef = ctx.saved_tensors
        pattern: Pattern = ctx.pattern
        grad_out = grad_out.contiguous().to(W_dec.dtype)
        grad_W_dec = col_bag_sum(grad_out, coef.to(W_dec.dtype), pattern) if ctx.needs_input_grad[0] else None
        grad_coef = _per_sample_weights_grad(grad_out, W_dec, pattern).to(coef.dtype) if ctx.needs_input_grad[1] \
            else None
        return grad_W_dec, grad_coef, None


def decode(W_dec: torch.Tensor, coef: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """(n_rows, d): row r = Σ_{e: row_e = r} coef_e · W_dec[col_e] (no bias), with a sparse backward."""
    return _Decode.apply(W_dec, coef, pattern)


def biased_matmul(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None,
                  col_scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W + b`, or `(x @ W + b) ⊙ col_scale`, as one addmm (as fast as the bare GEMM on CPU: the bias is the
    GEMM's initial output). The scale is applied to W in one pass that keeps W's layout (latent-major stays
    latent-major, no transposing copy). `dtype` (e.g. bfloat16) is the compute dtype. `out`: a buffer kept from step
    to step (a fresh (n, d_sae) output is memory the OS must fault in page by page: a quarter of the GEMM's time)."""
    if col_scale is not None:
        W = (W.t() * col_scale[:, None]).t()
        b = b * col_scale
    if dtype is not None and dtype != x.dtype:
        x, W, b = x.to(dtype), W.to(dtype), b.to(dtype)
    return torch.addmm(b, x, W, out=out)


_step_buffers = threading.local()


def step_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of `shape` in memory kept from call to call (one growing buffer per thread, dtype and
    device, shared by every SAE a trainer steps in turn): valid until the next call in the same thread."""
    pool = _step_buffers.__dict__.setdefault("pool", {})
    key = (dtype, torch.device(device))
    numel = math.prod(shape)
    flat = pool.get(key)
    if flat is None or flat.numel() < numel:
        pool[key] = flat = torch.empty(numel, dtype=dtype, device=device)
    return flat[:numel].view(shape)


class _RowNorms(Function):
    @staticmethod
    def forward(ctx, W):  # type: ignore[override]
        norms = torch.linalg.vector_norm(W, dim=-1)
        ctx.save_for_backward(W, norms)
        return norms

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        W, norms = ctx.saved_tensors
        return W * (grad / norms).masked_fill(norms == 0, 0)[:, None]


def row_norms(W: torch.Tensor) -> torch.Tensor:
    """`W.norm(dim=-1)` whose backward is one pass over W (autograd's is a division and a multiplication, each
    materialising a W-sized tensor); a zero row gets gradient 0, as in autograd."""
    return _RowNorms.apply(W)


class _SquaredError(Function):
    @staticmethod
    def forward(ctx, x_hat, x):  # type: ignore[override]
        diff = x_hat - x
        ctx.save_for_backward(diff)
        ctx.rows = diff.numel() // diff.shape[-1]
        flat = diff.reshape(-1)
        return torch.dot(flat, flat) / ctx.rows

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (diff,) = ctx.saved_tensors
        g = diff * (2 * grad / ctx.rows)
        return g if ctx.needs_input_grad[0] else None, -g if ctx.needs_input_grad[1] else None


def squared_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`(x_hat − x).pow(2).sum(-1).mean()` in three passes instead of seven: one subtraction, a dot product and,
    in the backward, one scaling of the saved difference."""
    if x_hat.shape != x.shape or x_hat.dtype != x.dtype:
        return (x_hat - x).pow(2).sum(dim=-1).mean()
    return _SquaredError.apply(x_hat, x)


def top_positive_flat(flat: torch.Tensor, m: int) -> torch.Tensor:
    """Ascending indices of the m largest entries of the 1-D `flat` among those > 0 (all positives if fewer).

    The same set as `torch.topk(flat, m)` restricted to positive values (ties at the boundary aside), but a full
    top-m over tens of millions of entries is slow on CPU. A threshold from a strided sample (deterministic)
    keeps a candidate set of about 1.5·m entries, and the exact top-m is taken among those; should the sample
    overestimate the threshold, it falls back to the full top-m.
    """
    n = flat.numel()
    if m <= 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    if m >= n:
        return (flat > 0).nonzero().squeeze(1)
    stride = max(1, n // 262_144)
    sample = flat[::stride]
    r = int(sample.numel() * min(1.0, 1.5 * m / n)) + 64
    tau = torch.topk(sample, r, sorted=False).values.min() if r < sample.numel() else flat.new_tensor(0.0)
    candidates = (flat > tau.clamp(min=0)).nonzero().squeeze(1)
    if candidates.numel() <= m:
        if tau <= 0:  # every positive entry is a candidate: fewer than m positives
            return candidates
        values, idx = torch.topk(flat, m, sorted=False)  # the sample's threshold was too high
        return torch.sort(idx[values > 0]).values
    top = torch.topk(flat[candidates], m, sorted=False).indices
    keep = torch.zeros(candidates.numel(), dtype=torch.bool, device=flat.device)
    keep[top] = True
    return candidates[keep]


def at(vector: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`vector[index]` whose backward is a deterministic `index_add_` (advanced indexing's backward accumulates
    with atomics on multi-threaded CPU, so its float sums change from run to run)."""
    return torch.index_select(vector, 0, index)


def to_dense(values: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The (n_rows, n_cols) dense matrix of a pattern's values (differentiable)."""
    flat = values.new_zeros(pattern.n_rows * pattern.n_cols)
    return flat.index_add(0, pattern.rows * pattern.n_cols + pattern.cols, values).view(pattern.n_rows, pattern.n_cols)
