"""`dashboard()`: one extraction pass (or an existing one), then a static site and a JSON export per SAE."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from nnsae.architectures import SAE
from nnsae.dashboards import render
from nnsae.dashboards.data import ExtractionSource, FeatureData, logit_data, parse_features, read_manifest
from nnsae.dashboards.logits import LogitEffectsUnavailable, logit_lens
from nnsae.dashboards.schema import SCHEMA, SCHEMA_VERSION
from nnsae.dashboards.tokens import TokenRenderer, display
from nnsae.data import OFFLINE
from nnsae.extract import Extraction, extract, sae_fingerprint, sae_names
from nnsae.io.files import atomic_write
from nnsae.neuronpedia import neuronpedia_page_url
from nnsae.rundir import claim, locked, write_json

EXTRACTION_DIR = "extraction"
RECORD = ".nnsae-dashboard.json"  # marks a folder as a dashboard's own output


def _clean(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _finite(x: float) -> float:
    x = float(x)
    return x if math.isfinite(x) else 0.0


def _write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _dump(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


# ---- records ------------------------------------------------------------------------------------------------------


def sae_info(name: str, sae: SAE | None, manifest: dict[str, Any]) -> dict[str, Any]:
    entry = next((s for s in manifest["saes"] if s["name"] == name), {})
    cfg = sae.cfg.to_dict() if sae is not None else entry.get("cfg", {})
    meta = cfg.get("metadata") or {}
    return {"name": name, "model": meta.get("model_name") or manifest.get("model", {}).get("name"),
            "architecture": cfg.get("architecture"), "d_in": cfg.get("d_in"), "d_sae": int(cfg.get("d_sae") or
                                                                                       entry.get("d_sae")),
            "hook_name": meta.get("hook_name"), "hook": entry.get("hook") or meta.get("hook_name")
            or meta.get("hf_hook_name"), "neuronpedia_id": meta.get("neuronpedia_id") or None}


def feature_record(fd: FeatureData, renderer: TokenRenderer, info: dict[str, Any], logit_method: str | None
                   ) -> dict[str, Any]:
    """The JSON record of one feature (schema: `nnsae.dashboards.schema.FEATURE`)."""
    np_id = info.get("neuronpedia_id")
    model_id, _, source = (np_id or "").partition("/")
    counts, edges, under, over = render.trimmed_histogram(fd)
    ld = fd.logits
    text = lambda i: renderer.label(i)  # noqa: E731
    activations = []
    for group in fd.groups:
        for ex in group.examples:
            toks = renderer.render(ex.token_ids)
            values = [_finite(v) for v in ex.values]
            top = max(range(len(values)), key=lambda k: values[k]) if values else 0
            activations.append({
                "group": group.kind, "quantile": list(group.quantile) if group.quantile else None,
                "bin_min": _clean(group.bin_min) if group.bin_min is not None else None,
                "bin_max": _clean(group.bin_max) if group.bin_max is not None else None,
                "bin_contains": group.bin_contains, "tokens": [t.text for t in toks], "token_ids": list(ex.token_ids),
                "values": values, "qualifying_token_index": ex.qualifying_token_index, "max_value": values[top]
                if values else 0.0, "max_value_token_index": top, "chunk_index": ex.chunk_index,
                "chunk_position": ex.chunk_position, "doc_id": ex.doc_id, "doc_position": ex.doc_position})
    return {
        "schema_version": SCHEMA_VERSION,
        "modelId": model_id if np_id else str(info.get("model") or ""),
        "layer": source if np_id else info["name"],
        "index": fd.index, "sae": info["name"],
        "neuronpedia_id": np_id, "neuronpedia_url": neuronpedia_page_url(np_id, fd.index) if np_id else None,
        "n_tokens": fd.n_tokens, "firing_count": fd.firing_count, "firings_in_shards": fd.firings_in_shards,
        "frac_nonzero": _finite(fd.density), "max_act": _finite(fd.max_act), "mean_act": _finite(fd.mean_act),
        "freq_hist_data_bar_heights": counts,
        "freq_hist_data_bar_values": [math.sqrt(edges[i] * edges[i + 1]) for i in range(len(counts))],
        "freq_hist_data_bin_edges": edges,
        "freq_hist_underflow": under, "freq_hist_overflow": over,
        "logits_available": ld is not None, "logit_method": logit_method if ld is not None else None,
        "pos_str": [text(i) for i in ld.pos_ids] if ld else [], "pos_values": ld.pos_values if ld else [],
        "pos_token_ids": ld.pos_ids if ld else [],
        "neg_str": [text(i) for i in ld.neg_ids] if ld else [], "neg_values": ld.neg_values if ld else [],
        "neg_token_ids": ld.neg_ids if ld else [],
        "logits_hist_data_bar_heights": ld.hist_counts if ld else [],
        "logits_hist_data_bar_values": [(ld.hist_edges[i] + ld.hist_edges[i + 1]) / 2
                                        for i in range(len(ld.hist_counts))] if ld else [],
        "logits_hist_data_bin_edges": ld.hist_edges if ld else [],
        "max_act_tokens": [text(i) for i in fd.max_act_token_ids],
        "top_tokens": [{"token": text(t.token_id), "token_id": t.token_id, "count": t.count,
                        "mean_act": _finite(t.mean_act), "max_act": _finite(t.max_act)} for t in fd.top_tokens],
        "activations": activations,
    }


def index_row(record: dict[str, Any]) -> dict[str, Any]:
    i = record["index"]
    return {"index": i, "frac_nonzero": record["frac_nonzero"], "firing_count": record["firing_count"],
            "max_act": record["max_act"], "mean_act": record["mean_act"],
            "max_act_tokens": [display(t) for t in record["max_act_tokens"][:8]],
            "pos_str": [display(t) for t in record["pos_str"][:8]],
            "neg_str": [display(t) for t in record["neg_str"][:8]],
            "page": f"features/{i}.html", "json": f"features/{i}.json"}


def _dataset_label(desc: dict[str, Any]) -> str | None:
    if desc.get("path") is not None:
        return str(desc["path"])
    if "n_documents" in desc:
        return f"{desc['n_documents']} in-memory documents"
    return str(desc["type"]) if desc.get("type") else None


# ---- the builder --------------------------------------------------------------------------------------------------


def _named(sae_or_saes: SAE | Sequence[SAE] | Mapping[str, SAE] | None) -> list[tuple[str | None, SAE]]:
    if sae_or_saes is None:
        return []
    if isinstance(sae_or_saes, SAE):
        return [(None, sae_or_saes)]
    if isinstance(sae_or_saes, Mapping):
        return [(str(k), v) for k, v in sae_or_saes.items()]
    return [(None, s) for s in sae_or_saes]


def _match_extraction(named: list[tuple[str | None, SAE]], manifest: dict[str, Any], where: Path
                      ) -> list[tuple[str, SAE | None]]:
    """Pair the given SAEs with the SAEs of an existing extraction (by name, else by weights fingerprint)."""
    entries = manifest["saes"]
    names = [e["name"] for e in entries]
    if not named:
        return [(n, None) for n in names]
    default_names = sae_names([s for _, s in named])
    out = []
    for (given, sae), default in zip(named, default_names):
        if given is not None and given in names:
            out.append((given, sae))
            continue
        fp = sae_fingerprint(sae)
        match = next((e["name"] for e in entries if e.get("fingerprint") == fp), None)
        if match is None and given is None and default in names:
            match = default
        if match is None:
            raise ValueError(f"SAE {given or default!r} is not in the extraction {where} (it has {names}); pass the "
                             "SAEs that extraction ran, or leave from_extraction unset to run a new one.")
        out.append((match, sae))
    return out


def build_site(extraction_dir: str | Path, sae_name: str, site: str | Path, *, sae: SAE | None = None,
               model: Any = None, tokenizer: Any = None, features: Any = range(100), n_quantiles: int = 5,
               n_per_quantile: int = 5, n_logits: int = 10, n_top_tokens: int = 10, seed: int = 0,
               root_link: bool = False, progress: bool = False) -> dict[str, Any]:
    """Pages + JSON of one SAE of an extraction into `site` (index.html, features/{i}.html|json, features.json).

    `model` (with `sae`) enables the logit effects; `tokenizer` renders tokens (required). Returns a summary."""
    if tokenizer is None:
        raise ValueError("The dashboard needs the tokenizer that the extraction used: pass tokenizer=...")
    site = Path(site)
    src = ExtractionSource(extraction_dir, sae_name)
    manifest = src.manifest
    info = sae_info(sae_name, sae, manifest)
    picked = parse_features(features, src.d_sae)
    renderer = TokenRenderer(tokenizer)

    fds = src.feature_data(picked, n_quantiles=n_quantiles, n_per_quantile=n_per_quantile,
                           n_top_tokens=n_top_tokens, seed=seed)
    logit_method, logit_note = None, None
    if model is not None and sae is not None:
        try:
            vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
            lens = logit_lens(model, sae, vocab_size=vocab)
            logit_method = lens.description
            index = torch.tensor(picked, dtype=torch.long, device=sae.W_dec.device)
            for start in range(0, len(fds), 512):
                effects = lens.effects(sae.W_dec.detach()[index[start:start + 512]])
                for fd, ld in zip(fds[start:start + 512], logit_data(effects, n_logits)):
                    fd.logits = ld
        except LogitEffectsUnavailable as e:
            logit_note = str(e)
    else:
        logit_note = "no model given" if model is None else "no SAE object given"

    rows = []
    (site / "features").mkdir(parents=True, exist_ok=True)
    keep = {f"{i}.{ext}" for i in picked for ext in ("html", "json")}
    for stale in (site / "features").iterdir():  # pages of features an earlier build showed and this one does not
        if stale.suffix in (".html", ".json") and stale.stem.isdigit() and stale.name not in keep:
            stale.unlink()
    for k, fd in enumerate(tqdm(fds, desc=f"pages {sae_name}", disable=not progress, unit="feature")):
        record = feature_record(fd, renderer, info, logit_method)
        prev_next = (picked[k - 1] if k > 0 else None, picked[k + 1] if k + 1 < len(picked) else None)
        _write(site / "features" / f"{fd.index}.html", render.feature_page(
            fd, renderer, info, prev_next, logit_method, logit_note, record["neuronpedia_url"]))
        _write(site / "features" / f"{fd.index}.json", _dump(record))
        rows.append(index_row(record))
    extraction = {"path": str(Path(extraction_dir).resolve()), "n_tokens": int(src.stats["n_tokens_counted"]),
                  "context_size": src.T, "context_window": src.window,
                  "dataset": _dataset_label(manifest.get("dataset") or {}), "complete": src.complete}
    index_doc = {"schema_version": SCHEMA_VERSION, "sae": info, "extraction": extraction,
                 "logit_method": logit_method, "features": rows}
    _write(site / "features.json", _dump(index_doc))
    _write(site / "index.html", render.index_page(info, rows, extraction, logit_method, root_link=root_link))
    return {"name": sae_name, "site": site, "index": site / "index.html", "n_features": len(rows),
            "hook": info.get("hook"), "d_sae": info.get("d_sae"), "logit_note": logit_note}


def dashboard(model: Any, sae_or_saes: SAE | Sequence[SAE] | Mapping[str, SAE] | None,
              dataset: str | Iterable[str] = OFFLINE, out: str | Path = "dashboard",
              features: int | str | Iterable[int] | None = range(100), n_tokens: int | None = 200_000,
              from_extraction: str | Path | None = None, tokenizer: Any = None, *, context_size: int = 128,
              batch_size_prompts: int = 8, n_top_contexts: int = 20, context_window: int = 16,
              n_quantiles: int = 5, n_per_quantile: int = 5, n_logits: int = 10, n_top_tokens: int = 10,
              seed: int = 0, exclude_special_tokens: bool = True, progress: bool = True,
              extract_kwargs: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Build a static feature dashboard (and its JSON export) for one or more SAEs; returns `out/index.html`.

    `model`: an HF causal LM, an nnsight wrapper or a `(model, tokenizer)` pair; it runs the extraction and gives the
    unembedding for the logit effects (None is allowed with `from_extraction`: no logit effects then).
    `sae_or_saes`: an SAE, a list, or `{name: sae}` (None with `from_extraction`: every SAE in it, without logit
    effects). `features`: `range(100)`, a list, `"0-99"`, `"0-9,42"`, an int n (the first n) or `"all"`/None.

    Without `from_extraction`, `nnsae.extract` runs first into `out/extraction` (ONE model pass over `n_tokens`
    tokens of `dataset` for all SAEs, every non-zero activation kept, `n_top_contexts` top contexts of
    ±`context_window` tokens); calling again with the same settings reuses it. With `from_extraction=DIR`, that
    extraction's statistics and shards are used and the model is not run on the dataset.

    Output: one SAE → `out/index.html` and `out/features/{i}.html`; several → `out/{name}/...` per SAE and an
    `out/index.html` listing them. Per SAE also `features/{i}.json` and `features.json`; `out/schema.json` is their
    JSON Schema (see `nnsae.dashboards`).

    `out` must be new, empty or an earlier dashboard (it holds `.nnsae-dashboard.json`); any other non-empty folder
    is refused unless `overwrite=True`, so the build never replaces files it did not make. One build at a time may
    write into `out` (a lock).
    """
    if isinstance(model, tuple) and len(model) == 2:
        model, pair_tokenizer = model
        tokenizer = tokenizer if tokenizer is not None else pair_tokenizer
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("dashboard() needs the model's tokenizer: pass tokenizer=... (or a (model, tokenizer) pair).")
    out = Path(out)
    named = _named(sae_or_saes)
    if from_extraction is None and (model is None or not named):
        raise ValueError("dashboard() needs a model and SAEs to run the extraction (or from_extraction=DIR).")
    if from_extraction is not None:  # read (and its names checked) before anything is written
        extraction_dir = Path(from_extraction)
        pairs = _match_extraction(named, read_manifest(extraction_dir), extraction_dir)
        Extraction(extraction_dir).verify()  # a shard changed since it was committed is refused, not shown
    claim(out, RECORD, "a dashboard", overwrite)  # before the lock file is made in someone else's directory
    with locked(out, "an nnsae dashboard build"):
        write_json(out / RECORD, {"tool": "nnsae dashboard", "schema_version": SCHEMA_VERSION})
        if from_extraction is None:
            objects = [s for _, s in named]
            given = {g: s for g, s in named} if all(g is not None for g, _ in named) else objects
            saes = dict(zip(sae_names(given), objects))
            kwargs = dict(tokenizer=tokenizer, context_size=context_size, batch_size_prompts=batch_size_prompts,
                          top_k=None, n_tokens=n_tokens, n_top_contexts=n_top_contexts,
                          context_window=context_window, exclude_special_tokens=exclude_special_tokens,
                          progress=progress)
            kwargs.update(extract_kwargs or {})
            try:
                extraction_dir = Path(extract(model, saes, dataset, out / EXTRACTION_DIR, **kwargs))
            except ValueError as e:
                if (out / EXTRACTION_DIR / "manifest.json").is_file() and "different settings" in str(e):
                    raise ValueError(f"{e} (dashboard() keeps its extraction in {out / EXTRACTION_DIR} and reuses "
                                     "it when called again the same way: delete that folder to start over with new "
                                     "settings, or use another `out`.)") from None
                raise
            pairs = list(saes.items())

        multi = len(pairs) > 1
        sites = []
        for name, sae in pairs:
            site = (out / (name if name != EXTRACTION_DIR else f"{name}_sae")) if multi else out
            sites.append(build_site(extraction_dir, name, site, sae=sae, model=model, tokenizer=tokenizer,
                                    features=features, n_quantiles=n_quantiles, n_per_quantile=n_per_quantile,
                                    n_logits=n_logits, n_top_tokens=n_top_tokens, seed=seed, root_link=multi,
                                    progress=progress))
        _write(out / "schema.json", json.dumps(SCHEMA, indent=2, ensure_ascii=False))
        if multi:
            _write(out / "index.html", render.root_page(
                [dict(s, href=f"{Path(s['site']).relative_to(out).as_posix()}/index.html") for s in sites]))
        return out / "index.html"


__all__ = ["build_site", "dashboard", "feature_record", "index_row", "sae_info"]
