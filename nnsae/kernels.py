"""Exact fast kernels for TopK-family inference (and the row top-k training shares).

* `row_topk`: `torch.topk(h, k, sorted=False).indices`, natively in one pass per row or in two cheaper torch stages.
* `topk_preacts`: the k largest entries per row of `(x @ W + b) · scale` (by |·| if `absolute`) and their values,
  without a float32 GEMM where bf16 is fast. A bf16 GEMM ranks every latent, a per-row threshold keeps the few above
  it as candidates, their pre-activations are recomputed in float32, and a row is accepted only if a proven bound on
  the bf16 error shows no other latent can reach its k-th value; other rows take the dense float32 path. After the
  GEMM, a native kernel (`nnsae/csrc/bf16_topk.cpp`, built by `nnsae.native`) does the selection on CPU, with a
  threshold fitted to each row's bound; without a C++ compiler the same steps run as torch ops with a fixed margin of
  candidates, and give the same results.
* `sparse_decode`: `Σ_i values_i · W_dec[indices_i]` per row (an `embedding_bag`), the decoder without the dense
  [n, d_sae] activations.

Results equal the dense float32 computation up to float summation order (the selected latents are those a float32
evaluation in any order selects). Plain torch apart from that optional kernel, device- and dtype-agnostic.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from nnsae.seam import cpu_has_amx, row_dots, tensor_version

if TYPE_CHECKING:  # not imported at run time: a by-value SAE shipped to a remote server needs only math and torch
    from nnsae.native import Kernels

_BF16_EPS = 2.0 ** -8  # bf16 unit roundoff; outputs are bounded with 2u, which also covers truncation
_TINY = 2.0 ** -126  # smallest normal float32/bf16: bf16 dot instructions flush anything smaller to zero
# Bytes of bf16 keys per GEMM block, which bounds the memory of its (rows, d_sae) output: 1820 rows at d_sae 4608, where
# one GEMM of 1024 rows ran 8% faster than two of 512.
_BLOCK_BYTES = 1 << 24
# The native kernel's threshold, in error bounds below each row's k-th bf16 key. Measured on SmolLM2 activations
# (k 32 of 4608): about 1.6·k candidates per row and 0.04-0.3% of rows retried with a wider margin, where the torch
# path's fixed count keeps about 2.5·k and sends 0.4-1.4% of rows to the dense float32 path.
NATIVE_MARGIN = 1.2


def row_topk(h: torch.Tensor, k: int, native: Kernels | None = None, absolute: bool = False) -> torch.Tensor:
    """Indices (n_rows, k) of each row's k largest entries (of |h| if `absolute`), unordered:
    `torch.topk(h, k, sorted=False).indices`, ties aside.

    With `native` (`nnsae.native.library()`) and a float32 CPU `h`, one pass per row in C++ (about 6× faster than
    the torch path at k=32 of 4608). Otherwise two torch stages, exact: split each row into w = n_cols/g strided
    groups of g, keep the k groups with the largest maxima (every top-k entry is in one: at most k groups can hold an
    entry ≥ the k-th largest value), then take the top k of those k·g candidates (~1.5× faster than torch.topk).
    """
    n, s = h.shape
    if native is not None and h.device.type == "cpu" and h.dtype == torch.float32 and h.stride(1) == 1 and 0 < k <= s:
        return native.row_topk(h, k, absolute)
    if absolute:
        h = h.abs()
    g = next((g for g in (8, 4, 2) if s % g == 0 and s // g >= 2 * k), None)
    if g is None:
        return torch.topk(h, k, dim=-1, sorted=False).indices
    w = s // g
    groups = h.view(n, g, w)
    top_groups = torch.topk(groups.amax(dim=1), k, dim=-1, sorted=False).indices  # (n, k)
    candidates = torch.gather(groups, 2, top_groups[:, None, :].expand(n, g, k)).reshape(n, g * k)
    best = torch.topk(candidates, k, dim=-1, sorted=False).indices
    return top_groups.gather(1, best % k) + torch.div(best, k, rounding_mode="floor") * w


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """(n, d_out): row r = Σ_j values[r, j] · W_dec[indices[r, j]], i.e. `scatter(values) @ W_dec` without the
    dense activations (zero values contribute nothing, as in the dense product)."""
    return F.embedding_bag(indices, W_dec, mode="sum", per_sample_weights=values.to(W_dec.dtype))


def bf16_is_fast(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a bf16 GEMM is much faster than `dtype`'s on `device`: float32 on CPUs with AMX tiles."""
    if dtype != torch.float32 or device.type != "cpu":
        return False
    return cpu_has_amx()


