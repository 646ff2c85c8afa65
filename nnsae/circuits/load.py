"""Transcoder files: circuit-tracer's `transcoder_set` and `cross_layer_transcoder` directories, directories of
per-layer transcoder folders (SAELens layout, Gemma Scope `params.npz`, Gemma Scope 2 `params.safetensors`, sparsify
`transcode` folders), and Gemma Scope 2 cross-layer transcoders (`layer_{i}.safetensors`). Every file name comes
from inside the given directory (or is an `hf://` URI a config.yaml lists).

`transcoder_set`: `config.yaml` (`model_kind: transcoder_set`, `feature_input_hook`, `feature_output_hook`,
optional `scan`, `activation` (relu/topk, else JumpReLU when a threshold is stored), `k`, `transcoders` (file
paths or `hf://org/repo/path?revision=R` URIs; `.npz` files are read as Gemma Scope's, safetensors with lower-case
`w_enc` as Gemma Scope 2's)) and `layer_{L}.safetensors` with `W_enc` [d_tc, d_model], `W_dec` [d_tc, d_model],
`b_enc`, `b_dec`, optional `activation_function.threshold`, `W_skip` [d_model, d_model].
`cross_layer_transcoder`: `config.yaml` and per layer i `W_enc_{i}.safetensors` (`W_enc_i`, `b_enc_i`, `b_dec_i`,
optional `threshold_i`) and `W_dec_{i}.safetensors` (`W_dec_i` [d_tc, n_layers - i, d_model]), or a `transcoders`
list of Gemma Scope 2 CLT files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from nnsae.circuits import foreign
from nnsae.circuits.transcoders import CrossLayerTranscoder, SingleLayerTranscoder, TranscoderSet, _from_sae
from nnsae.io.files import read_json

__all__ = ["convert_to_circuit_tracer", "load_transcoders", "save_transcoders"]

_TL_LAYER_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")


def load_transcoders(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     scan: str | list[str] | None = None, revision: str | None = None, variant: str | None = None
                     ) -> TranscoderSet | CrossLayerTranscoder:
    """A per-layer `TranscoderSet` or a `CrossLayerTranscoder` from `path`, its format detected from the files.

    `path` is a local directory or a Hugging Face repo id (optionally `repo_id//subfolder`, downloaded; `revision`
    pins it) holding one of:
    - a circuit-tracer `transcoder_set` or `cross_layer_transcoder` directory (its config.yaml says which);
    - Gemma Scope 2 cross-layer transcoder files `layer_0.safetensors .. layer_N.safetensors`;
    - per-layer transcoder folders, at any depth: SAELens layout (cfg.json + sae_weights.safetensors), Gemma Scope
      (`params.npz`), Gemma Scope 2 (`params.safetensors` + config.json), sparsify (`cfg.json` with
      `transcode: true` + sae.safetensors), exactly one per layer 0..N once `variant` (a substring of the folder's
      path, e.g. ``"width_16k_l0_small"``) has picked among several.
    Each set knows its read/write points (`feature_input_hook` / `feature_output_hook`, TransformerLens names that
    nnsae's hook resolver places in the HF model)."""
    directory = Path(path)
    if not directory.is_dir():
        directory = _download(str(path), revision, variant)
        if scan is None:
            scan = str(path) if revision is None else f"{path}@{revision}"
    config_file = directory / "config.yaml"
    if config_file.is_file():
        config = yaml.safe_load(config_file.read_text()) or {}
        kind = config.get("model_kind")
        scan = scan if scan is not None else config.get("scan")
        if kind == "transcoder_set":
            return _load_set(directory, config, device, dtype, scan)
        if kind == "cross_layer_transcoder":
            return _load_clt(directory, config, device, dtype, scan)
        raise ValueError(f"{config_file}: model_kind {kind!r} is not 'transcoder_set' or 'cross_layer_transcoder'.")
    clt_files = _layer_files(directory)
    if clt_files and all(foreign.is_gemma_scope_2_clt_file(f) for f in clt_files):
        return foreign.gemma_scope_2_clt(clt_files, device, dtype, scan=scan)
    candidates = _per_layer_folders(directory, variant)
    if candidates:
        return _load_per_layer(directory, candidates, device, dtype, scan, variant)
    raise ValueError(
        f"{directory} is not a transcoder directory: expected a config.yaml (circuit-tracer transcoder_set or "
        "cross_layer_transcoder), Gemma Scope 2 CLT files layer_i.safetensors, or per-layer transcoder folders "
        "(SAELens cfg.json + sae_weights.safetensors, Gemma Scope params.npz, Gemma Scope 2 params.safetensors, "
        f"sparsify cfg.json + sae.safetensors){f' whose path contains {variant!r}' if variant else ''}."
    )


def _download(repo: str, revision: str | None, variant: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    repo_id, _, subfolder = repo.partition("//")
    prefix = f"{subfolder}/" if subfolder else ""
    patterns = [f"{prefix}*{variant}*", f"{prefix}config.yaml"] if variant else [f"{prefix}*"]
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as error:
        raise FileNotFoundError(
            f"{repo!r} is not a local directory and could not be downloaded from the Hugging Face Hub ({error})."
        ) from error
    return _inside(root, subfolder) if subfolder else root


def _hf_file(uri: str) -> Path:
    """The local copy of an `hf://org/repo/path/in/repo?revision=R` file (circuit-tracer's URIs)."""
    from urllib.parse import parse_qs, urlparse

    from huggingface_hub import hf_hub_download

    parsed = urlparse(uri)
    repo_name, _, file_path = parsed.path.lstrip("/").partition("/")
    if not parsed.netloc or not repo_name or not file_path:
        raise ValueError(f"{uri!r} is not an hf://org/repo/path URI.")
    revision = parse_qs(parsed.query).get("revision", [None])[0]
    return Path(hf_hub_download(f"{parsed.netloc}/{repo_name}", file_path, revision=revision))


def _layer_files(directory: Path) -> list[Path]:
    """`layer_0.safetensors .. layer_N.safetensors` directly in `directory` (all of them), or []."""
    indices = sorted(int(m.group(1)) for p in directory.iterdir()
                     if (m := re.fullmatch(r"layer_(\d+)\.safetensors", p.name)))
    if not indices or indices != list(range(len(indices))):
        return []
    return [directory / f"layer_{i}.safetensors" for i in indices]


# Marker files of per-layer folders: (format, files that must all be there).
_FOLDER_FORMATS = (("sparsify", ("cfg.json", "sae.safetensors")), ("saelens", ("cfg.json", "sae_weights.safetensors")),
                   ("gemma_scope", ("params.npz",)), ("gemma_scope_2", ("params.safetensors",)))


def _per_layer_folders(directory: Path, variant: str | None) -> list[tuple[str, Path]]:
    """(format, folder) of every per-layer transcoder folder under `directory` whose relative path contains
    `variant` (when given)."""
    found: dict[Path, str] = {}
    for name, markers in _FOLDER_FORMATS:
        for marker in directory.rglob(markers[0]):
            folder = marker.parent
            if folder in found or not all((folder / m).is_file() for m in markers):
                continue
            parts = folder.relative_to(directory).parts
            # Training intermediates (`checkpoints/`) and hidden / temporary folders are not the run's transcoders.
            if any(part == "checkpoints" or part.startswith(".") for part in parts):
                continue
            if variant is None or variant in "/".join(parts):
                found[folder] = name
    # A folder inside another transcoder's folder is not a layer of the set.
    kept = [(name, folder) for folder, name in found.items() if not any(p in found for p in folder.parents)]
    return sorted(kept, key=lambda item: str(item[1]))


def _inside(root: Path, name: str) -> Path:
    """`root / name`, refusing names that leave `root` (absolute paths, '..', links pointing out)."""
    candidate = (root / name).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise ValueError(f"File name {name!r} points outside {root}; transcoder files must live inside it.")
    return candidate


def _tensors(file: Path, device: str | torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"Missing transcoder file {file}.")
    with safe_open(str(file), framework="pt", device=str(device)) as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return {key: t.to(dtype) if t.is_floating_point() else t for key, t in tensors.items()}


def _hooks(config: dict[str, Any], file: str) -> tuple[str, str]:
    try:
        return config["feature_input_hook"], config["feature_output_hook"]
    except KeyError as missing:
        raise ValueError(f"{file}: config.yaml needs {missing.args[0]!r} (a TransformerLens hook name).") from None


def _load_set(directory: Path, config: dict[str, Any], device: str | torch.device, dtype: torch.dtype,
              scan: Any) -> TranscoderSet:
    input_hook, output_hook = _hooks(config, str(directory))
    if "transcoders" in config:
        files = _listed_files(directory, config)
    else:
        indices = sorted(int(m.group(1)) for p in directory.iterdir()
                         if (m := re.fullmatch(r"layer_(\d+)\.safetensors", p.name)))
        if indices != list(range(len(indices))) or not indices:
            raise ValueError(
                f"{directory}: expected layer_0.safetensors .. layer_N.safetensors, found layers {indices}.")
        files = [directory / f"layer_{i}.safetensors" for i in indices]
    activation = config.get("activation")
    transcoders = []
    for file in files:
        if file.suffix == ".npz":  # circuit-tracer reads listed .npz files as Gemma Scope's
            transcoders.append(foreign.gemma_scope_transcoder(file, device, dtype))
            continue
        if file.suffix != ".safetensors":
            raise ValueError(f"{file.name}: only .safetensors (and Gemma Scope .npz) transcoder files are read.")
        t = _tensors(file, device, dtype)
        if "w_enc" in t:  # Gemma Scope 2's names
            transcoders.append(foreign.gemma_scope_2_transcoder(file, device, dtype))
            continue
        threshold = t.get("activation_function.threshold")
        if activation == "topk":
            kind, k = "topk", config.get("k", int(t["k"]) if "k" in t else None)
        elif activation in (None, "jumprelu", "jump_relu"):
            kind, k = ("jumprelu" if threshold is not None else "relu"), None
        elif activation == "relu":
            kind, k = "relu", None
        else:
            raise ValueError(f"config.yaml: unknown activation {activation!r} (relu, topk, or JumpReLU by threshold).")
        transcoders.append(SingleLayerTranscoder(
            t["W_enc"], t["W_dec"], t["b_enc"], t["b_dec"], activation=kind,
            threshold=threshold if kind == "jumprelu" else None, k=k, W_skip=t.get("W_skip")))
    return TranscoderSet(transcoders, input_hook, output_hook, scan)


def _listed_files(directory: Path, config: dict[str, Any]) -> list[Path]:
    """The files config.yaml's `transcoders` lists: names inside `directory`, or hf:// URIs (downloaded)."""
    return [_hf_file(str(name)) if str(name).startswith("hf://") else _inside(directory, str(name))
            for name in config["transcoders"]]


def _load_clt(directory: Path, config: dict[str, Any], device: str | torch.device, dtype: torch.dtype,
              scan: Any) -> CrossLayerTranscoder:
    input_hook, output_hook = _hooks(config, str(directory))
    if "transcoders" in config:  # circuit-tracer lists Gemma Scope 2 CLT files this way
        return foreign.gemma_scope_2_clt(_listed_files(directory, config), device, dtype, input_hook, output_hook,
                                         scan)
    indices = sorted(int(m.group(1)) for p in directory.iterdir()
                     if (m := re.fullmatch(r"W_enc_(\d+)\.safetensors", p.name)))
    if indices != list(range(len(indices))) or not indices:
        raise ValueError(f"{directory}: expected W_enc_0.safetensors .. W_enc_N.safetensors, found layers {indices}.")
    W_enc, b_enc, b_dec, thresholds, W_dec = [], [], [], [], []
    for i in indices:
        enc = _tensors(directory / f"W_enc_{i}.safetensors", device, dtype)
        W_enc.append(enc[f"W_enc_{i}"])
        b_enc.append(enc[f"b_enc_{i}"])
        b_dec.append(enc[f"b_dec_{i}"])
        if f"threshold_{i}" in enc:
            thresholds.append(enc[f"threshold_{i}"].reshape(-1))
        W_dec.append(_tensors(directory / f"W_dec_{i}.safetensors", device, dtype)[f"W_dec_{i}"])
    if thresholds and len(thresholds) != len(indices):
        raise ValueError(f"{directory}: threshold_i is stored for some layers only.")
    activation = "jumprelu" if thresholds else config.get("activation", "relu")
    return CrossLayerTranscoder(
        torch.stack(W_enc), W_dec, torch.stack(b_enc), torch.stack(b_dec), activation=activation,
        threshold=torch.stack(thresholds) if thresholds else None, k=config.get("k"),
        feature_input_hook=input_hook, feature_output_hook=output_hook, scan=scan)


def _layer_and_hook(metadata: Any, folder: Path) -> tuple[int, str, str]:
    """(layer, TL input hook, TL output hook) of a SAELens transcoder from its metadata."""
    name, name_out = metadata.hook_name, metadata.hook_name_out
    match, match_out = (_TL_LAYER_HOOK.fullmatch(name or ""), _TL_LAYER_HOOK.fullmatch(name_out or ""))
    if match is None or match_out is None or match.group(1) != match_out.group(1):
        raise ValueError(
            f"{folder}: a transcoder in a set needs TransformerLens hook_name and hook_name_out of one layer "
            f"(blocks.L.…), got {name!r} and {name_out!r}."
        )
    return int(match.group(1)), match.group(2), match_out.group(2)


def _load_per_layer(directory: Path, candidates: list[tuple[str, Path]], device: str | torch.device,
                    dtype: torch.dtype, scan: Any, variant: str | None) -> TranscoderSet:
    by_layer: dict[int, list[tuple[Path, SingleLayerTranscoder, tuple[str, str]]]] = {}
    for name, folder in candidates:
        layer, transcoder, hooks = _read_folder(name, folder, directory, device, dtype)
        by_layer.setdefault(layer, []).append((folder, transcoder, hooks))
    if variant:  # `variant` names a folder exactly when another one only extends it (`l0_small` / `l0_small_affine`)
        for layer, entries in by_layer.items():
            exact = [entry for entry in entries if entry[0].name.endswith(variant)]
            if len(entries) > 1 and len(exact) == 1:
                by_layer[layer] = exact
    ambiguous = {layer: [f.relative_to(directory).as_posix() for f, _, _ in entries]
                 for layer, entries in by_layer.items() if len(entries) > 1}
    if ambiguous:
        layer, folders = min(ambiguous.items())
        raise ValueError(
            f"{directory} holds {len(folders)} transcoders for layer {layer} ({folders[:6]}"
            f"{' ...' if len(folders) > 6 else ''}){f' matching variant={variant!r}' if variant else ''}: pass "
            "variant= (a substring of one folder path per layer), or list the files in a circuit-tracer config.yaml.")
    if sorted(by_layer) != list(range(len(by_layer))):
        raise ValueError(f"{directory}: a transcoder set needs layers 0..N, found layers {sorted(by_layer)}.")
    hooks = {entries[0][2] for entries in by_layer.values()}
    if len(hooks) != 1:
        raise ValueError(f"The transcoders of a set must read and write the same hooks, got {sorted(hooks)}.")
    (input_hook, output_hook), = hooks
    return TranscoderSet({layer: entries[0][1] for layer, entries in by_layer.items()}, input_hook, output_hook, scan)


def _read_folder(name: str, folder: Path, directory: Path, device: str | torch.device, dtype: torch.dtype
                 ) -> tuple[int, SingleLayerTranscoder, tuple[str, str]]:
    """(layer, transcoder, (TL input hook, TL output hook)) of one per-layer folder."""
    if name == "sparsify":
        layer, transcoder = foreign.sparsify_transcoder(folder, device, dtype)
        return layer, transcoder, foreign.SPARSIFY_HOOKS
    if name == "saelens":
        from nnsae.architectures import SAE

        sae = SAE.load_from_disk(folder, device=device, dtype=dtype, format="saelens")
        layer, input_hook, output_hook = _layer_and_hook(sae.cfg.metadata, folder)
        return layer, _from_sae(sae), (input_hook, output_hook)
    layer = foreign.layer_of(folder.relative_to(directory).as_posix()) if folder != directory else None
    if name == "gemma_scope":
        if layer is None:
            raise ValueError(f"{folder}: a Gemma Scope transcoder's layer comes from its path (layer_N/...); "
                             "this one names none.")
        return layer, foreign.gemma_scope_transcoder(folder / "params.npz", device, dtype), foreign.GEMMA_SCOPE_HOOKS
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    hf_in = str(config.get("hf_hook_point_in") or "")
    kind = config.get("type") or ("transcoder" if "transcoder" in folder.as_posix() else None)
    if kind != "transcoder" and not hf_in.endswith("pre_feedforward_layernorm.output"):
        raise ValueError(f"{folder}: this Gemma Scope 2 file is not a per-layer transcoder (config type {kind!r}, "
                         f"input {hf_in!r}).")
    match = re.search(r"layers\.(\d+)\.", hf_in)
    layer = int(match.group(1)) if match else layer
    if layer is None:
        raise ValueError(f"{folder}: no layer in config.json's hf_hook_point_in nor in the folder name (layer_N).")
    return layer, foreign.gemma_scope_2_transcoder(folder / "params.safetensors", device, dtype), \
        foreign.GEMMA_SCOPE_2_HOOKS


def convert_to_circuit_tracer(src: str | Path, dst: str | Path, dtype: str | torch.dtype | None = None) -> str:
    """Every layer's transcoder under `src` (a training run of per-layer transcoders in SAELens layout, or anything
    `load_transcoders` reads) written as one circuit-tracer directory at `dst`; returns a one-line summary."""
    from nnsae.config import parse_dtype

    transcoders = load_transcoders(src, dtype=parse_dtype(dtype) if dtype else torch.float32)
    out = save_transcoders(transcoders, dst)
    kind = "cross_layer_transcoder" if isinstance(transcoders, CrossLayerTranscoder) else "transcoder_set"
    return (f"Wrote a circuit-tracer {kind} ({transcoders.n_layers} layers, d_transcoder {transcoders.d_transcoder}, "
            f"{transcoders.feature_input_hook} -> {transcoders.feature_output_hook}) to {out}")


def save_transcoders(transcoders: TranscoderSet | CrossLayerTranscoder, path: str | Path) -> Path:
    """Write `transcoders` as a circuit-tracer `transcoder_set` or `cross_layer_transcoder` directory."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"feature_input_hook": transcoders.feature_input_hook,
                              "feature_output_hook": transcoders.feature_output_hook}
    if transcoders.scan is not None:
        config["scan"] = transcoders.scan

    def plain(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().contiguous()

    if isinstance(transcoders, CrossLayerTranscoder):
        config["model_kind"] = "cross_layer_transcoder"
        if transcoders.activation == "topk":
            config.update(activation="topk", k=transcoders.k)
        for i in range(transcoders.n_layers):
            enc = {f"W_enc_{i}": plain(transcoders.W_enc[i]), f"b_enc_{i}": plain(transcoders.b_enc[i]),
                   f"b_dec_{i}": plain(transcoders.b_dec[i])}
            if transcoders.threshold is not None:
                enc[f"threshold_{i}"] = plain(transcoders.threshold[i])
            save_file(enc, str(directory / f"W_enc_{i}.safetensors"))
            save_file({f"W_dec_{i}": plain(transcoders.W_dec[i])}, str(directory / f"W_dec_{i}.safetensors"))
    else:
        config["model_kind"] = "transcoder_set"
        kinds = {(t.activation, t.k) for t in transcoders}
        if len(kinds) != 1:
            raise ValueError(f"circuit-tracer's transcoder_set has one activation for all layers, got {sorted(kinds)}.")
        (activation, k), = kinds
        if activation == "topk":
            config.update(activation="topk", k=k)
        elif activation == "relu":
            config["activation"] = "relu"
        for i, t in enumerate(transcoders):
            if t.relu_first and t.activation != "relu" and (t.activation == "topk" or bool((t.threshold < 0).any())):
                raise ValueError(
                    f"Layer {i}: this transcoder applies a ReLU circuit-tracer's {t.activation} does not "
                    "(negative thresholds or TopK values would differ); it cannot be exported exactly."
                )
            tensors = {"W_enc": plain(t.W_enc), "W_dec": plain(t.W_dec), "b_enc": plain(t.b_enc),
                       "b_dec": plain(t.b_dec)}
            if t.threshold is not None:
                tensors["activation_function.threshold"] = plain(t.threshold)
            if t.W_skip is not None:
                tensors["W_skip"] = plain(t.W_skip)
            save_file(tensors, str(directory / f"layer_{i}.safetensors"))
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return directory
