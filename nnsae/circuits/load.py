"""Transcoder files: circuit-tracer's `transcoder_set` and `cross_layer_transcoder` directories, and directories of
SAELens-layout transcoder folders. safetensors only; every file name comes from inside the given directory.

`transcoder_set`: `config.yaml` (`model_kind: transcoder_set`, `feature_input_hook`, `feature_output_hook`,
optional `scan`, `activation` (relu/topk, else JumpReLU when a threshold is stored), `k`, `transcoders` (file
paths)) and `layer_{L}.safetensors` with `W_enc` [d_tc, d_model], `W_dec` [d_tc, d_model], `b_enc`, `b_dec`,
optional `activation_function.threshold`, `W_skip` [d_model, d_model].
`cross_layer_transcoder`: `config.yaml` and per layer i `W_enc_{i}.safetensors` (`W_enc_i`, `b_enc_i`, `b_dec_i`,
optional `threshold_i`) and `W_dec_{i}.safetensors` (`W_dec_i` [d_tc, n_layers - i, d_model]).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from nnsae.circuits.transcoders import CrossLayerTranscoder, SingleLayerTranscoder, TranscoderSet

__all__ = ["load_transcoders", "save_transcoders"]

_TL_LAYER_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"layers?\.(\d+)\.|\.h\.(\d+)\.")


def load_transcoders(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     scan: str | list[str] | None = None, revision: str | None = None
                     ) -> TranscoderSet | CrossLayerTranscoder:
    """A per-layer `TranscoderSet` or a `CrossLayerTranscoder` from `path`: a circuit-tracer `transcoder_set` or
    `cross_layer_transcoder` directory (its config.yaml says which), or a directory whose subfolders are SAELens
    transcoders (cfg.json + sae_weights.safetensors, one per layer). A `path` that is not a local directory is
    taken as a Hugging Face repo id (optionally `repo_id//subfolder`) and downloaded."""
    directory = Path(path)
    if not directory.is_dir():
        directory = _download(str(path), revision)
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
    folders = sorted(p for p in directory.iterdir() if (p / "cfg.json").is_file())
    if folders:
        return _load_saelens(folders, device, dtype, scan)
    raise ValueError(
        f"{directory} is not a transcoder directory: expected a config.yaml (circuit-tracer transcoder_set or "
        "cross_layer_transcoder) or subfolders with cfg.json (SAELens transcoders, one per layer)."
    )


def _download(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    repo_id, _, subfolder = repo.partition("//")
    try:
        root = Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=[f"{subfolder}/*" if subfolder else "*"]))
    except Exception as error:
        raise FileNotFoundError(
            f"{repo!r} is not a local directory and could not be downloaded from the Hugging Face Hub ({error})."
        ) from error
    return _inside(root, subfolder) if subfolder else root


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
        names = list(config["transcoders"])
        if any(str(name).startswith("hf://") for name in names):
            raise ValueError("config.yaml lists hf:// transcoder files; download them and list local file names.")
        files = [_inside(directory, str(name)) for name in names]
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
        if file.suffix != ".safetensors":
            raise ValueError(f"{file.name}: only .safetensors transcoder files are read.")
        t = _tensors(file, device, dtype)
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


def _load_clt(directory: Path, config: dict[str, Any], device: str | torch.device, dtype: torch.dtype,
              scan: Any) -> CrossLayerTranscoder:
    input_hook, output_hook = _hooks(config, str(directory))
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


def _load_saelens(folders: list[Path], device: str | torch.device, dtype: torch.dtype, scan: Any) -> TranscoderSet:
    from nnsae.architectures import SAE

    saes, hooks = {}, set()
    for folder in folders:
        sae = SAE.load_from_disk(folder, device=device, dtype=dtype)
        layer, input_hook, output_hook = _layer_and_hook(sae.cfg.metadata, folder)
        if layer in saes:
            raise ValueError(f"Two transcoders for layer {layer} in {folder.parent}.")
        saes[layer] = sae
        hooks.add((input_hook, output_hook))
    if len(hooks) != 1:
        raise ValueError(f"The transcoders of a set must read and write the same hooks, got {sorted(hooks)}.")
    (input_hook, output_hook), = hooks
    return TranscoderSet.from_saes(saes, input_hook, output_hook, scan)


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
