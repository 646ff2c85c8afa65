"""The dashboard's data layer: per-feature records (`FeatureData`) built from an `nnsae.extract` output directory.

`ExtractionSource(extraction_dir, sae_name)` reads what one extraction holds for one SAE:

- the streaming statistics (`Extraction.stats`): firing counts over the counted tokens, mean and max activation,
  the activation histogram, and the top activating contexts (token windows of ±`context_window` tokens inside each
  context chunk, with this feature's activation on every token);
- the parquet shards (one row per token, in token order): token ids, document coordinates, and the stored
  (feature, value) pairs of every token. They give each selected feature's full list of firings, from which the
  quantile samples and the per-token counts are drawn. With `extract(..., top_k=None)` (what `dashboard()` runs) the
  shards hold every non-zero activation, so everything is exact; with a `top_k` cut, a feature's weaker firings on
  tokens where more than `top_k` features fire are missing, which `FeatureData.firings_in_shards` (vs
  `firing_count`) shows.

Definitions (a "firing" is an activation > the extraction's threshold, 0 by default, on a counted token: special
tokens are not counted when the extraction ran with `exclude_special_tokens=True`):

- `density` = firings / counted tokens; `max_act`, `mean_act` (mean over firings);
- histogram: counts of positive activations over the extraction's log-spaced edges, with an underflow column
  (0 < v < edges[0]) first and an overflow column (v ≥ edges[-1]) last;
- quantile groups: the feature's firing values sorted ascending, ranks split into `n_quantiles` equal parts
  (part k holds ranks ⌊k·m/n⌋ … ⌊(k+1)·m/n⌋−1 of m firings); `bin_min`/`bin_max` are the smallest and largest
  value in the part, `bin_contains` its share of the firings; `n_per_quantile` examples are drawn uniformly without
  replacement (seeded per feature) and shown strongest first;
- top tokens: the tokens a feature fires on most often, with mean and max activation there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nnsae.extract import Extraction


@dataclass
class Example:
    """One context: a window of tokens inside one context chunk, with the feature's activation on each."""

    token_ids: list[int]
    values: list[float]
    qualifying_token_index: int  # the token this example was selected for (top activation / quantile sample)
    value: float  # the feature's activation on that token
    chunk_index: int
    chunk_position: int  # position of the qualifying token in its chunk
    doc_id: int | None = None  # document of the qualifying token (-1: BOS/separator)
    doc_position: int | None = None


@dataclass
class ExampleGroup:
    kind: str  # "top" or "quantile"
    title: str
    examples: list[Example]
    quantile: tuple[float, float] | None = None
    bin_min: float | None = None
    bin_max: float | None = None
    bin_contains: float | None = None  # share of the feature's firings in this group
    n_in_bin: int | None = None


@dataclass
class TokenCount:
    token_id: int
    count: int
    mean_act: float
    max_act: float


@dataclass
class LogitData:
    pos_ids: list[int]
    pos_values: list[float]
    neg_ids: list[int]
    neg_values: list[float]
    hist_edges: list[float]
    hist_counts: list[int]


@dataclass
class FeatureData:
    """Everything a feature page shows (token ids are rendered to text later, by the page/JSON writers)."""

    sae: str
    index: int
    n_tokens: int  # counted tokens
    firing_count: int
    density: float
    max_act: float
    mean_act: float
    hist_edges: list[float]  # the extraction's edges (bins + 1 values)
    hist_counts: list[int]  # [underflow] + one count per bin + [overflow]
    groups: list[ExampleGroup] = field(default_factory=list)
    top_tokens: list[TokenCount] = field(default_factory=list)
    firings_in_shards: int | None = None  # firings found in the shards (== firing_count when they are complete)
    logits: LogitData | None = None

    @property
    def top(self) -> list[Example]:
        return next((g.examples for g in self.groups if g.kind == "top"), [])

    @property
    def max_act_token_ids(self) -> list[int]:
        """Distinct tokens at the maximum of the top contexts, strongest first."""
        seen: dict[int, None] = {}
        for ex in self.top:
            seen.setdefault(ex.token_ids[ex.qualifying_token_index], None)
        return list(seen)


