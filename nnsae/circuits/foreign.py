"""Transcoder files of other libraries, read into `SingleLayerTranscoder` / `CrossLayerTranscoder`.

- Gemma Scope transcoders (`google/gemma-scope-*-transcoders`): one `params.npz` per layer (`W_enc` [d_model, d_tc],
  `W_dec` [d_tc, d_model], `b_enc`, `b_dec`, `threshold`); JumpReLU from `ln2.hook_normalized` to `hook_mlp_out`.
- Gemma Scope 2 per-layer transcoders: `params.safetensors` (`w_enc` [d_model, d_tc], `w_dec` [d_tc, d_model],
  `b_enc`, `b_dec`, `threshold`, optional `affine_skip_connection` [d_in, d_out]) next to a `config.json`; JumpReLU
  from the MLP input (`pre_feedforward_layernorm` output, TL `mlp.hook_in`) to `hook_mlp_out`.
- Gemma Scope 2 cross-layer transcoders: one `layer_{i}.safetensors` per source layer with `w_enc` [d_model, d_tc],
  `b_enc`, `b_dec` (layer i's output bias), `threshold` and `w_dec` [d_tc, n_layers, d_model], of which only the
  targets `i..n_layers-1` are used (circuit-tracer keeps `w_dec[:, i:]`).
- EleutherAI sparsify transcoders (`transcode: true` in `cfg.json`): `sae.safetensors` with `encoder.weight`
  [d_tc, d_model] (already circuit-tracer's orientation), `encoder.bias`, `W_dec` [d_tc, d_model], `b_dec`, optional
  `W_skip` [d_out, d_in]; activation top-k of ReLU(pre) (no `- b_dec` on the input for transcoders), hooked at
  the input and output of the module named by the folder (`layers.N.mlp`).

JumpReLU here is circuit-tracer's `pre·1[pre > θ]`; SAELens' adds a ReLU, which is the same for θ ≥ 0 (all
published thresholds are positive).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from nnsae.circuits.transcoders import CrossLayerTranscoder, SingleLayerTranscoder
from nnsae.io.files import read_json, read_safetensors
from nnsae.io.formats.gemma_scope import read_npz

__all__ = ["gemma_scope_2_clt", "gemma_scope_2_transcoder", "gemma_scope_transcoder", "is_gemma_scope_2_clt_file",
           "layer_of", "sparsify_transcoder"]

GEMMA_SCOPE_HOOKS = ("ln2.hook_normalized", "hook_mlp_out")
GEMMA_SCOPE_2_HOOKS = ("mlp.hook_in", "hook_mlp_out")
SPARSIFY_HOOKS = ("mlp.hook_in", "hook_mlp_out")


def layer_of(path: str) -> int | None:
    """The layer a Gemma Scope path names (`layer_12/...`, `layer_12_width_16k_...`, `layer_12.safetensors`)."""
    matches = re.findall(r"layer_(\d+)", path)
    return int(matches[-1]) if matches else None


def _cast(t: torch.Tensor, device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype).contiguous()


def _require(tensors: dict[str, torch.Tensor], keys: tuple[str, ...], file: Path, what: str) -> None:
    missing = sorted(set(keys) - set(tensors))
    if missing:
        raise ValueError(f"{file} is not a {what} file: it lacks {missing} (has {sorted(tensors)}).")


def gemma_scope_transcoder(file: Path, device: str | torch.device, dtype: torch.dtype) -> SingleLayerTranscoder:
    t = read_npz(file)
    _require(t, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), file, "Gemma Scope transcoder (params.npz)")
    return SingleLayerTranscoder(
        _cast(t["W_enc"].T, device, dtype), _cast(t["W_dec"], device, dtype), _cast(t["b_enc"], device, dtype),
        _cast(t["b_dec"], device, dtype), activation="jumprelu", threshold=_cast(t["threshold"], device, dtype))


def gemma_scope_2_transcoder(file: Path, device: str | torch.device, dtype: torch.dtype) -> SingleLayerTranscoder:
    t = read_safetensors(file)
    _require(t, ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"), file, "Gemma Scope 2 transcoder")
    if t["w_dec"].dim() != 2:
        raise ValueError(f"{file}: w_dec has shape {tuple(t['w_dec'].shape)}; this is a cross-layer transcoder "
                         "file, load its folder (all layer_i.safetensors) instead.")
    skip = t.get("affine_skip_connection")
    return SingleLayerTranscoder(
        _cast(t["w_enc"].T, device, dtype), _cast(t["w_dec"], device, dtype), _cast(t["b_enc"], device, dtype),
        _cast(t["b_dec"], device, dtype), activation="jumprelu", threshold=_cast(t["threshold"], device, dtype),
        W_skip=None if skip is None else _cast(skip.T, device, dtype))  # stored [d_in, d_out]


def is_gemma_scope_2_clt_file(file: Path) -> bool:
    """Whether a safetensors file holds a Gemma Scope 2 CLT layer (a 3-D `w_dec`), from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return "w_dec" in f.keys() and len(f.get_slice("w_dec").get_shape()) == 3
    except Exception:  # noqa: BLE001 — not a readable safetensors file: not this format
        return False