class _Bf16Weights:
    """[W·scale; b·scale; 0] in bf16 (inner dimension padded to a multiple of 32, where bf16 GEMMs run fastest) and
    the column norms the error bound needs."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None):
        d, s = W.shape
        self.d_pad = -(-(d + 1) // 32) * 32
        Wa = torch.cat([W, b[None, :]], 0)  # (d + 1, s)
        if scale is not None:
            Wa = Wa * scale[None, :]
        self.Wb = torch.zeros(self.d_pad, s, dtype=torch.bfloat16, device=W.device)
        self.Wb[:d + 1] = Wa
        Wb32 = self.Wb[:d + 1].float()
        self.norm = float(Wa.norm(dim=0).max())
        self.err_norm = float((Wa - Wb32).norm(dim=0).max())
        self.bf16_norm = float(Wb32.norm(dim=0).max())
        self.abs_max = float(Wb32.abs().max())
        self.W_t = W.t().contiguous()  # latent-major float32 rows for the exact re-computation


def bf16_weights(cache: dict, W: torch.Tensor, b: torch.Tensor, scale_src: torch.Tensor | None,
                 scale: torch.Tensor | None) -> _Bf16Weights:
    """The `_Bf16Weights` for these parameters, cached in `cache` until any of them changes (storage or in-place
    version). Inference tensors have no version counter, so for them it is rebuilt at every call."""
    sources = (W, b) + ((scale_src,) if scale_src is not None else ())
    if any(t.is_inference() for t in sources):
        return _Bf16Weights(W.detach(), b.detach(), scale)
    key = tuple((t.data_ptr(), tensor_version(t), t.device, t.dtype) for t in sources)
    if cache.get("key") != key:
        cache.clear()
        cache["key"], cache["weights"] = key, _Bf16Weights(W.detach(), b.detach(), scale)
    return cache["weights"]


def dense_topk(pre: torch.Tensor, k: int, absolute: bool, native: Kernels | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries per row of `pre` (by |·| if `absolute`); `native` as in
    `row_topk`."""
    if pre.dim() == 2:
        indices = row_topk(pre, k, native, absolute)
    else:
        indices = torch.topk(pre.abs() if absolute else pre, k, dim=-1, sorted=False).indices
    return pre.gather(-1, indices), indices


