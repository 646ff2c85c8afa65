"""Uploading SAEs to the Hugging Face Hub in SAELens layout, so `SAE.from_pretrained(repo_id, sae_id)` (nnsae or
SAELens) loads them back.

`upload_saes_to_huggingface(saes_dict, hf_repo_id, ...)` has SAELens' signature (plus `token`, `private`,
`metrics`, `commit_message`). Each entry `{sae_id: SAE | path}` becomes the folder `{sae_id}/` of the repo holding
`cfg.json`, `sae_weights.safetensors` and, when known, `sparsity.safetensors` (an SAE's `log_feature_sparsity`)
and `runner_cfg.json` (if the directory has one). A directory in a foreign format (Gemma Scope, sparsify, ...) is
converted to SAELens layout first. Everything goes through `huggingface_hub` (`HfApi.create_repo`, then ONE
`HfApi.create_commit` with all files, so an upload is all-or-nothing), so tokens (`token=`, `HF_TOKEN`, `hf auth
login`), `HF_ENDPOINT`, Xet/LFS transfer and progress bars behave as for any other Hub upload.

With `add_default_readme` (default), a model card is added in the same commit when the repo (at `hf_revision`)
has no README.md yet: YAML front matter with `library_name: saelens` (so the Hub lists the repo as SAELens
SAEs) and tags, then a table of the SAEs (architecture, widths, model, hook, Neuronpedia id, and metrics when
known: from `metrics=` and from the sparsity file) and a loading snippet. An existing README is never touched.
"""

from __future__ import annotations

import contextlib
import json
import math
import posixpath
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from tqdm.auto import tqdm

from nnsae.architectures import SAE
from nnsae.io.files import read_safetensors
from nnsae.io.formats import saelens
from nnsae.neuronpedia import neuronpedia_page_url

RUNNER_CFG = "runner_cfg.json"
UPLOADED_FILES = (saelens.CFG, saelens.WEIGHTS, saelens.SPARSITY, RUNNER_CFG)


def _check_sae_id(sae_id: Any) -> str:
    if not isinstance(sae_id, str) or not sae_id.strip("/"):
        raise ValueError(f"SAE ids must be non-empty strings (they become folders in the repo), got {sae_id!r}.")
    clean = posixpath.normpath(sae_id.strip("/"))
    if clean.startswith("..") or "\\" in sae_id or clean != sae_id.strip("/") or clean == ".":
        raise ValueError(f"SAE id {sae_id!r} is not a clean relative folder path (no '..', '.', '//' or '\\').")
    return clean


def _stage(sae_id: str, ref: SAE | str | Path, tmp: Path) -> tuple[Path, dict[str, Any]]:
    """A local SAELens-layout folder for `ref` (written under `tmp` when needed) and the SAE's config dict."""
    if isinstance(ref, SAE):
        folder = tmp / sae_id
        ref.save_model(folder)
        return folder, ref.cfg.to_dict()
    if not isinstance(ref, (str, Path)):
        raise TypeError(f"saes_dict[{sae_id!r}] must be an SAE or a directory path, got {type(ref).__name__}.")
    path = Path(ref)
    if not path.is_dir():
        raise FileNotFoundError(f"saes_dict[{sae_id!r}]: {path} is not a directory.")
    if saelens.detect(path):
        return path, json.loads((path / saelens.CFG).read_text())
    try:
        sae = SAE.load_from_disk(path)
    except (ValueError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"saes_dict[{sae_id!r}]: {path} holds no SAE: neither {saelens.CFG} + {saelens.WEIGHTS} (SAELens layout) "
            f"nor a supported foreign format ({e})."
        ) from None
    folder = tmp / sae_id
    sae.save_model(folder)
    return folder, sae.cfg.to_dict()


