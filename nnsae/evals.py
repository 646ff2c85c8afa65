"""SAE evaluation with SAELens' metric names and formulas (saelens-compat.md §6).

Activation metrics (sparsity, reconstruction, shrinkage, feature density) come from one harvest pass for all SAEs;
the CE/KL metrics run the model with each SAE spliced in through `nnsae.attach` (no error term, special-token
positions passed through, as SAELens does) and with its hook zero-ablated.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nnsae.data import OFFLINE, batched, iter_documents, pack, special_token_ids
from nnsae.harvest import Harvester
from nnsae.seam import as_nnsight, unwrap_model
from nnsae.hooks import HookPoint, resolve_hook
from nnsae.architectures import SAE
from nnsae.rundir import atomic_write, check_writable, locked, unique_names, write_json


@dataclass
class _ActivationStats:
    """Streaming sums for one SAE's activation metrics (float64 on CPU)."""

    d_sae: int
    tokens: int = 0
    l0: float = 0.0
    l1: float = 0.0
    mse: float = 0.0
    cossim: float = 0.0
    l2_in: float = 0.0
    l2_out: float = 0.0
    l2_ratio: float = 0.0
    ev_legacy: float = 0.0
    sum_sq_norm: float = 0.0
    sum_x: torch.Tensor | None = None
    rel_bias: list[float] = field(default_factory=list)
    fired: torch.Tensor | None = None
    prompts_fired: torch.Tensor | None = None
    l0_per_token: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, mask: torch.Tensor) -> None:
        """x, x_hat: [B, T, d]; f: [B, T, d_sae]; mask: [B, T] tokens that count."""
        flat = mask.flatten().to(x.device)
        xs = x.flatten(0, -2)[flat].double()
        xh = x_hat.flatten(0, -2)[flat].double()
        fs = f.flatten(0, -2)[flat]
        if xs.shape[0] == 0:
            return
        resid = (xs - xh).pow(2).sum(-1)
        norm_in, norm_out = xs.norm(dim=-1), xh.norm(dim=-1)
        self.tokens += xs.shape[0]
        l0 = (fs != 0).sum(-1).double()
        self.l0_per_token.append(l0.float().cpu())
        self.l0 += l0.sum().item()
        self.l1 += fs.abs().double().sum().item()
        self.mse += resid.sum().item()
        self.cossim += ((xs / norm_in[:, None]) * (xh / norm_out[:, None])).sum(-1).sum().item()
        self.l2_in += norm_in.sum().item()
        self.l2_out += norm_out.sum().item()
        self.l2_ratio += (norm_out / torch.where(norm_in.abs() < 1e-4, 1.0, norm_in)).sum().item()
        self.rel_bias.append((norm_out.pow(2).mean() / (xs * xh).sum(-1).mean()).item())
        self.ev_legacy += (1 - resid / (xs - xs.mean(0)).pow(2).sum(-1)).sum().item()
        self.sum_sq_norm += xs.pow(2).sum().item()
        sum_x = xs.sum(0).cpu()
        self.sum_x = sum_x if self.sum_x is None else self.sum_x + sum_x
        fired = (f != 0) & mask.to(f.device)[..., None]
        counts = fired.sum((0, 1)).double().cpu()
        self.fired = counts if self.fired is None else self.fired + counts
        prompts = fired.any(1).sum(0).double().cpu()
        self.prompts_fired = prompts if self.prompts_fired is None else self.prompts_fired + prompts

    def metrics(self) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
        n = max(self.tokens, 1)
        variance = self.sum_sq_norm / n - (self.sum_x / n).pow(2).sum().item() if self.sum_x is not None else 0.0
        mse = self.mse / n
        if variance < 1e-10:
            ev = 1.0 if mse < 1e-10 else 0.0
        else:
            ev = 1.0 - mse / variance
        fired = self.fired if self.fired is not None else torch.zeros(self.d_sae, dtype=torch.float64)
        prompts = self.prompts_fired if self.prompts_fired is not None else torch.zeros_like(fired)
        density = fired / n
        metrics = {
            "reconstruction_quality": {"explained_variance": ev, "explained_variance_legacy": self.ev_legacy / n,
                                       "mse": mse, "cossim": self.cossim / n},
            "shrinkage": {"l2_norm_in": self.l2_in / n, "l2_norm_out": self.l2_out / n,
                          "l2_ratio": self.l2_ratio / n,
                          "relative_reconstruction_bias": sum(self.rel_bias) / max(len(self.rel_bias), 1)},
            "sparsity": {"l0": self.l0 / n, "l1": self.l1 / n,
                         "dead_features_fraction": (fired == 0).double().mean().item(),
                         "alive_features_fraction": (fired > 0).double().mean().item()},
        }
        feature_metrics = {"feature_density": density.tolist(),
                           "consistent_activation_heuristic": (fired / prompts).tolist(),
                           "log10_feature_sparsity": torch.log10(density + 1e-10).tolist()}
        return metrics, feature_metrics