def parse_features(features: int | str | Iterable[int] | None, d_sae: int) -> list[int]:
    """`range(100)`, `[3, 5]`, `"0-99"`, `"0-9,15,20-29"`, `"all"`/None (every feature), or an int (the first n)
    → sorted unique feature indices, checked against d_sae."""
    if features is None or (isinstance(features, str) and features.strip().lower() in ("all", "*", "")):
        return list(range(d_sae))
    if isinstance(features, int):
        return list(range(min(features, d_sae)))
    if isinstance(features, str):
        out: list[int] = []
        for part in features.replace(" ", "").split(","):
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            try:
                out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
            except ValueError:
                raise ValueError(f"Bad feature spec {features!r}: use e.g. '0-99', '3,7,10-20' or 'all'.") from None
        picked = out
    else:
        picked = [int(f) for f in features]
    bad = [f for f in picked if not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"Feature(s) {bad[:10]} out of range for d_sae={d_sae} (valid: 0..{d_sae - 1}).")
    if not picked:
        raise ValueError("No features selected.")
    return sorted(set(picked))


def read_manifest(extraction_dir: str | Path) -> dict:
    """The manifest of an extraction, read and checked by `nnsae.extract.Extraction` (SAE names included)."""
    return Extraction(extraction_dir).manifest


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(per-row lengths, flat values) of a list<...> column."""
    col = table.column(name)
    arr = pa.concat_arrays(col.chunks) if col.num_chunks != 1 else col.chunk(0)
    lengths = np.asarray(arr.value_lengths().fill_null(0))
    return lengths, np.asarray(arr.flatten())


class ExtractionSource:
    """Per-feature data of one SAE of one extraction (statistics + shards), read once and served per feature."""

    def __init__(self, extraction_dir: str | Path, sae_name: str):
        self.extraction = Extraction(extraction_dir)
        self.dir, self.manifest, self.name = self.extraction.dir, self.extraction.manifest, sae_name
        self.sae_entry = self.extraction.sae(sae_name)
        stats = self.extraction.stats(sae_name)
        self.stats = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in stats.items()}
        settings = self.settings = self.extraction.settings
        self.T = int(settings["context_size"])
        self.window = int(settings["context_window"])
        self.threshold = float(settings["threshold"])
        self.exclude_special = bool(settings.get("exclude_special_tokens", False))
        self.complete = self.extraction.complete
        self.d_sae = int(self.stats["firing_count"].shape[0])
        columns = ["token_id", "is_special", "doc_id", "position"]
        parts = {c: [] for c in columns}
        self.shard_starts = []
        for shard, path in zip(self.extraction.shards, self.extraction.shard_files):
            table = pq.read_table(path, columns=columns)
            self.shard_starts.append(int(shard["first_chunk"]) * self.T)
            for c in columns:
                parts[c].append(table.column(c).to_numpy())
        lengths = [len(p) for p in parts["token_id"]]
        self.n_rows = sum(lengths)
        expected = int(self.manifest["total_chunks"]) * self.T
        if self.n_rows != expected or self.shard_starts != np.cumsum([0] + lengths)[:-1].tolist():
            raise ValueError(f"The shards of {self.dir} are not one contiguous token stream ({self.n_rows} rows, "
                             f"manifest says {expected}).")
        cat = lambda c, dtype: np.concatenate(parts[c]).astype(dtype) if parts[c] else np.zeros(0, dtype)  # noqa
        self.tokens = cat("token_id", np.int32)
        self.is_special = cat("is_special", bool)
        self.doc_id = cat("doc_id", np.int64)
        self.doc_position = cat("position", np.int32)

    # ---- the shards' firings of selected features ----------------------------------------------------------------

    def occurrences(self, features: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """{feature: (global token rows ascending, values)} of every stored non-zero activation of `features`."""
        wanted = np.zeros(self.d_sae, dtype=bool)
        wanted[np.asarray(list(features), dtype=np.int64)] = True
        f_parts, r_parts, v_parts = [], [], []
        for path, start in zip(self.extraction.shard_files, self.shard_starts):
            table = pq.read_table(path, columns=[f"{self.name}.indices", f"{self.name}.values"])
            lengths, feats = _list_column(table, f"{self.name}.indices")
            _, vals = _list_column(table, f"{self.name}.values")
            rows = np.repeat(np.arange(start, start + len(lengths), dtype=np.int64), lengths)
            keep = wanted[feats]
            f_parts.append(feats[keep].astype(np.int64))
            r_parts.append(rows[keep])
            v_parts.append(vals[keep].astype(np.float32))
        feats = np.concatenate(f_parts) if f_parts else np.zeros(0, np.int64)
        rows = np.concatenate(r_parts) if r_parts else np.zeros(0, np.int64)
        vals = np.concatenate(v_parts) if v_parts else np.zeros(0, np.float32)
        order = np.lexsort((rows, feats))
        feats, rows, vals = feats[order], rows[order], vals[order]
        out = {}
        for f in set(int(f) for f in features):
            lo, hi = np.searchsorted(feats, f, side="left"), np.searchsorted(feats, f, side="right")
            out[f] = (rows[lo:hi], vals[lo:hi])
        return out

    # ---- examples ------------------------------------------------------------------------------------------------

    def _window(self, row: int, feature_rows: np.ndarray, feature_vals: np.ndarray) -> Example:
        chunk, pos = divmod(int(row), self.T)
        lo, hi = max(0, pos - self.window), min(self.T, pos + self.window + 1)
        base = chunk * self.T
        span = np.arange(base + lo, base + hi)
        values = np.zeros(len(span), dtype=np.float64)
        if len(feature_rows):
            at = np.minimum(np.searchsorted(feature_rows, span), len(feature_rows) - 1)
            hit = feature_rows[at] == span
            values[hit] = feature_vals[at[hit]]
        return Example(token_ids=self.tokens[base + lo:base + hi].tolist(), values=[float(v) for v in values],
                       qualifying_token_index=pos - lo, value=float(values[pos - lo]), chunk_index=chunk,
                       chunk_position=pos, doc_id=int(self.doc_id[row]), doc_position=int(self.doc_position[row]))

    def top_examples(self, feature: int) -> list[Example]:
        """The extraction's top contexts of `feature`, strongest first, cropped to their chunk."""
        s, w = self.stats, self.window
        out = []
        indices, top_values = s["top_index"][feature].tolist(), s["top_values"][feature].tolist()
        for j, index in enumerate(indices):
            if index < 0:
                continue
            toks = s["top_tokens"][feature, j].tolist()
            acts = s["top_acts"][feature, j].tolist()
            inside = [k for k, t in enumerate(toks) if t >= 0]
            if w not in inside:
                continue
            first, last = inside[0], inside[-1]
            chunk, pos = divmod(index, self.T)
            out.append(Example(token_ids=toks[first:last + 1], values=[float(a) for a in acts[first:last + 1]],
                               qualifying_token_index=w - first, value=float(top_values[j]),
                               chunk_index=chunk, chunk_position=pos,
                               doc_id=int(self.doc_id[index]) if index < self.n_rows else None,
                               doc_position=int(self.doc_position[index]) if index < self.n_rows else None))
        return out

    # ---- records -------------------------------------------------------------------------------------------------

    def feature_data(self, features: Sequence[int], *, n_quantiles: int = 5, n_per_quantile: int = 5,
                     n_top_tokens: int = 10, seed: int = 0) -> list[FeatureData]:
        """`FeatureData` for each of `features` (in the given order)."""
        s = self.stats
        occ = self.occurrences(features)
        edges = [float(e) for e in s["histogram_edges"].tolist()]
        out = []
        for f in features:
            rows, vals = occ[f]
            counted = ~self.is_special[rows] if self.exclude_special else np.ones(len(rows), bool)
            firing = counted & (vals > self.threshold)
            f_rows, f_vals = rows[firing], vals[firing]
            fd = FeatureData(
                sae=self.name, index=int(f), n_tokens=int(s["n_tokens_counted"]),
                firing_count=int(s["firing_count"][f]), density=float(s["firing_rate"][f]),
                max_act=float(s["max_activation"][f]), mean_act=float(s["mean_activation"][f]),
                hist_edges=edges, hist_counts=[int(c) for c in s["histogram"][f].tolist()],
                firings_in_shards=int(firing.sum()),
            )
            top = self.top_examples(f)
            fd.groups.append(ExampleGroup("top", "Top activations", top))
            fd.groups += self._quantile_groups(f, f_rows, f_vals, rows, vals, n_quantiles, n_per_quantile, seed)
            fd.top_tokens = self._top_tokens(f_rows, f_vals, n_top_tokens)
            out.append(fd)
        return out

    def _quantile_groups(self, feature: int, f_rows: np.ndarray, f_vals: np.ndarray, rows: np.ndarray,
                         vals: np.ndarray, n_quantiles: int, n_per: int, seed: int) -> list[ExampleGroup]:
        m = len(f_vals)
        if m == 0 or n_quantiles < 1 or n_per < 1:
            return []
        order = np.lexsort((f_rows, f_vals))  # value ascending, ties by token order
        sorted_vals, sorted_rows = f_vals[order], f_rows[order]
        rng = np.random.default_rng([seed, feature])
        groups = []
        for k in reversed(range(n_quantiles)):
            start, end = k * m // n_quantiles, (k + 1) * m // n_quantiles
            if end <= start:
                continue
            pick = np.sort(rng.choice(end - start, size=min(n_per, end - start), replace=False)) + start
            examples = [self._window(int(sorted_rows[i]), rows, vals) for i in pick[::-1]]
            lo_q, hi_q = k / n_quantiles, (k + 1) / n_quantiles
            groups.append(ExampleGroup(
                "quantile", f"Quantile {lo_q:.0%}–{hi_q:.0%}", examples, quantile=(lo_q, hi_q),
                bin_min=float(sorted_vals[start]), bin_max=float(sorted_vals[end - 1]),
                bin_contains=(end - start) / m, n_in_bin=end - start))
        return groups

    def _top_tokens(self, f_rows: np.ndarray, f_vals: np.ndarray, n: int) -> list[TokenCount]:
        if len(f_rows) == 0 or n < 1:
            return []
        ids = self.tokens[f_rows]
        uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=f_vals.astype(np.float64), minlength=len(uniq))
        maxes = np.full(len(uniq), -np.inf)
        np.maximum.at(maxes, inverse, f_vals.astype(np.float64))
        means = sums / counts
        order = np.lexsort((-means, -counts))[:n]
        return [TokenCount(int(uniq[i]), int(counts[i]), float(means[i]), float(maxes[i])) for i in order]