def _sparsity_metrics(folder: Path) -> dict[str, float]:
    path = folder / saelens.SPARSITY
    if not path.is_file():
        return {}
    log_sparsity = read_safetensors(path).get("sparsity")
    if log_sparsity is None or log_sparsity.numel() == 0:
        return {}
    log_sparsity = log_sparsity.float()
    finite = log_sparsity[log_sparsity.isfinite()]
    out = {"dead features (log10 density < -8)": float((log_sparsity < -8).float().mean())}
    if finite.numel():
        out["mean log10 feature density"] = float(finite.mean())
    return out


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            out[name] = value
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def default_readme(hf_repo_id: str, entries: Mapping[str, dict[str, Any]],
                   metrics: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The model card written when a repo has no README.md: front matter, one table row per SAE, metrics, usage.

    `entries` maps sae_id → {"cfg": cfg.json dict, "folder": local SAELens folder (optional)}.
    """
    metrics = metrics or {}
    lines = ["---", "library_name: saelens", "tags:", "- sparse-autoencoder", "- saelens", "- nnsae", "---", "",
             f"# Sparse autoencoders: {hf_repo_id}", "",
             "SAEs in SAELens layout (`{sae_id}/cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`), "
             "loadable with [SAELens](https://github.com/jbloomAus/SAELens) or nnsae.", "",
             "| SAE id | architecture | d_in | d_sae | model | hook | Neuronpedia |", "|---|---|---|---|---|---|---|"]
    metric_rows = []
    for sae_id, entry in entries.items():
        cfg = entry["cfg"]
        meta = cfg.get("metadata") or {}
        hook = meta.get("hook_name") or meta.get("hf_hook_name") or ""
        if meta.get("hook_name_out") and meta.get("hook_name_out") != meta.get("hook_name"):
            hook = f"{hook} → {meta['hook_name_out']}"
        np_id = meta.get("neuronpedia_id")
        np_cell = f"[{np_id}]({neuronpedia_page_url(np_id)})" if np_id else ""
        lines.append(f"| `{_fmt(sae_id)}` | {cfg.get('architecture', 'standard')} | {cfg.get('d_in', '')} | "
                     f"{cfg.get('d_sae', '')} | {_fmt(meta.get('model_name') or '')} | {_fmt(hook)} | {np_cell} |")
        known = dict(_sparsity_metrics(entry["folder"])) if entry.get("folder") else {}
        known.update(_flatten(metrics.get(sae_id) or {}))
        for name, value in known.items():
            metric_rows.append(f"| `{_fmt(sae_id)}` | {_fmt(name)} | {_fmt(value)} |")
    if metric_rows:
        lines += ["", "## Metrics", "", "| SAE id | metric | value |", "|---|---|---|", *metric_rows]
    first = next(iter(entries))
    lines += ["", "## Usage", "", "```python", "from sae_lens import SAE   # or: from nnsae import SAE", "",
              f"sae = SAE.from_pretrained({hf_repo_id!r}, {first!r})", "```", ""]
    return "\n".join(lines)


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """Turn huggingface_hub's progress bars off for the duration when `show` is False (restored afterwards)."""
    if show or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def upload_saes_to_huggingface(saes_dict: Mapping[str, SAE | str | Path], hf_repo_id: str, hf_revision: str = "main",
                               show_progress: bool = True, add_default_readme: bool = True,
                               token: str | bool | None = None, *, private: bool | None = None,
                               metrics: Mapping[str, Mapping[str, Any]] | None = None,
                               commit_message: str | None = None) -> CommitInfo:
    """Upload SAEs (objects or directories) to `hf_repo_id` at branch `hf_revision`, one folder per sae_id.

    The repo is created if needed (`private` applies only then), and the branch too when it is not "main". All
    files (and the default README when the repo has none) go in one commit; returns its `CommitInfo` (`.oid`,
    `.commit_url`). Afterwards `SAE.from_pretrained(hf_repo_id, sae_id, revision=hf_revision)` loads each SAE.
    `metrics` (`{sae_id: {name: value}}`, nested dicts such as an `nnsae.evaluate` record allowed) are listed in
    the default README.
    """
    if not saes_dict:
        raise ValueError("No SAEs to upload: saes_dict is empty.")
    if not isinstance(hf_repo_id, str) or hf_repo_id.count("/") != 1 or not all(hf_repo_id.split("/")):
        raise ValueError(f"hf_repo_id must look like 'namespace/name', got {hf_repo_id!r}.")
    ids = {_check_sae_id(sae_id): sae_id for sae_id in saes_dict}
    if len(ids) != len(saes_dict):
        raise ValueError(f"SAE ids {sorted(saes_dict)} collide once normalised to folder paths.")
    if "README.md" in ids:
        raise ValueError("'README.md' cannot be an SAE id.")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="nnsae-upload-") as tmp, _progress_bars(show_progress):
        entries: dict[str, dict[str, Any]] = {}
        operations = []
        for clean_id, sae_id in tqdm(ids.items(), desc="Preparing SAEs", disable=not show_progress):
            folder, cfg = _stage(clean_id, saes_dict[sae_id], Path(tmp))
            entries[clean_id] = {"cfg": cfg, "folder": folder}
            for name in UPLOADED_FILES:
                if (folder / name).is_file():
                    operations.append(CommitOperationAdd(path_in_repo=f"{clean_id}/{name}",
                                                         path_or_fileobj=str(folder / name)))

        api.create_repo(hf_repo_id, exist_ok=True, private=private, token=token)
        if hf_revision != "main":
            api.create_branch(hf_repo_id, branch=hf_revision, exist_ok=True, token=token)
        if add_default_readme and not api.file_exists(hf_repo_id, "README.md", revision=hf_revision, token=token):
            readme = default_readme(hf_repo_id, entries, metrics)
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode()))
        message = commit_message or (f"Upload SAE {next(iter(ids))}" if len(ids) == 1
                                     else f"Upload {len(ids)} SAEs")
        return api.create_commit(hf_repo_id, operations, commit_message=message, revision=hf_revision,
                                 token=token, commit_description="Uploaded with nnsae (SAELens layout).")


__all__ = ["default_readme", "upload_saes_to_huggingface"]