def weight_metrics(sae: SAE) -> dict[str, list[float]]:
    """SAELens' feature-wise weight metrics: encoder norm, encoder/decoder cosine, encoder bias."""
    W_enc, W_dec = sae.W_enc.detach().float().cpu(), sae.W_dec.detach().float().cpu()
    out = {"encoder_norm": W_enc.norm(dim=0).tolist()}
    if W_dec.shape[1] == W_enc.shape[0]:
        out["encoder_decoder_cosine_sim"] = F.cosine_similarity(W_enc.T, W_dec, dim=-1).tolist()
    if getattr(sae, "b_enc", None) is not None:
        out["encoder_bias"] = sae.b_enc.detach().float().cpu().tolist()
    return out


def _kl(clean_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ new) per position."""
    log_p = F.log_softmax(clean_logits.double(), -1)
    return (log_p.exp() * (log_p - F.log_softmax(new_logits.double(), -1))).sum(-1)


def _ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position [B, T-1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), tokens[:, 1:].flatten(),
                           reduction="none").view(tokens.shape[0], -1)


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _ablated_logits(model: Any, point: HookPoint, tokens: torch.Tensor) -> torch.Tensor:
    """Logits with the activation at `point` zeroed at every position (SAELens' zero-ablation baseline)."""
    with model.trace(tokens):
        envoy = model.get(point.module)
        value = envoy.input if point.io == "input" else envoy.output
        (value[0] if isinstance(value, tuple) else value)[:] = 0
        logits = _logits(model.output).save()
    return logits


def evaluate(model: Any, saes: SAE | Sequence[SAE], dataset: Any = OFFLINE, *, tokenizer: Any = None,
             n_tokens: int = 100_000, n_ce_tokens: int | None = 20_000, context_size: int | None = None,
             batch_size_prompts: int = 8, exclude_special_tokens: bool = True, split: str | None = None,
             text_column: str | None = None, progress: bool = True, out: str | Path | None = None,
             plots: bool = False) -> dict[str, Any] | list[dict[str, Any]]:
    """Evaluate one SAE (→ a record) or several (→ a list of records) on `dataset`.

    Each record is `{"metrics": {group: {name: value}}, "feature_metrics": {...}, "eval_cfg": {...}, "sae_cfg"}`
    with SAELens' groups and names (`sparsity.l0`, `reconstruction_quality.explained_variance`,
    `model_performance_preservation.ce_loss_score`, ...). `n_tokens` tokens feed the activation metrics (one
    harvest pass for all SAEs); `n_ce_tokens` tokens feed CE/KL (None skips them). The offline corpus is read
    from its held-out "test" split unless `split` says otherwise. `out` writes JSON (and PNG plots if asked; see
    `write_eval_results`); it is checked for write access before any compute, and a folder `out` is locked for the
    run (a second evaluation into it is refused).
    """
    items = [saes] if isinstance(saes, SAE) else list(saes)
    if not items:
        raise ValueError("evaluate() needs at least one SAE.")
    for arg, value, least in (("n_tokens", n_tokens, 1), ("n_ce_tokens", n_ce_tokens, 0),
                              ("batch_size_prompts", batch_size_prompts, 1), ("context_size", context_size, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"evaluate(): {arg} must be a whole number >= {least}, got {value!r}"
                             + (" (n_ce_tokens=None or 0 skips CE/KL)." if arg == "n_ce_tokens" else "."))
    if out is not None:
        check_writable(Path(out).parent if Path(out).suffix == ".json" else Path(out))
    with contextlib.ExitStack() as guard:
        if out is not None and Path(out).suffix != ".json":  # a folder of results: one evaluation at a time
            guard.enter_context(locked(Path(out), "an nnsae evaluation"))
        records = _evaluate(model, items, dataset, tokenizer, n_tokens, n_ce_tokens, context_size,
                            batch_size_prompts, exclude_special_tokens, split, text_column, progress)
        if out is not None:
            write_eval_results(records, Path(out), plots=plots)
    for r in records:
        r.pop("l0_per_token")
    return records[0] if isinstance(saes, SAE) else records


def _evaluate(model: Any, items: list[SAE], dataset: Any, tokenizer: Any, n_tokens: int, n_ce_tokens: int | None,
              context_size: int | None, batch_size_prompts: int, exclude_special_tokens: bool, split: str | None,
              text_column: str | None, progress: bool) -> list[dict[str, Any]]:
    nn_model = as_nnsight(model)
    # Optional for pre-tokenized data; text without a tokenizer fails when packing, naming the fix.
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    context_size = context_size or items[0].cfg.metadata.context_size or 128
    split = split or ("test" if dataset == OFFLINE else "train")
    specs = [resolve_hook(nn_model, sae) for sae in items]
    points = [p for spec in specs for p in (spec.read, spec.write)]
    harvester = Harvester(nn_model, points)
    for sae, spec, width in zip(items, specs, harvester.widths[::2]):  # checked now, not after the first batch
        if width != sae.cfg.d_in and not (sae.cfg.reshape_activations == "hook_z" and sae.reshapes_input):
            raise ValueError(f"The SAE for {sae.cfg.metadata.hook_name or spec.read.module!r} has d_in="
                             f"{sae.cfg.d_in} but the activation at {spec.read.module}.{spec.read.io} has width "
                             f"{width}.")
    specials = special_token_ids(tokenizer if tokenizer is not None else unwrap_model(nn_model).config)
    excluded = torch.tensor(sorted(specials) if exclude_special_tokens else [], dtype=torch.long)
    device = next(unwrap_model(nn_model).parameters()).device

    docs = iter_documents(dataset, split=split, text_column=text_column)
    chunks = pack(docs, tokenizer, context_size, prepend_bos=items[0].cfg.metadata.prepend_bos is not False)
    stats = [_ActivationStats(sae.cfg.d_sae) for sae in items]
    ce_parts: list[dict[str, list[torch.Tensor]]] = [
        {k: [] for k in ("ce_clean", "ce_sae", "ce_abl", "kl_sae", "kl_abl")} for _ in items]
    n_batches = math.ceil(max(n_tokens, n_ce_tokens or 0) / (batch_size_prompts * context_size))
    ce_batches = math.ceil((n_ce_tokens or 0) / (batch_size_prompts * context_size))
    seen = 0
    bar = tqdm(total=n_batches * batch_size_prompts * context_size, unit="tok", disable=not progress,
               desc="evaluate")
    for i, batch in enumerate(itertools.islice(batched(chunks, batch_size_prompts), n_batches)):
        tokens = torch.stack([c.tokens for c in batch]).to(device)
        mask = ~torch.isin(tokens.cpu(), excluded)
        if seen < n_tokens:
            acts = harvester(tokens)
            with torch.no_grad():
                for j, sae in enumerate(items):
                    x_in, target = acts[2 * j], acts[2 * j + 1]
                    x_in = x_in.to(sae.device)
                    f, x_hat = sae.encode_decode(x_in)
                    stats[j].add(target.to(x_hat.device, x_hat.dtype), x_hat, f, mask)
        if i < ce_batches:
            _add_ce(nn_model, items, specs, tokens, mask, exclude_special_tokens, ce_parts)
        seen += tokens.numel()
        bar.update(tokens.numel())
    bar.close()
    if seen == 0 or not all(stat.tokens for stat in stats):
        shown = repr(dataset) if isinstance(dataset, str) else f"({type(dataset).__name__})"
        raise ValueError(f"Dataset {shown} (split {split!r}) gave no complete chunk of {context_size} tokens"
                         + (" with a token that is not a special token" if seen else "")
                         + ": use a longer dataset or a smaller context_size.")

    records = []
    for sae, stat, parts in zip(items, stats, ce_parts):
        metrics, feature_metrics = stat.metrics()
        if parts["ce_clean"]:
            metrics.update(_ce_metrics(parts))
        metrics["token_stats"] = {"total_tokens_eval_sparsity_variance": stat.tokens,
                                  "total_tokens_eval_reconstruction": sum(t.numel() for t in parts["ce_clean"])}
        feature_metrics.update(weight_metrics(sae))
        records.append({
            "sae_id": sae.cfg.metadata.neuronpedia_id or sae.cfg.metadata.hook_name,
            "eval_cfg": {"dataset": dataset if isinstance(dataset, str) else None, "split": split,
                         "context_size": context_size, "batch_size_prompts": batch_size_prompts,
                         "n_tokens": n_tokens, "n_ce_tokens": n_ce_tokens,
                         "exclude_special_tokens": exclude_special_tokens},
            "metrics": metrics, "feature_metrics": feature_metrics, "sae_cfg": sae.cfg.to_dict(),
            "l0_per_token": torch.cat(stat.l0_per_token) if stat.l0_per_token else torch.zeros(0),
        })
    return records


def _add_ce(model: Any, saes: list[SAE], specs: list, tokens: torch.Tensor, mask: torch.Tensor,
            exclude_special_tokens: bool, parts: list[dict[str, list[torch.Tensor]]]) -> None:
    from nnsae.attachment import run_with_saes

    with torch.no_grad():
        with model.trace(tokens):
            clean = _logits(model.output).save()
        ce_clean = _ce(clean, tokens).cpu()
        ce_mask, kl_mask = mask[:, :-1], mask
        for sae, spec, part in zip(saes, specs, parts):
            with_sae = run_with_saes(model, tokens, saes=[sae], exclude_special_tokens=exclude_special_tokens)
            ablated = _ablated_logits(model, spec.write, tokens)
            part["ce_clean"].append(ce_clean[ce_mask])
            part["ce_sae"].append(_ce(with_sae, tokens).cpu()[ce_mask])
            part["ce_abl"].append(_ce(ablated, tokens).cpu()[ce_mask])
            part["kl_sae"].append(_kl(clean, with_sae).cpu()[kl_mask])
            part["kl_abl"].append(_kl(clean, ablated).cpu()[kl_mask])


def ce_kl_metrics(model: Any, sae: SAE, token_batches: Sequence[torch.Tensor], exclude_special_tokens: bool = True,
                  tokenizer: Any = None) -> dict[str, dict[str, float]]:
    """SAELens' ``model_performance_preservation`` (CE loss score) and ``model_behavior_preservation`` (KL score)
    groups of ``sae`` spliced into ``model`` over ``token_batches`` ([batch, context] ids): what training logs."""
    nn_model = as_nnsight(model)
    spec = resolve_hook(nn_model, sae)
    source = tokenizer if tokenizer is not None else unwrap_model(nn_model).config
    specials = torch.tensor(sorted(special_token_ids(source)) if exclude_special_tokens else [], dtype=torch.long)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("ce_clean", "ce_sae", "ce_abl", "kl_sae", "kl_abl")}
    for tokens in token_batches:
        _add_ce(nn_model, [sae], [spec], tokens, ~torch.isin(tokens.cpu(), specials), exclude_special_tokens, [parts])
    return _ce_metrics(parts)


def _ce_metrics(parts: dict[str, list[torch.Tensor]]) -> dict[str, dict[str, float]]:
    mean = {k: torch.cat(v).mean().item() for k, v in parts.items()}
    return {
        "model_behavior_preservation": {
            "kl_div_score": (mean["kl_abl"] - mean["kl_sae"]) / mean["kl_abl"],
            "kl_div_with_ablation": mean["kl_abl"], "kl_div_with_sae": mean["kl_sae"]},
        "model_performance_preservation": {
            "ce_loss_score": (mean["ce_abl"] - mean["ce_sae"]) / (mean["ce_abl"] - mean["ce_clean"]),
            "ce_loss_with_ablation": mean["ce_abl"], "ce_loss_with_sae": mean["ce_sae"],
            "ce_loss_without_sae": mean["ce_clean"]},
    }


def _json_safe(value: Any) -> Any:
    """NaN → -1, as SAELens writes its eval JSON."""
    if isinstance(value, float) and math.isnan(value):
        return -1
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_eval_results(records: list[dict[str, Any]], out: Path, plots: bool = False) -> None:
    """`out` ending in .json: one file holding all records; otherwise a folder with one `{name}.json` per SAE (+
    PNGs), named from the `sae_id`s by `nnsae.rundir.unique_names` (two SAEs on one hook: `{hook}.json` and
    `{hook}_2.json`). Every file is written atomically."""
    clean = [_json_safe({k: v for k, v in r.items() if k != "l0_per_token"}) for r in records]
    names = unique_names([r["sae_id"] for r in records])
    if out.suffix == ".json":
        write_json(out, clean[0] if len(clean) == 1 else clean)
        folder = out.parent
    else:
        for name, record in zip(names, clean):
            write_json(out / f"{name}.json", record)
        folder = out
    if plots:
        for name, record in zip(names, records):
            plot_eval(record, folder / name)


def plot_eval(record: dict[str, Any], prefix: Path) -> list[Path]:
    """L0 histogram and log10 feature-density histogram as PNGs (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("Eval plots need matplotlib: pip install matplotlib") from e
    paths = []
    l0 = record["l0_per_token"].numpy()
    log_density = torch.tensor(record["feature_metrics"]["log10_feature_sparsity"]).numpy()
    for name, values, xlabel in (("l0_hist", l0, "active features per token (L0)"),
                                 ("feature_density_hist", log_density, "log10 feature density")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(values, bins=50, color="#4c72b0")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")
        ax.set_title(f"{record['sae_id']}: {xlabel}")
        fig.tight_layout()
        path = prefix.parent / f"{prefix.name}_{name}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# transcoders
# ---------------------------------------------------------------------------------------------------------------


def evaluate_transcoders(model: Any, transcoders: Any, dataset: Any = OFFLINE, *, layers: Sequence[int] | None = None,
                         replace: Sequence[str | Sequence[int]] | None = None, tokenizer: Any = None,
                         n_tokens: int = 100_000, n_ce_tokens: int | None = 20_000, context_size: int | None = None,
                         batch_size_prompts: int = 8, exclude_special_tokens: bool = True, split: str | None = None,
                         text_column: str | None = None, dense_threshold: float = 0.1,
                         progress: bool = True) -> dict[str, Any]:
    """Evaluate a transcoder set, a cross-layer transcoder, or a list of nnsae transcoder SAEs (one per layer).

    Returns ``{"layers": {L: record}, "replacements": {name: metrics}}``:
    - per layer, `evaluate`'s record of the layer's transcoder against the true MLP output (SAELens' names:
      ``reconstruction_quality.explained_variance``, ``sparsity.l0``, ``sparsity.dead_features_fraction``, ...) plus
      ``reconstruction_quality.fraction_of_variance_unexplained`` (1 - explained variance) and
      ``sparsity.dense_features_fraction`` (latents firing on more than `dense_threshold` of the tokens);
    - per replacement, SAELens' ``model_performance_preservation`` (CE loss score) and
      ``model_behavior_preservation`` (KL score) groups with those MLP outputs replaced together (no error term;
      special tokens passed through when `exclude_special_tokens`) against all of them zero-ablated.
      `replace` lists ``"each"`` (``layer_L``: one MLP at a time), ``"all"`` (every evaluated layer at once) and
      explicit layer lists (``layers_1_4``); default ``["each", "all"]`` for a set and ``["all"]`` for a CLT (whose
      layers only exist together). `n_ce_tokens=None` skips them.
    A CLT's layers are always evaluated together, in order (layer L's reconstruction needs the layers before it).
    """
    from nnsae.attachment.transcoders import layer_saes
    from nnsae.circuits.transcoders import CrossLayerTranscoder

    clt = isinstance(transcoders, CrossLayerTranscoder)
    saes = list(transcoders) if isinstance(transcoders, (list, tuple)) else layer_saes(transcoders, layers)
    if not saes:
        raise ValueError("evaluate_transcoders() needs at least one layer.")
    by_layer = {getattr(sae, "layer", _layer_of(sae, i)): sae for i, sae in enumerate(saes)}
    replace = list(replace) if replace is not None else (["all"] if clt else ["each", "all"])
    groups: dict[str, list[int]] = {}
    for item in replace:
        if item == "each":
            if clt:
                raise ValueError("A cross-layer transcoder cannot replace one MLP alone; use replace=['all'].")
            groups.update({f"layer_{layer}": [layer] for layer in by_layer})
        elif item == "all":
            groups["all"] = sorted(by_layer)
        else:
            chosen = sorted(int(layer) for layer in item)
            if any(layer not in by_layer for layer in chosen) or not chosen:
                raise ValueError(f"replace={chosen}: evaluated layers are {sorted(by_layer)}.")
            if clt and chosen != sorted(by_layer):
                raise ValueError("A cross-layer transcoder only replaces all its MLPs together; use replace=['all'].")
            groups["layers_" + "_".join(map(str, chosen))] = chosen

    ordered = [by_layer[layer] for layer in sorted(by_layer)]
    records = evaluate(model, ordered, dataset, tokenizer=tokenizer, n_tokens=n_tokens, n_ce_tokens=None,
                       context_size=context_size, batch_size_prompts=batch_size_prompts,
                       exclude_special_tokens=exclude_special_tokens, split=split, text_column=text_column,
                       progress=progress)
    out: dict[str, Any] = {"layers": {}, "replacements": {}}
    for layer, record in zip(sorted(by_layer), records):
        metrics = record["metrics"]
        metrics["reconstruction_quality"]["fraction_of_variance_unexplained"] = (
            1.0 - metrics["reconstruction_quality"]["explained_variance"])
        density = torch.tensor(record["feature_metrics"]["feature_density"])
        metrics["sparsity"]["dense_features_fraction"] = (density > dense_threshold).double().mean().item()
        out["layers"][layer] = record
    if not n_ce_tokens or not groups:
        return out

    nn_model = as_nnsight(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    context_size = context_size or ordered[0].cfg.metadata.context_size or 128
    split = split or ("test" if dataset == OFFLINE else "train")
    specials = special_token_ids(tokenizer if tokenizer is not None else unwrap_model(nn_model).config)
    excluded = torch.tensor(sorted(specials) if exclude_special_tokens else [], dtype=torch.long)
    device = next(unwrap_model(nn_model).parameters()).device
    write_points = {layer: resolve_hook(nn_model, sae).write for layer, sae in by_layer.items()}
    parts = {name: {k: [] for k in ("ce_clean", "ce_sae", "ce_abl", "kl_sae", "kl_abl")} for name in groups}
    docs = iter_documents(dataset, split=split, text_column=text_column)
    chunks = pack(docs, tokenizer, context_size, prepend_bos=ordered[0].cfg.metadata.prepend_bos is not False)
    n_batches = math.ceil(n_ce_tokens / (batch_size_prompts * context_size))
    for batch in tqdm(itertools.islice(batched(chunks, batch_size_prompts), n_batches), total=n_batches,
                      disable=not progress, desc="transcoder CE/KL"):
        tokens = torch.stack([c.tokens for c in batch]).to(device)
        mask = ~torch.isin(tokens.cpu(), excluded)
        _add_replacement_ce(nn_model, by_layer, write_points, groups, tokens, mask, exclude_special_tokens, parts)
    out["replacements"] = {name: _ce_metrics(part) for name, part in parts.items()}
    return out


def _layer_of(sae: SAE, position: int) -> int:
    """The layer of an nnsae transcoder SAE, from its TransformerLens hook name (else its position in the list)."""
    match = re.match(r"blocks\.(\d+)\.", sae.cfg.metadata.hook_name or "")
    return int(match.group(1)) if match else position


def _add_replacement_ce(model: Any, by_layer: dict[int, SAE], write_points: dict[int, HookPoint],
                       groups: dict[str, list[int]], tokens: torch.Tensor, mask: torch.Tensor,
                       exclude_special_tokens: bool, parts: dict[str, dict[str, list[torch.Tensor]]]) -> None:
    from nnsae.attachment import run_with_saes

    with torch.no_grad():
        with model.trace(tokens):
            clean = _logits(model.output).save()
        ce_clean = _ce(clean, tokens).cpu()
        ce_mask, kl_mask = mask[:, :-1], mask
        for name, layers in groups.items():
            replaced = run_with_saes(model, tokens, saes=[by_layer[layer] for layer in layers],
                                     exclude_special_tokens=exclude_special_tokens)
            with model.trace(tokens):
                for layer in layers:  # layer order is execution order
                    point = write_points[layer]
                    envoy = model.get(point.module)
                    value = envoy.input if point.io == "input" else envoy.output
                    (value[0] if isinstance(value, tuple) else value)[:] = 0
                ablated = _logits(model.output).save()
            part = parts[name]
            part["ce_clean"].append(ce_clean[ce_mask])
            part["ce_sae"].append(_ce(replaced, tokens).cpu()[ce_mask])
            part["ce_abl"].append(_ce(ablated, tokens).cpu()[ce_mask])
            part["kl_sae"].append(_kl(clean, replaced).cpu()[kl_mask])
            part["kl_abl"].append(_kl(clean, ablated).cpu()[kl_mask])
