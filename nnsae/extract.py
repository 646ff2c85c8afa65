"""Batch feature extraction: SAE features of every token of a dataset, written as resumable parquet shards, with
per-feature statistics and top activating contexts computed in the same pass.

    out = nnsae.extract(model, [sae_a, sae_b], "offline", "feats/", n_tokens=1_000_000)
    table = load_features(out)                        # one row per token
    stats = load_feature_stats(out, "blocks.6.hook_resid_post")

One model forward per batch serves every SAE (`Harvester`: all read hooks in one nnsight trace, the forward
stopped after the deepest). Layout of `out`:

    manifest.json                       what was run (model, SAEs, dataset, settings) and the committed shards
    shards/shard-000000.parquet         one row per token (see `extract`)
    stats/state/{sae}.{k:06d}.safetensors  streaming statistics after k shards (only the latest is kept)
    stats/{sae}.safetensors, .json      final statistics (written when the run completes)
    .lock                               held while a run writes (`nnsae.rundir.locked`): a second one is refused

`Extraction(out)` reads this format back (manifest, SAE names, shards, statistics); `load_features` and
`load_feature_stats` use it, and so do the dashboards.

Exactness under interruption: a shard is a fixed number of whole chunks of the packed token stream, processed in
fixed batches, so a shard's content does not depend on when the run started. A shard is committed by (1) writing
the parquet file (temp file, fsync, os.replace), (2) writing every SAE's statistics state after that shard the same
way, under a new versioned name, then (3) atomically replacing manifest.json to list the shard and point at the new
state. A run killed at any moment leaves either the old or the new manifest, and the files each refers to are
complete; a restart with the same call checks the committed shards' sha256, deletes the files of its own naming
that no manifest refers to (nothing else), restores the statistics, and continues
with the first chunk after the last committed shard (`pack(..., skip_chunks=)`), so every token ends up exactly once
and the output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from torch import nn

from nnsae import native
from nnsae.data import OFFLINE, Chunk, iter_documents, pack, special_token_ids
from nnsae.harvest import Harvester
from nnsae.seam import as_nnsight, unwrap_model
from nnsae.hooks import HookPoint, hook_label, resolve_hook
from nnsae.io.files import read_json, read_safetensors
from nnsae.rundir import (TMP_PREFIX, atomic_write, check_identity, child_path, claim,
                          dataset_identity, locked, model_fingerprint, sha256_file, tensors_fingerprint,
                          tokenizer_fingerprint, unique_names, write_json, write_safetensors)
from nnsae.architectures import SAE
from nnsae.architectures.topk import TopKSAE

__all__ = ["extract", "Extraction", "load_features", "load_feature_stats", "histogram_edges", "sae_names",
           "FeatureStats"]

FORMAT = "nnsae.features"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
STATS = "stats"
STATE = "stats/state"
DEFAULT_HISTOGRAM_BINS = 60  # log-spaced over [1e-3, 1e3]: 10 bins per decade
HISTOGRAM_RANGE = (1e-3, 1e3)
BASE_COLUMNS = {"token_id": pa.int32(), "doc_id": pa.int64(), "position": pa.int32(), "chunk_index": pa.int64(),
                "chunk_position": pa.int32(), "is_special": pa.bool_()}
DENSE_LOOKUP_LIMIT = 1 << 25  # (batch tokens + padding) x d_sae up to which windows read a dense copy (128 MB)


# ---- names, fingerprints, settings ----------------------------------------------------------------------------------


def sae_names(saes: SAE | Sequence[SAE] | Mapping[str, SAE]) -> list[str]:
    """The names `extract` gives `saes` (columns `{name}.indices`/`{name}.values`, files `stats/{name}.*`): the
    dict keys, else `cfg.metadata.hook_name`, `hf_hook_name`, `neuronpedia_id`, else `sae_{i}`; made
    filesystem-safe (anything outside `[A-Za-z0-9._-]` becomes `_`) and unique (`_2`, `_3`, ... appended)."""
    return [name for name, _ in _named_saes(saes)]


def _named_saes(saes: SAE | Sequence[SAE] | Mapping[str, SAE]) -> list[tuple[str, SAE]]:
    if isinstance(saes, SAE):
        saes = [saes]
    if isinstance(saes, Mapping):
        pairs = [(str(k), v) for k, v in saes.items()]
    else:
        pairs = []
        for sae in saes:
            meta = getattr(getattr(sae, "cfg", None), "metadata", None)
            pairs.append((next((getattr(meta, key) for key in ("hook_name", "hf_hook_name", "neuronpedia_id")
                                if getattr(meta, key, None)), None), sae))
    if not pairs:
        raise ValueError("extract() needs at least one SAE.")
    for raw, sae in pairs:
        if not isinstance(sae, SAE):
            raise TypeError(f"extract() takes nnsae SAEs, got {type(sae).__name__} for {raw!r}.")
    return list(zip(unique_names([raw for raw, _ in pairs]), [sae for _, sae in pairs]))


def _check_same_model(named: list[tuple[str, SAE]]) -> None:
    models: dict[str, list[str]] = {}
    for name, sae in named:
        model_name = sae.cfg.metadata.model_name
        if model_name:
            models.setdefault(str(model_name), []).append(name)
    if len(models) > 1:
        which = "; ".join(f"{', '.join(names)} for model {m!r}" for m, names in models.items())
        raise ValueError(f"All SAEs in one extraction must be for the same model, but they are for different "
                         f"models (cfg.metadata.model_name): {which}. Run extract() once per model.")


def sae_fingerprint(sae: SAE) -> str:
    return tensors_fingerprint(sae.state_dict())


def histogram_edges(bins: int | Sequence[float] = DEFAULT_HISTOGRAM_BINS) -> torch.Tensor:
    """Histogram bin edges (float64): `bins` log-spaced bins over [1e-3, 1e3], or the given increasing positive
    edges. The stored histogram has two more columns than bins: [0] counts positive values below the first edge,
    [-1] values at or above the last edge."""
    if isinstance(bins, int):
        if bins < 1:
            raise ValueError(f"histogram_bins={bins} must be ≥ 1.")
        lo, hi = HISTOGRAM_RANGE
        return torch.logspace(math.log10(lo), math.log10(hi), bins + 1, dtype=torch.float64)
    edges = torch.tensor([float(e) for e in bins], dtype=torch.float64)
    if edges.numel() < 2 or not bool((edges > 0).all()) or not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError("histogram_bins must be an int or at least two increasing positive edges.")
    return edges


def _comparable(header: dict[str, Any]) -> dict[str, Any]:
    """The parts of a manifest that must match for a restart to continue the same run."""
    return {
        "model": {k: header["model"][k] for k in ("fingerprint",)},
        "tokenizer": header["tokenizer"],
        "dataset": header["dataset"],
        "settings": header["settings"],
        "saes": {s["name"]: {k: v for k, v in s.items() if k != "cfg"} | {"cfg": _cfg_sans_device(s["cfg"])}
                 for s in header["saes"]},
    }


def _cfg_sans_device(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k != "device"}


# ---- files --------------------------------------------------------------------------------------------------------


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Write one shard (atomically). Module-level so tests can inject write errors. No dictionary encoding: on
    feature lists it made shards 30% larger and their writing 2.5× slower (8,192 tokens, 3 SAEs: 0.20 s → 0.08 s)."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", use_dictionary=False))


def _state_path(out: Path, name: str, version: int) -> Path:
    return out / STATE / f"{name}.{version:06d}.safetensors"


_OWN_FILES = {SHARDS: re.compile(r"shard-\d{6}\.parquet"), STATE: re.compile(r".+\.\d{6}\.safetensors")}


def _clean(out: Path, manifest: dict[str, Any]) -> None:
    """Delete what no committed manifest refers to: temp files, shards and statistics states of an interrupted
    commit. Only files named as extract() names them are touched; anything else a user put there stays."""
    keep = {s["file"] for s in manifest["shards"]} | set(manifest["stats_state"]["files"].values())
    for folder in (".", SHARDS, STATS, STATE):
        if not (out / folder).is_dir():
            continue
        for p in (out / folder).iterdir():
            ours = folder in _OWN_FILES and _OWN_FILES[folder].fullmatch(p.name)
            if p.is_file() and (p.name.startswith(TMP_PREFIX) or ours and f"{folder}/{p.name}" not in keep):
                p.unlink()


# ---- encoding -----------------------------------------------------------------------------------------------------


def _is_plain_topk(sae: SAE) -> bool:
    return (isinstance(sae, TopKSAE) and type(sae).activation is TopKSAE.activation
            and type(sae).encode is TopKSAE.encode and not sae.observed("hook_sae_acts_pre", "hook_sae_acts_post"))


def sparse_activations(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every non-zero entry of `sae.encode(x)` for x [n, d_in]: (row, feature, value float32), ordered by row, then
    value descending, then feature. Unobserved TopK SAEs skip the dense [n, d_sae] tensors (`TopKSAE.sparse_encode`,
    same values)."""
    n = x.shape[0]
    if _is_plain_topk(sae):
        values, indices = sae.sparse_encode(x, ordered=True)
        rows = torch.arange(n, device=values.device).repeat_interleave(values.shape[1])
        values, indices = values.reshape(-1), indices.reshape(-1)
        keep = values != 0
        if bool(keep.all()):  # the usual case: k positive pre-activations per row, no copies needed
            return rows.cpu(), indices.cpu(), values.float().cpu()
        return rows[keep].cpu(), indices[keep].cpu(), values[keep].float().cpu()
    acts = sae.encode(x)
    keep = acts != 0
    rows, feats = keep.nonzero(as_tuple=True)
    rows, feats, vals = rows.cpu(), feats.cpu(), acts[keep].float().cpu()
    order = _grouped_desc(rows, vals)
    return rows[order], feats[order], vals[order]