def topk_preacts(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, *, absolute: bool, relu: bool,
                 scale: torch.Tensor | None = None, weights: _Bf16Weights | None = None, ordered: bool = False,
                 native: Kernels | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices), each (n, k): the k largest pre-activations `h = (x @ W + b) · scale` per row of x (n, d)
    — by |h| if `absolute` — and their float32 values. With `weights` (see `bf16_weights`) latents are ranked by a
    bf16 GEMM and only candidates are recomputed exactly; without, it is the dense computation. With `relu` only
    the positive values matter (rows with fewer than k positives may return other zero-or-negative entries).
    `ordered`: each row by value descending, then index ascending (else in no particular order). `native`: the
    compiled kernels (`nnsae.native.library()`), which then select the candidates of float32 CPU inputs (and do
    the dense path's row top-k)."""
    if weights is None or k >= W.shape[1]:
        pre = torch.addmm(b, x, W)
        values, indices = dense_topk(pre * scale if scale is not None else pre, k, absolute, native)
        return order_rows(values, indices) if ordered else (values, indices)
    n = x.shape[0]
    values = torch.empty(n, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.long, device=x.device)
    ok = torch.empty(n, dtype=torch.bool, device=x.device)
    lib = native if native is not None and _native_fits(x, b, scale, weights) else None
    if lib is not None:
        x, b, scale = x.contiguous(), b.contiguous(), scale.contiguous() if scale is not None else None
    rows = max(_BLOCK_BYTES // (2 * W.shape[1]), 64)
    for start in range(0, n, rows):
        block = slice(start, start + rows)
        if lib is not None:
            _native_block(lib, x[block], b, k, absolute, relu, scale, weights, values[block], indices[block],
                          ok[block])
        else:
            _bf16_block(x[block], b, k, absolute, relu, scale, weights, values[block], indices[block], ok[block])
    bad = (~ok).nonzero().squeeze(1)
    if bad.numel():  # one float32 GEMM for every row the bound could not certify
        pre = torch.addmm(b, x.index_select(0, bad), W)
        values[bad], indices[bad] = dense_topk(pre * scale if scale is not None else pre, k, absolute, native)
    if ordered and lib is None:
        return order_rows(values, indices)
    if ordered and bad.numel():  # the native kernel's rows come ordered
        values[bad], indices[bad] = order_rows(values[bad], indices[bad])
    return values, indices


def order_rows(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of (values, indices) sorted by value descending, then index ascending."""
    indices, by_index = indices.sort(dim=-1)
    values, by_value = values.gather(-1, by_index).sort(dim=-1, descending=True, stable=True)
    return values, indices.gather(-1, by_value)


def _native_fits(x: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None, wts: _Bf16Weights) -> bool:
    tensors = (x, b, wts.W_t) + ((scale,) if scale is not None else ())
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _group_size(s: int, j: int) -> int:
    """Group width for the threshold: the largest power of two leaving ≥ 4·j groups (1 if none divides s)."""
    g = 1
    while s % (2 * g) == 0 and s // (2 * g) >= 4 * j:
        g *= 2
    return g


def _bf16_keys(x: torch.Tensor, wts: _Bf16Weights) -> tuple[torch.Tensor, torch.Tensor]:
    """xa = bf16 [x, 1, 0...] (n, d_pad) and the bf16 ranking keys xa @ Wb (n, s)."""
    n, d = x.shape
    xa = torch.empty(n, wts.d_pad, dtype=torch.bfloat16, device=x.device)
    xa[:, :d] = x
    xa[:, d] = 1
    xa[:, d + 1:] = 0
    return xa, xa @ wts.Wb


def _candidates(s: int, k: int) -> tuple[int, int]:
    """(j, g): the threshold is the j-th largest maximum of s/g strided groups of g latents."""
    j = min(k + max(32, k), s)  # margin over k: with k + k/2 about 10% of rows failed the bound (dense fallback)
    return j, _group_size(s, j)


def _native_block(lib: Kernels, x: torch.Tensor, b: torch.Tensor, k: int, absolute: bool, relu: bool,
                  scale: torch.Tensor | None, wts: _Bf16Weights, values: torch.Tensor, indices: torch.Tensor,
                  ok: torch.Tensor) -> None:
    """`_bf16_block` by the native kernel (`nnsae/csrc/bf16_topk.cpp`), which sets each row's threshold from its own
    k-th bf16 key and error bound rather than a fixed count of candidates: fewer candidates, and almost no row left
    for the dense path."""
    xa, key_b = _bf16_keys(x, wts)
    lib.bf16_topk(x, xa, key_b, wts, b, scale, k, _candidates(wts.Wb.shape[1], k)[1], NATIVE_MARGIN, absolute, relu,
                  values, indices, ok)


def _bf16_block(x: torch.Tensor, b: torch.Tensor, k: int, absolute: bool, relu: bool, scale: torch.Tensor | None,
                wts: _Bf16Weights, values: torch.Tensor, indices: torch.Tensor, ok: torch.Tensor) -> None:
    """Fill values/indices of the rows of x whose selection the bound certifies, and `ok` (which ones those are)."""
    n, d = x.shape
    s = wts.Wb.shape[1]
    xa, key_b = _bf16_keys(x, wts)
    if absolute:
        key_b = key_b.abs_()
    # Threshold t: the j-th largest maximum of w = s/g strided groups of g latents, so ≥ j latents have key ≥ t (one
    # per group); with ≥ 4j groups, few more than j do. Candidates are exactly the latents with bf16 key ≥ t, all of
    # them in the groups whose maximum is ≥ t.
    j, g = _candidates(s, k)
    w = s // g
    maxima = key_b.view(n, g, w).amax(dim=1)
    t = torch.topk(maxima, min(j, w), dim=1, sorted=False).values.amin(dim=1)
    g_rows, g_cols = (maxima >= t[:, None]).nonzero(as_tuple=True)
    members = (g_rows * s + g_cols)[:, None] + torch.arange(0, s, w, device=x.device)  # (groups kept, g) flat
    member_keys = key_b.view(-1).index_select(0, members.view(-1)).view(members.shape)
    hit = (member_keys >= t.index_select(0, g_rows)[:, None]).view(-1).nonzero().squeeze(1)
    flat = members.view(-1).index_select(0, hit)
    rows, cols = torch.div(flat, s, rounding_mode="floor"), flat % s  # by row, then group
    counts = torch.bincount(rows, minlength=n)
    # The exact float32 keys of the candidates (entries sorted by latent reuse each W row: ~2.5× faster).
    order = torch.sort(cols.to(torch.int32), stable=True).indices
    raw = torch.empty(cols.numel(), dtype=x.dtype, device=x.device)
    raw[order] = row_dots(x.contiguous(), wts.W_t, cols.index_select(0, order),
                          torch.zeros(1, dtype=torch.long, device=x.device), rows.index_select(0, order))
    exact = raw + b.index_select(0, cols)
    if scale is not None:
        exact = exact * scale.index_select(0, cols)
    key = exact.abs() if absolute else exact
    # Per row, the k largest exact keys among its candidates (padded to the longest candidate list).
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=x.device) - starts.index_select(0, rows)
    padded = torch.full((n, max(int(counts.max()), k)), -math.inf, dtype=key.dtype, device=x.device)
    padded[rows, slot] = key
    kth_keys, best = torch.topk(padded, k, dim=1, sorted=False)
    # Proven bound on |bf16 key − float32 key| for every latent (`_error_bound`); latents outside the candidates have
    # bf16 key < t, so float32 key ≤ t + bound: the row is exact if its k-th candidate beats that strictly.
    reach = t.float() + _error_bound(xa[:, :d], x, t.float(), wts, d)
    certified = kth_keys.amin(dim=1) > reach
    if relu:  # nothing outside can be positive: only zeros (after the ReLU) are at stake
        certified |= reach <= 0
    certified &= (counts >= k) & torch.isfinite(reach)
    ok.copy_(certified)
    good = certified.nonzero().squeeze(1)
    entries = (starts.index_select(0, good)[:, None] + best.index_select(0, good)).view(-1)
    values[good] = exact.index_select(0, entries).view(-1, k)
    indices[good] = cols.index_select(0, entries).view(-1, k)


def _error_bound(xb: torch.Tensor, x: torch.Tensor, t: torch.Tensor, wts: _Bf16Weights, d: int) -> torch.Tensor:
    """Per row, a bound on |bf16 GEMM key − float32 key| over all latents whose bf16 key is below t.

    With xa = [x, 1], Wa_j = [W_j; b_j]·scale_j and their bf16 roundings xb, Wb_j (δx = xa − xb, δW = Wa_j − Wb_j):
    xa·Wa_j − xb·Wb_j = δx·Wa_j + xb·δW_j ≤ ‖δx‖‖Wa_j‖ + ‖xb‖‖δW_j‖ (Cauchy–Schwarz); float32 accumulation of either
    product in any order adds ≤ γ‖·‖‖·‖ with γ = (d+2)·2⁻²⁴/(1 − (d+2)·2⁻²⁴) (also covering the rounding of
    scale·W and of the bias add); rounding the GEMM's output to bf16 adds ≤ 2u|acc| ≤ 2u/(1−2u)·|t| below t
    (monotone), and flush-to-zero of bf16 denormals ≤ (d+1)·2⁻¹²⁶·(1 + max|xb| + max|Wb|). The sum is scaled by
    1.01 for the rounding of the bound's own float32 arithmetic.
    """
    xb32, x32 = xb.float(), x.float()
    gamma = (d + 2) * 2.0 ** -24 / (1 - (d + 2) * 2.0 ** -24)
    u_out = 2 * _BF16_EPS / (1 - 2 * _BF16_EPS)
    # the appended 1 is exact in bf16: it adds 1 to both squared norms and nothing to δx
    norm_xa, norm_xb = (x32.square().sum(1) + 1).sqrt(), (xb32.square().sum(1) + 1).sqrt()
    bound = ((x32 - xb32).norm(dim=1) * wts.norm + norm_xb * wts.err_norm
             + gamma * (norm_xb * wts.bf16_norm + 2 * norm_xa * wts.norm) + u_out * t.abs()
             + (d + 1) * _TINY * (1 + xb32.abs().amax(dim=1) + wts.abs_max))
    return bound * 1.01


# ---- dense encoders: bias and activation in one pass ----------------------------------------------------------------

_ACTIVATION_KINDS = {"relu": 0, "jumprelu": 1, "gated": 2}


def bias_activation(h: torch.Tensor, b: torch.Tensor, kind: str, *, threshold: torch.Tensor | None = None,
                    scale: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                    native: Kernels | None = None) -> torch.Tensor:
    """The activations of a dense encoder from `h = x @ W_enc` (..., d_sae), computed in place in `h`:

    * ``"relu"``: relu(h + b);
    * ``"jumprelu"``: relu(z) · 1[z > threshold] with z = h + b;
    * ``"gated"``: relu(h · scale + b2) · 1[h + b > 0] (b the gate bias, scale = exp(r_mag), b2 the magnitude bias).

    The same float32 operations as the torch formulas (the add, then the comparisons), so the same results bit for
    bit; `native` (`nnsae.native.library()`) does them in one pass over float32 CPU tensors, rows split over torch's
    thread count, instead of 2-4 torch passes with temporaries."""
    if kind not in _ACTIVATION_KINDS:
        raise ValueError(f"Unknown fused activation {kind!r}; one of {sorted(_ACTIVATION_KINDS)}.")
    params = [t for t in (b, threshold, scale, b2) if t is not None]
    if (native is not None and h.device.type == "cpu" and h.dtype == torch.float32 and h.is_contiguous()
            and all(t.dtype == torch.float32 and t.is_contiguous() and t.device == h.device for t in params)):
        t = threshold.clamp(min=0) if kind == "jumprelu" else None
        native.bias_activation(h.view(-1, h.shape[-1]), b, t, scale, b2, _ACTIVATION_KINDS[kind])
        return h
    if kind == "relu":
        return h.add_(b).relu_()
    if kind == "jumprelu":
        h.add_(b)
        return h.masked_fill_(h <= threshold.clamp(min=0), 0)  # z where z > max(θ, 0), NaN kept: relu(z)·1[z > θ]
    gate = (h + b > 0).to(h.dtype)
    return h.mul_(scale).add_(b2).relu_().mul_(gate)