def logit_data(effects: torch.Tensor, n: int = 10, bins: int = 40) -> list[LogitData]:
    """Top/bottom `n` tokens and a `bins`-bin histogram (equal-width bins between the row's min and max, the max
    in the last bin) of each row of `effects` [features, vocab]."""
    if effects.numel() == 0:
        return []
    effects = effects.float()
    k = min(n, effects.shape[1])
    pos = effects.topk(k, dim=1)
    neg = (-effects).topk(k, dim=1)
    lo, hi = effects.min(dim=1).values, effects.max(dim=1).values
    hi = torch.where(hi > lo, hi, lo + 1e-6)
    index = ((effects - lo[:, None]) / (hi - lo)[:, None] * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(effects.shape[0], bins, dtype=torch.long).scatter_add_(1, index, torch.ones_like(index))
    steps = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    edges = lo.double()[:, None] + (hi - lo).double()[:, None] * steps
    pos_ids, pos_values = pos.indices.tolist(), pos.values.tolist()
    neg_ids, neg_values = neg.indices.tolist(), (-neg.values).tolist()
    edges_l, counts_l = edges.tolist(), counts.tolist()
    return [LogitData(pos_ids=pos_ids[i], pos_values=pos_values[i], neg_ids=neg_ids[i], neg_values=neg_values[i],
                      hist_edges=edges_l[i], hist_counts=counts_l[i]) for i in range(effects.shape[0])]


__all__ = ["Example", "ExampleGroup", "ExtractionSource", "FeatureData", "LogitData", "TokenCount", "logit_data",
           "parse_features", "read_manifest"]