def _grouped_desc(groups: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """The permutation sorting entries by (group asc, value desc), ties kept in input order: one stable sort of an
    int64 key made of the group and the float32 bits of the value mapped to an order-preserving integer."""
    bits = vals.float().view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # ascending in the float value
    return torch.sort(groups * (1 << 33) + ((1 << 31) - ordered), stable=True).indices


def _token_lists(rows: torch.Tensor, feats: torch.Tensor, vals: torch.Tensor, n: int, top_k: int | None
                 ) -> tuple[pa.Array, pa.Array]:
    """Per-token list arrays (indices int32, values float32) sorted by value desc (then feature asc), cut to top_k.
    Input entries are in that order (`sparse_activations`)."""
    counts = torch.bincount(rows, minlength=n)
    if top_k is not None and rows.numel() and int(counts.max()) > top_k:
        starts = counts.cumsum(0) - counts
        keep = torch.arange(rows.numel()) - starts[rows] < top_k
        feats, vals, counts = feats[keep], vals[keep], counts.clamp(max=top_k)
    offsets = pa.array(torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32).numpy())
    return (pa.ListArray.from_arrays(offsets, pa.array(feats.to(torch.int32).numpy())),
            pa.ListArray.from_arrays(offsets, pa.array(vals.numpy())))


# ---- streaming statistics -----------------------------------------------------------------------------------------