def gemma_scope_2_clt(files: list[Path], device: str | torch.device, dtype: torch.dtype,
                      feature_input_hook: str = GEMMA_SCOPE_2_HOOKS[0],
                      feature_output_hook: str = GEMMA_SCOPE_2_HOOKS[1], scan: Any = None) -> CrossLayerTranscoder:
    """A CLT from Gemma Scope 2's per-source-layer files, `files[i]` holding source layer i."""
    n_layers = len(files)
    W_enc, b_enc, b_dec, threshold, W_dec = [], [], [], [], []
    for i, file in enumerate(files):
        t = read_safetensors(file)
        _require(t, ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"), file, "Gemma Scope 2 CLT layer")
        if "affine_skip_connection" in t:
            raise NotImplementedError(f"{file}: cross-layer transcoders with an affine skip connection are not "
                                      "supported (CrossLayerTranscoder has no skip path).")
        w_dec = t["w_dec"]
        if w_dec.dim() != 3 or w_dec.shape[1] != n_layers:
            raise ValueError(f"{file}: w_dec must be [d_transcoder, n_layers={n_layers}, d_model] for a CLT of "
                             f"{n_layers} layers, got {tuple(w_dec.shape)}.")
        W_enc.append(t["w_enc"].T)
        b_enc.append(t["b_enc"])
        b_dec.append(t["b_dec"])
        threshold.append(t["threshold"].reshape(-1))
        W_dec.append(_cast(w_dec[:, i:], device, dtype))  # writes to layers i..n-1 only
    return CrossLayerTranscoder(
        _cast(torch.stack(W_enc), device, dtype), W_dec, _cast(torch.stack(b_enc), device, dtype),
        _cast(torch.stack(b_dec), device, dtype), activation="jumprelu",
        threshold=_cast(torch.stack(threshold), device, dtype), feature_input_hook=feature_input_hook,
        feature_output_hook=feature_output_hook, scan=scan)


def sparsify_transcoder(folder: Path, device: str | torch.device, dtype: torch.dtype
                        ) -> tuple[int, SingleLayerTranscoder]:
    """(layer, transcoder) from a sparsify transcoder folder named after its hookpoint (`layers.N.mlp`)."""
    cfg = read_json(folder / "cfg.json")
    if not cfg.get("transcode"):
        raise ValueError(f"{folder}: cfg.json has no `transcode: true`; this is a sparse autoencoder, not a "
                         "transcoder (load it with nnsae.SAE.load_from_disk).")
    if cfg.get("activation", "topk") != "topk":
        raise NotImplementedError(f"{folder}: activation={cfg['activation']!r} is not supported (only topk).")
    hookpoint = folder.name if not re.fullmatch(r"seed\d+", folder.name) else folder.parent.name
    match = re.fullmatch(r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)\.mlp", hookpoint)
    if match is None:
        raise ValueError(f"{folder}: a sparsify transcoder in a set must transcode an MLP (a folder named "
                         f"layers.N.mlp); {hookpoint!r} is not one.")
    run_config = folder.parent / "config.json"
    model = str(read_json(run_config).get("model", "")) if run_config.is_file() else ""
    if re.search(r"gemma-?[23]", model.lower()):
        raise NotImplementedError(f"{folder}: sparsify transcoders of {model} write the MLP module's output, which "
                                  "TransformerLens' hook_mlp_out (after Gemma's post-MLP norm) is not.")
    t = read_safetensors(folder / "sae.safetensors")
    _require(t, ("encoder.weight", "W_dec"), folder / "sae.safetensors", "sparsify")
    W_enc = t["encoder.weight"]
    d_tc, d_model = W_enc.shape
    if d_model != cfg.get("d_in", d_model):
        raise ValueError(f"{folder}: encoder.weight is {tuple(W_enc.shape)} but cfg.json says d_in={cfg['d_in']}.")
    b_enc = t.get("encoder.bias", torch.zeros(d_tc))
    b_dec = t.get("b_dec", torch.zeros(t["W_dec"].shape[1]))
    skip = t.get("W_skip")
    transcoder = SingleLayerTranscoder(
        _cast(W_enc, device, dtype), _cast(t["W_dec"], device, dtype), _cast(b_enc, device, dtype),
        _cast(b_dec, device, dtype), activation="topk", k=int(cfg["k"]),
        W_skip=None if skip is None else _cast(skip, device, dtype), relu_first=True)  # x @ W_skip.mT: [out, in]
    return int(match.group(1)), transcoder