class FeatureStats:
    """Streaming per-feature statistics of one SAE, in bounded memory (O(d_sae · n_top · window)).

    Counted: every entry with |value| > threshold (of tokens not excluded). Kept: firing count, activation sum
    (float64), max activation, a histogram of positive values over fixed edges, and the `n_top` most activating
    contexts per feature — ranked by value (> threshold), ties by earlier global token index — each with the token
    ids and this feature's activations in a window of ±`window` tokens inside the token's chunk (-1 / 0 outside).
    Batches must arrive in increasing global token order (which makes "existing entries win ties" exact).
    """

    def __init__(self, d_sae: int, edges: torch.Tensor, n_top: int, window: int, threshold: float):
        self.d_sae, self.edges, self.n_top, self.window, self.threshold = d_sae, edges, n_top, window, threshold
        self._dense: torch.Tensor | None = None  # scratch for `_windows`, not state
        width = 2 * window + 1
        nb = edges.numel() + 1  # n_bins + 2 (under/overflow)
        self.t = {
            "firing_count": torch.zeros(d_sae, dtype=torch.int64),
            "activation_sum": torch.zeros(d_sae, dtype=torch.float64),
            "max_activation": torch.full((d_sae,), -math.inf),
            "histogram": torch.zeros(d_sae, nb, dtype=torch.int64),
            "top_values": torch.full((d_sae, n_top), -math.inf),
            "top_index": torch.full((d_sae, n_top), -1, dtype=torch.int64),
            "top_slot": torch.arange(n_top).repeat(d_sae, 1),  # rank → slot of the window arrays below
            "window_tokens": torch.full((d_sae, n_top, width), -1, dtype=torch.int32),
            "window_acts": torch.zeros(d_sae, n_top, width),
            "n_tokens": torch.zeros(1, dtype=torch.int64),
            "n_tokens_counted": torch.zeros(1, dtype=torch.int64),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.t)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in self.t.items():
            if key not in state or state[key].shape != value.shape or state[key].dtype != value.dtype:
                raise ValueError(f"Statistics state does not match this SAE (tensor {key!r}).")
        self.t = {k: state[k].clone() for k in self.t}

    def update(self, rows: torch.Tensor, feats: torch.Tensor, vals: torch.Tensor, tokens: torch.Tensor,
               counted: torch.Tensor | None, first_index: int) -> None:
        """One batch. rows/feats/vals: every non-zero activation, grouped by ascending row; tokens [B, T];
        counted [B*T] bool: the tokens that enter the statistics (None: all); row r is global token
        `first_index + r`. By the native kernel when it is available (`nnsae.native`), else torch ops: the same
        state bit for bit."""
        t = self.t
        t["n_tokens"] += tokens.numel()
        t["n_tokens_counted"] += tokens.numel() if counted is None else int(counted.sum())
        lib = native.library()
        if lib is not None:
            lib.feature_stats(t, rows, feats, vals, tokens, counted, first_index, self.threshold, self.edges,
                              self.n_top, self.window)
            return
        mask = vals.abs() > self.threshold
        if counted is not None:
            mask &= counted[rows]
        idx = mask.nonzero().squeeze(1)
        f, v = feats.index_select(0, idx), vals.index_select(0, idx)
        t["firing_count"] += torch.bincount(f, minlength=self.d_sae)
        t["activation_sum"] += torch.bincount(f, weights=v.double(), minlength=self.d_sae)
        t["max_activation"].scatter_reduce_(0, f, v, "amax")
        positive = (v > 0).nonzero().squeeze(1)
        bins = torch.bucketize(v.index_select(0, positive).double(), self.edges, right=True)
        nb = t["histogram"].shape[1]
        t["histogram"].view(-1).index_add_(0, f.index_select(0, positive) * nb + bins, torch.ones_like(bins))
        if self.n_top:
            self._update_top(rows, feats, vals, idx, f, v, tokens, first_index)

    def _update_top(self, rows_all: torch.Tensor, feats_all: torch.Tensor, vals_all: torch.Tensor,
                    idx: torch.Tensor, f: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor, first_index: int
                    ) -> None:
        t, N = self.t, self.n_top
        floor = t["top_values"][:, N - 1].contiguous()  # the value to beat: equal values lose to earlier tokens
        cand = ((v > self.threshold) & (v > floor.index_select(0, f))).nonzero().squeeze(1)
        if cand.numel() == 0:
            return
        rows, feats, vals = rows_all.index_select(0, idx[cand]), f.index_select(0, cand), v.index_select(0, cand)
        # Group by feature; within a feature, value desc then row asc (the input is in row order).
        order = _grouped_desc(feats, vals)
        rows, feats, vals = rows[order], feats[order], vals[order]
        uniq, counts = torch.unique_consecutive(feats, return_counts=True)
        group = torch.repeat_interleave(torch.arange(uniq.numel()), counts)
        rank = torch.arange(feats.numel()) - (counts.cumsum(0) - counts)[group]
        keep = rank < N
        group, rank, rows, vals = group[keep], rank[keep], rows[keep], vals[keep]
        new_vals = torch.full((uniq.numel(), N), -math.inf)
        new_rows = torch.full((uniq.numel(), N), -1, dtype=torch.int64)
        new_vals[group, rank], new_rows[group, rank] = vals, rows
        # Merge: existing entries first, so a stable sort keeps them ahead of equal new values (earlier tokens).
        old_vals, old_index, old_slot = t["top_values"][uniq], t["top_index"][uniq], t["top_slot"][uniq]
        sel = torch.sort(torch.cat([old_vals, new_vals], 1), dim=1, descending=True, stable=True).indices[:, :N]
        from_old = sel < N
        old_sel, new_sel = sel.clamp(max=N - 1), (sel - N).clamp(min=0)
        picked_rows = new_rows.gather(1, new_sel)
        t["top_values"][uniq] = torch.where(from_old, old_vals.gather(1, old_sel), new_vals.gather(1, new_sel))
        t["top_index"][uniq] = torch.where(from_old, old_index.gather(1, old_sel), first_index + picked_rows)
        # Windows stay in their slots; entries that enter take the slots of those that left (lowest first), so only
        # the new windows are written.
        fresh = ~from_old
        kept_slot = torch.where(from_old, old_slot.gather(1, old_sel), N)
        kept = torch.zeros(uniq.numel(), N + 1, dtype=torch.int8).scatter_(1, kept_slot, 1)[:, :N]
        free = torch.sort(kept, dim=1, stable=True).indices  # free slots first, ascending
        fresh_rank = (fresh.cumsum(1) - 1).clamp(min=0)
        slot = torch.where(from_old, kept_slot, free.gather(1, fresh_rank))
        t["top_slot"][uniq] = slot
        if fresh.any():
            fresh_feats = uniq.unsqueeze(1).expand(-1, N)[fresh]
            win_tokens, win_acts = self._windows(picked_rows[fresh], fresh_feats, rows_all, feats_all, vals_all,
                                                 tokens)
            t["window_tokens"][fresh_feats, slot[fresh]] = win_tokens
            t["window_acts"][fresh_feats, slot[fresh]] = win_acts

    def _windows(self, rows: torch.Tensor, feats: torch.Tensor, rows_all: torch.Tensor, feats_all: torch.Tensor,
                 vals_all: torch.Tensor, tokens: torch.Tensor, block: int = 1 << 16
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and feature activations in ±window around (row, feature) pairs, within the row's chunk."""
        (B, T), w, d = tokens.shape, self.window, self.d_sae
        width, padded_T = 2 * w + 1, T + 2 * w
        padded = torch.nn.functional.pad(tokens.to(torch.int32), (w, w), value=-1)
        token_windows = padded.unfold(1, width, 1).reshape(-1, width)  # [B*T, W]
        out_tokens, out_acts = [], []
        size = B * padded_T * d
        if size <= DENSE_LOOKUP_LIMIT:
            # The batch's activations, dense, with `w` zero positions around each chunk: a window is one gather.
            # The buffer is kept between batches and re-zeroed only where it was written.
            if self._dense is None or self._dense.numel() < size or self._dense.dtype != vals_all.dtype:
                self._dense = torch.zeros(size, dtype=vals_all.dtype)
            dense = self._dense
            where = (rows_all + (rows_all // T) * 2 * w + w) * d + feats_all
            dense.index_put_((where,), vals_all)
            steps = torch.arange(width) * d
            try:
                for start in range(0, rows.numel(), block):
                    r, f = rows[start:start + block], feats[start:start + block]
                    out_tokens.append(token_windows.index_select(0, r))
                    at = ((r + (r // T) * 2 * w) * d + f).unsqueeze(1) + steps
                    out_acts.append(dense.index_select(0, at.flatten()).view(-1, width))
            finally:
                dense.index_fill_(0, where, 0)
            return torch.cat(out_tokens), torch.cat(out_acts)
        # Too large for a dense copy: binary search in the sorted (row, feature) keys (never empty here).
        keys, order = (rows_all * d + feats_all).sort()
        vals_all = vals_all[order]
        offsets = torch.arange(-w, w + 1)
        zero = torch.zeros((), dtype=vals_all.dtype)
        for start in range(0, rows.numel(), block):
            r, f = rows[start:start + block], feats[start:start + block]
            q = (r % T).unsqueeze(1) + offsets
            qkey = (r.unsqueeze(1) + offsets) * d + f.unsqueeze(1)
            pos = torch.searchsorted(keys, qkey).clamp(max=keys.numel() - 1)
            hit = (q >= 0) & (q < T) & (keys[pos] == qkey)
            out_tokens.append(token_windows[r])
            out_acts.append(torch.where(hit, vals_all[pos], zero))
        return torch.cat(out_tokens), torch.cat(out_acts)


def _derived(state: dict[str, torch.Tensor], edges: torch.Tensor, context_size: int) -> dict[str, torch.Tensor]:
    """Final statistics from a state: the state plus rates, means, SAELens' log10 sparsity, chunk coordinates."""
    count = state["firing_count"]
    counted = max(int(state["n_tokens_counted"]), 1)
    rate = count.double() / counted
    index = state["top_index"]
    out = {k: v for k, v in state.items() if k not in ("top_slot", "window_tokens", "window_acts")}
    gather = state["top_slot"].unsqueeze(-1).expand(-1, -1, state["window_tokens"].shape[-1])
    out["top_tokens"] = state["window_tokens"].gather(1, gather)
    out["top_acts"] = state["window_acts"].gather(1, gather)
    out["max_activation"] = torch.where(count > 0, state["max_activation"], torch.zeros(()))
    out["mean_activation"] = state["activation_sum"] / count.clamp(min=1)
    out["firing_rate"] = rate
    out["log_feature_sparsity"] = torch.log10(rate + 1e-10).float()
    out["histogram_edges"] = edges
    out["top_chunk_index"] = torch.where(index >= 0, index // context_size, -1)
    out["top_position"] = torch.where(index >= 0, index % context_size, -1)
    return out


# ---- the extraction -----------------------------------------------------------------------------------------------


def _n_heads(hf: nn.Module) -> int | None:
    config = getattr(hf, "config", None)
    return getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)


def extract(model: Any, saes: SAE | Sequence[SAE] | Mapping[str, SAE], dataset: str | Iterable[str] = OFFLINE,
            out: str | Path = "feats/", *, tokenizer: Any = None, context_size: int = 128,
            batch_size_prompts: int = 8, top_k: int | None = 64, threshold: float = 0.0, n_tokens: int | None = None,
            shard_tokens: int = 65536, n_top_contexts: int = 20, context_window: int = 16,
            histogram_bins: int | Sequence[float] = DEFAULT_HISTOGRAM_BINS, split: str = "train",
            text_column: str | None = None, prepend_bos: bool | None = None, exclude_special_tokens: bool = True,
            progress: bool = True, overwrite: bool = False) -> Path:
    """SAE features of every token of `dataset`, for all `saes` from one model pass per batch, into `out`.

    `model`: an HF causal LM, an nnsight wrapper, or a `(model, tokenizer)` pair (as `load_smollm2()` returns).
    `saes`: one SAE, a list, or `{name: sae}` (names otherwise from the hook, see `sae_names`); all for the same
    model. `dataset`: as `nnsae.data.iter_documents` ("offline", local .txt/.jsonl/.parquet, HF name, list of
    strings), packed SAELens-style into `context_size` chunks (BOS first when `prepend_bos`, default: the SAEs'
    metadata, else True), `batch_size_prompts` chunks per forward. `n_tokens`: stop after this many tokens (rounded
    up to whole chunks); default: the whole dataset.

    Shards (`shards/shard-{i:06d}.parquet`, `shard_tokens` rounded down to whole chunks each) have one row per
    token: `token_id` int32, `doc_id` int64 and `position` int32 (document index and position in it, -1 for
    BOS/separators), `chunk_index` int64, `chunk_position` int32, `is_special` bool (BOS/EOS/PAD/...; nothing is
    left out), and per SAE `{name}.indices` list<int32> / `{name}.values` list<float32>: the features with
    |value| > `threshold`, sorted by value descending, at most `top_k` (None: all). A token's global index is
    `chunk_index * context_size + chunk_position`.

    Statistics per SAE (see `FeatureStats`) over all tokens (special tokens left out when
    `exclude_special_tokens`), with `n_top_contexts` top contexts of ±`context_window` tokens and a histogram over
    `histogram_edges(histogram_bins)`, land in `stats/`. Killed at any point and called again the same way, it
    continues after the last complete shard and gives the same bytes as an uninterrupted run; called with other
    settings on the same `out`, it refuses and names them (`overwrite=True` replaces that extraction instead; it also
    lets `out` be a non-empty directory that holds no extraction). Returns `out`.
    """
    if isinstance(model, tuple) and len(model) == 2:
        model, pair_tokenizer = model
        tokenizer = tokenizer if tokenizer is not None else pair_tokenizer
    named = _named_saes(saes)
    _check_same_model(named)
    if context_size < 2 or batch_size_prompts < 1 or shard_tokens < 1:
        raise ValueError("context_size must be ≥ 2, batch_size_prompts ≥ 1 and shard_tokens ≥ 1.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be ≥ 1 (or None for every active feature).")
    if threshold < 0 or not math.isfinite(threshold):
        raise ValueError(f"threshold={threshold} must be a finite number ≥ 0.")
    if n_top_contexts < 0 or context_window < 0:
        raise ValueError("n_top_contexts and context_window must be ≥ 0.")
    if n_tokens is not None and n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens} must be ≥ 1 (or None for the whole dataset).")
    nn_model = as_nnsight(model)
    hf = unwrap_model(nn_model)
    if tokenizer is None:  # optional for pre-tokenized data; text without one fails when packing, naming the fix
        tokenizer = getattr(model, "tokenizer", None)
    config = getattr(hf, "config", None)
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_positions is not None and context_size > max_positions:
        raise ValueError(f"context_size={context_size} is larger than the model's {max_positions} positions.")
    if prepend_bos is None:
        saved = {sae.cfg.metadata.prepend_bos for _, sae in named} - {None}
        prepend_bos = bool(saved.pop()) if len(saved) == 1 else True
    dataset_desc = dataset_identity(dataset, split, text_column)
    edges = histogram_edges(histogram_bins)

    points = [resolve_hook(nn_model, sae).read for _, sae in named]
    unique_points = list(dict.fromkeys(points))
    point_of = [unique_points.index(p) for p in points]
    harvester = Harvester(nn_model, unique_points)
    for (name, sae), p in zip(named, point_of):
        width = harvester.widths[p]
        hook_z = sae.cfg.reshape_activations == "hook_z" and sae.reshapes_input
        if width != sae.cfg.d_in and not hook_z:
            raise ValueError(f"SAE {name!r} has d_in={sae.cfg.d_in} but its hook {hook_label(points[p])} gives "
                             f"width {width}.")

    from nnsae.version import __version__

    chunks_per_shard = max(1, shard_tokens // context_size)
    max_chunks = math.ceil(n_tokens / context_size) if n_tokens is not None else None
    settings = {
        "context_size": context_size, "batch_size_prompts": batch_size_prompts, "top_k": top_k,
        "threshold": threshold, "n_tokens": n_tokens, "chunks_per_shard": chunks_per_shard,
        "n_top_contexts": n_top_contexts, "context_window": context_window,
        "histogram_edges": edges.tolist(), "prepend_bos": prepend_bos,
        "exclude_special_tokens": exclude_special_tokens,
    }
    specials = sorted(special_token_ids(tokenizer if tokenizer is not None else config))
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "nnsae_version": __version__,
        "model": {"name": getattr(config, "_name_or_path", None) or type(hf).__name__,
                  "class": type(hf).__name__, "dtype": str(next(hf.parameters()).dtype).removeprefix("torch."),
                  "fingerprint": model_fingerprint(hf)},
        "tokenizer": {"class": type(tokenizer).__name__, "special_token_ids": specials,
                      "fingerprint": tokenizer_fingerprint(tokenizer)},
        "dataset": dataset_desc,
        "settings": settings,
        "columns": list(BASE_COLUMNS) + [f"{name}.{part}" for name, _ in named for part in ("indices", "values")],
        "saes": [{"name": name, "hook": hook_label(points[i]), "architecture": sae.cfg.architecture,
                  "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "fingerprint": sae_fingerprint(sae),
                  "cfg": sae.cfg.to_dict()} for i, (name, sae) in enumerate(named)],
    }

    out = Path(out)
    created = not out.exists()
    claim(out, MANIFEST, "an extraction", overwrite)  # before the lock file is made in someone else's directory
    try:
        with locked(out, "an nnsae extraction"):
            try:
                return _run(out, header, named, point_of, harvester, tokenizer, dataset, split, text_column,
                            specials, edges, max_chunks, progress, hf, overwrite)
            except BaseException:  # cleaned up under the lock: a concurrent loser never deletes the winner's files
                if created and not (out / MANIFEST).exists():  # failed before anything was written: leave no trace
                    shutil.rmtree(out, ignore_errors=True)
                raise
    except _EmptyDataset as e:
        raise ValueError(str(e)) from None


class _EmptyDataset(Exception):
    pass


def _open_manifest(out: Path, header: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    fresh = header | {"complete": False, "total_tokens": 0, "total_chunks": 0, "shards": [],
                      "stats_state": {"shards_done": 0, "files": {}}, "stats": {}}
    if not claim(out, MANIFEST, "an extraction", overwrite):
        return fresh
    try:
        existing = Extraction(out)
    except ValueError:  # a damaged manifest: with overwrite, start again (_clean deletes the files it names so)
        if not overwrite:
            raise
        (out / MANIFEST).unlink()
        return fresh
    try:
        check_identity(out, _comparable(existing.manifest), _comparable(header), "an extraction",
                       "Use a new output directory (--out), overwrite=True to replace it, or call again with the "
                       "original settings to resume.")
        existing.verify()
        return existing.manifest
    except ValueError:  # another run, or a damaged one
        if not overwrite:
            raise
    for record in existing.manifest["stats"].values():  # shards and states are then deleted by _clean
        for key in ("file", "summary"):
            existing.path(record[key]).unlink(missing_ok=True)
    (out / MANIFEST).unlink()
    return fresh


def _run(out: Path, header: dict[str, Any], named: list[tuple[str, SAE]], point_of: list[int], harvester: Harvester,
         tokenizer: Any, dataset: Any, split: str, text_column: str | None, specials: list[int], edges: torch.Tensor,
         max_chunks: int | None, progress: bool, hf: nn.Module, overwrite: bool) -> Path:
    settings = header["settings"]
    T, B = settings["context_size"], settings["batch_size_prompts"]
    manifest = _open_manifest(out, header, overwrite)
    _clean(out, manifest)
    stats = [FeatureStats(sae.cfg.d_sae, edges, settings["n_top_contexts"], settings["context_window"],
                          settings["threshold"]) for _, sae in named]
    for (name, _), stat in zip(named, stats):
        file = manifest["stats_state"]["files"].get(name)
        if file is not None:
            stat.load_state_dict(read_safetensors(out / file))
    if manifest["complete"]:
        _finalize(out, manifest, named, stats, edges, T)
        return out

    done = manifest["total_chunks"]
    docs = iter_documents(dataset, split=split, text_column=text_column)
    chunks = pack(docs, tokenizer, T, settings["prepend_bos"], skip_chunks=max(done - 1, 0))
    if done:  # the data must continue where the committed shards end
        last = next(chunks, None)
        if last is None or _chunk_digest(last) != manifest["shards"][-1]["last_chunk_sha256"]:
            raise ValueError(f"The dataset no longer matches the shards in {out}: chunk {done - 1} differs from the "
                             "one extracted before (was the dataset changed?). Use a new output directory.")
    else:
        first = next(chunks, None)
        if first is None:
            raise _EmptyDataset(f"Dataset {header['dataset'].get('path') or '(iterable)'} (split {split!r}) gave no "
                                f"tokens: it is empty or shorter than one chunk of context_size={T} tokens.")
        chunks = itertools.chain([first], chunks)
    if not manifest["shards"]:
        write_json(out / MANIFEST, manifest)

    special_ids = torch.tensor(specials, dtype=torch.int64)
    hook_z_heads = [_n_heads(hf) if sae.cfg.reshape_activations == "hook_z" and sae.reshapes_input else None
                    for _, sae in named]
    names = [name for name, _ in named]
    schema = pa.schema(list(BASE_COLUMNS.items())
                       + [f for n in names for f in ((f"{n}.indices", pa.list_(pa.int32())),
                                                     (f"{n}.values", pa.list_(pa.float32())))])

    def process(batch: list[Chunk], first_chunk: int) -> pa.RecordBatch:
        tokens = torch.stack([c.tokens for c in batch])
        n = tokens.numel()
        acts = harvester(tokens)
        flat = tokens.flatten()
        special = torch.isin(flat, special_ids)
        counted = ~special if settings["exclude_special_tokens"] else None
        columns = [
            pa.array(flat.to(torch.int32).numpy()),
            pa.array(torch.stack([c.doc_ids for c in batch]).flatten().to(torch.int64).numpy()),
            pa.array(torch.stack([c.positions for c in batch]).flatten().to(torch.int32).numpy()),
            pa.array(np.repeat(np.arange(first_chunk, first_chunk + len(batch), dtype=np.int64), T)),
            pa.array(np.tile(np.arange(T, dtype=np.int32), len(batch))),
            pa.array(special.numpy()),
        ]
        with torch.inference_mode():
            for (name, sae), stat, p, heads in zip(named, stats, point_of, hook_z_heads):
                x = acts[p].flatten(0, 1).to(sae.device)
                if heads is not None:
                    x = x.unflatten(-1, (heads, -1))
                rows, feats, vals = sparse_activations(sae, x)
                stat.update(rows, feats, vals, tokens, counted, first_chunk * T)
                active = vals.abs() > settings["threshold"]
                if not bool(active.all()):
                    rows, feats, vals = rows[active], feats[active], vals[active]
                columns += _token_lists(rows, feats, vals, n, settings["top_k"])
        return pa.RecordBatch.from_arrays(columns, schema=schema)

    from tqdm.auto import tqdm

    total = max_chunks * T if max_chunks is not None else None
    bar = tqdm(total=total, initial=done * T, unit="tok", unit_scale=True, desc="extract", disable=not progress,
               dynamic_ncols=True)
    # Data is read in this thread: a background thread parsing and tokenizing holds the GIL against the forward's
    # Python glue, and measured slower here than reading in line.
    exhausted = False
    try:
        while not exhausted and (max_chunks is None or done < max_chunks):
            target = settings["chunks_per_shard"]
            if max_chunks is not None:
                target = min(target, max_chunks - done)
            record_batches, n_chunks, last = [], 0, None
            while n_chunks < target:
                batch = list(itertools.islice(chunks, min(B, target - n_chunks)))
                if not batch:
                    exhausted = True
                    break
                record_batches.append(process(batch, done + n_chunks))
                n_chunks += len(batch)
                last = batch[-1]
                bar.update(len(batch) * T)
            if n_chunks:
                manifest = _commit(out, manifest, pa.Table.from_batches(record_batches, schema=schema), done,
                                   n_chunks, _chunk_digest(last), named, stats, T)
                done += n_chunks
    finally:
        bar.close()
    _finalize(out, manifest, named, stats, edges, T)
    return out


def _chunk_digest(chunk: Chunk) -> str:
    return hashlib.sha256(chunk.tokens.to(torch.int64).numpy().tobytes()).hexdigest()


def _commit(out: Path, manifest: dict[str, Any], table: pa.Table, first_chunk: int, n_chunks: int, last_digest: str,
            named: list[tuple[str, SAE]], stats: list[FeatureStats], T: int) -> dict[str, Any]:
    """Make one shard durable: parquet, then statistics states (new version), then the manifest naming both."""
    index = len(manifest["shards"])
    rel = f"{SHARDS}/shard-{index:06d}.parquet"
    version = index + 1
    try:
        _write_parquet(table, out / rel)
        new_states = {}
        for (name, _), stat in zip(named, stats):
            path = _state_path(out, name, version)
            write_safetensors(path, stat.state_dict())
            new_states[name] = path.relative_to(out).as_posix()
        shard = {"file": rel, "index": index, "first_chunk": first_chunk, "n_chunks": n_chunks,
                 "n_tokens": n_chunks * T, "bytes": (out / rel).stat().st_size, "sha256": sha256_file(out / rel),
                 "last_chunk_sha256": last_digest}
        updated = dict(manifest, shards=manifest["shards"] + [shard],
                       total_chunks=manifest["total_chunks"] + n_chunks,
                       total_tokens=manifest["total_tokens"] + n_chunks * T,
                       stats_state={"shards_done": version, "files": new_states})
        write_json(out / MANIFEST, updated)
    except (OSError, SafetensorError) as e:
        code = getattr(e, "errno", None) or errno.EIO
        reason = os.strerror(code)
        raise OSError(code,
                      f"Writing shard {index} of the extraction in {out} failed ({reason}: {e}). Nothing of this "
                      f"shard was committed: {out} still holds {index} complete shard(s) "
                      f"({manifest['total_tokens']} tokens) and is resumable — fix the cause (e.g. free disk space) "
                      "and call extract() again with the same arguments.") from e
    for old in manifest["stats_state"]["files"].values():
        (out / old).unlink(missing_ok=True)
    return updated


def _finalize(out: Path, manifest: dict[str, Any], named: list[tuple[str, SAE]], stats: list[FeatureStats],
              edges: torch.Tensor, T: int) -> None:
    """Write the final statistics files (idempotent) and mark the manifest complete."""
    records = {}
    for (name, sae), stat in zip(named, stats):
        tensors = _derived(stat.state_dict(), edges, T)
        path = out / STATS / f"{name}.safetensors"
        write_safetensors(path, tensors)
        count = tensors["firing_count"]
        summary = {
            "sae": name, "d_sae": sae.cfg.d_sae, "n_tokens": int(tensors["n_tokens"]),
            "n_tokens_counted": int(tensors["n_tokens_counted"]), "threshold": stat.threshold,
            "mean_l0": float(count.sum()) / max(int(tensors["n_tokens_counted"]), 1),
            "dead_features": int((count == 0).sum()), "n_top_contexts": stat.n_top, "context_window": stat.window,
            "histogram_edges": edges.tolist(),
            "histogram_columns": "[0]: 0 < value < edges[0]; [i]: edges[i-1] <= value < edges[i]; [-1]: >= edges[-1]",
            "context_size": T, "tensors": sorted(tensors),
        }
        write_json(out / STATS / f"{name}.json", summary)
        records[name] = {"file": f"{STATS}/{name}.safetensors", "summary": f"{STATS}/{name}.json",
                         "sha256": sha256_file(path)}
    if not manifest["complete"] or manifest.get("stats") != records:
        write_json(out / MANIFEST, dict(manifest, complete=True, stats=records))


# ---- reading results back -----------------------------------------------------------------------------------------


class Extraction:
    """An `extract()` output directory, read back: the one reader of its format (`load_features`,
    `load_feature_stats` and the dashboards use it). Every path it derives from the manifest stays inside the
    directory (`child_path`), so a hostile manifest cannot make a reader open or a dashboard write elsewhere."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.dir} holds no {MANIFEST}: not an nnsae feature extraction (make one with "
                                    "nnsae.extract).")
        self.manifest: dict[str, Any] = read_json(path)
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not an nnsae feature-extraction manifest.")
        try:  # every entry read later, checked now: a damaged manifest is one error naming it
            self.sae_names: list[str] = [child_path(self.dir, s["name"]).name for s in self.manifest["saes"]]
            self.settings: dict[str, Any] = self.manifest["settings"]
            self.complete = bool(self.manifest["complete"])
            self.shards: list[dict[str, Any]] = self.manifest["shards"]
            kinds = [(self.settings, dict), (self.shards, list), (self.manifest["stats_state"]["files"], dict)]
            kinds += [(shard[k], t) for shard in self.shards for k, t in (("file", str), ("bytes", int),
                                                                          ("sha256", str))]
            wrong = next((value for value, kind in kinds if not isinstance(value, kind)), None)
            if wrong is not None:
                raise TypeError(f"{str(wrong)[:60]!r} has the wrong type")
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is damaged (an entry is missing or of the wrong type: {type(e).__name__} {e}); "
                             "it was modified outside nnsae. Run the extraction again into a new directory, or with "
                             "overwrite=True.") from None

    def path(self, relative: str) -> Path:
        """A file the manifest names (`shards/shard-000000.parquet`), checked to stay inside the directory."""
        return child_path(self.dir, *relative.split("/"))

    @property
    def shard_files(self) -> list[Path]:
        return [self.path(s["file"]) for s in self.shards]

    def sae(self, name: str) -> dict[str, Any]:
        """The manifest's entry of one SAE (name, hook, architecture, d_in, d_sae, fingerprint, cfg)."""
        if name not in self.sae_names:
            raise KeyError(f"No SAE {name!r} in {self.dir}; it has {self.sae_names}.")
        return self.manifest["saes"][self.sae_names.index(name)]

    def verify(self) -> None:
        """Check that every committed shard is there with the size and sha256 the manifest records, and every
        statistics state it names is there."""
        for shard, path in zip(self.shards, self.shard_files):
            if not path.is_file() or path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
                raise ValueError(f"{path} is listed in {self.dir / MANIFEST} but is missing or does not match its "
                                 "recorded size and sha256: the directory was modified outside nnsae. Use a new "
                                 "output directory, or overwrite=True to start it again.")
        for file in self.manifest["stats_state"]["files"].values():
            if not self.path(file).is_file():
                raise ValueError(f"Statistics state {self.path(file)} listed in {self.dir / MANIFEST} is missing. Use "
                                 "a new output directory, or overwrite=True to start it again.")

    def stats(self, sae_name: str) -> dict[str, Any]:
        """See `load_feature_stats`."""
        self.sae(sae_name)
        edges = torch.tensor(self.settings["histogram_edges"], dtype=torch.float64)
        final = self.dir / STATS / f"{sae_name}.safetensors"
        if self.complete and final.is_file():
            recorded = (self.manifest.get("stats") or {}).get(sae_name, {}).get("sha256")
            if recorded is not None and sha256_file(final) != recorded:
                raise ValueError(f"{final} does not match the sha256 recorded in {self.dir / MANIFEST}: the file was "
                                 "modified or damaged outside nnsae. Run the extraction again into a new directory.")
            tensors = read_safetensors(final)
        else:
            file = self.manifest["stats_state"]["files"].get(sae_name)
            if file is None:
                raise ValueError(f"{self.dir} has no statistics for {sae_name!r} yet (no shard committed).")
            tensors = _derived(read_safetensors(self.path(file)), edges, self.settings["context_size"])
        result: dict[str, Any] = dict(tensors)
        result["n_tokens"] = int(tensors["n_tokens"])
        result["n_tokens_counted"] = int(tensors["n_tokens_counted"])
        result["complete"] = self.complete
        result["context_size"] = self.settings["context_size"]
        result["context_window"] = self.settings["context_window"]
        return result


def load_features(out_dir: str | Path, *, format: str = "dataset", columns: Sequence[str] | None = None,
                  streaming: bool = False, cache_dir: str | None = None) -> Any:
    """The committed shards of an extraction, in token order: a `datasets.Dataset` (format="dataset"; converted
    once into the datasets cache and memory-mapped from there, or with `streaming=True` an `IterableDataset` read
    straight from the shards) or a `pyarrow.Table` (format="table", read into memory). Works on unfinished runs
    too (the shards committed so far)."""
    extraction = Extraction(out_dir)
    if format not in ("dataset", "table"):
        raise ValueError(f"format={format!r} must be 'dataset' or 'table'.")
    if not extraction.shards:
        raise ValueError(f"{extraction.dir} has no committed shards yet.")
    extraction.verify()  # a shard changed since it was committed (same size or not) is refused, not read
    if format == "table":
        return pa.concat_tables([pq.read_table(f, columns=columns) for f in extraction.shard_files])
    import datasets

    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in extraction.shard_files], split="train",
                               cache_dir=cache_dir, streaming=streaming)
    return ds.select_columns(list(columns)) if columns is not None else ds


def load_feature_stats(out_dir: str | Path, sae_name: str) -> dict[str, Any]:
    """Statistics of one SAE: tensors `firing_count`, `firing_rate`, `activation_sum`, `mean_activation` (over
    firing tokens), `max_activation`, `log_feature_sparsity` (SAELens' log10 density), `histogram` [d_sae,
    bins+2] with `histogram_edges`, top contexts `top_values`/`top_index`/`top_chunk_index`/`top_position`
    [d_sae, n] (-inf/-1 for empty slots) and windows `top_tokens`/`top_acts` [d_sae, n, 2w+1]; plus `n_tokens`,
    `n_tokens_counted` (ints) and `complete`. On an unfinished run they cover the committed shards."""
    return Extraction(out_dir).stats(sae_name)
