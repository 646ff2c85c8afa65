"""saprmarks/dictionary_learning: `config.json` ({"trainer": {dict_class, activation_dim, dict_size, k, layer,
lm_name, submodule_name, ...}, "buffer": {ctx_len, ...}}) + `ae.pt` (a state dict, read with
`torch.load(weights_only=True)`: tensors only, never arbitrary pickled objects).

Each dictionary class maps to the SAELens architecture whose math is the class's own `encode`/`decode`:

| dict_class | keys in ae.pt | architecture | subtracts b_dec |
|---|---|---|---|
| AutoEncoder | encoder.weight/bias, decoder.weight, bias | standard | yes (`encoder(x - bias)`) |
| AutoEncoderNew | encoder.weight/bias, decoder.weight/bias | standard | no |
| GatedAutoEncoder | encoder.weight, decoder.weight, decoder_bias, r_mag, gate_bias, mag_bias | gated | yes |
| AutoEncoderTopK | encoder.weight/bias, decoder.weight, b_dec, k, threshold | topk (trainer.k) | yes |
| BatchTopKSAE | encoder.weight/bias, decoder.weight, b_dec, k, threshold | jumprelu, θ = scalar threshold | yes |
| MatryoshkaBatchTopKSAE | W_enc, b_enc, W_dec, b_dec, k, threshold, group_sizes | jumprelu, θ = scalar threshold | yes |
| JumpReluAutoEncoder | W_enc, b_enc, W_dec, b_dec, threshold[d_sae] | jumprelu | no |

The (Matryoshka) BatchTopK classes encode with their learned inference threshold by default
(`relu(z) * (relu(z) > threshold)`), which is JumpReLU with θ broadcast; AutoEncoderTopK encodes with a per-token
top-k by default (its `threshold` buffer is ignored, as it is unless `use_threshold=True`). Weights are loaded as
saved: dictionary_learning's own `AutoEncoder.from_pretrained` additionally renormalises decoder columns to unit
norm (rescaling features, not reconstructions); SAELens and nnsae do not (`fold_W_dec_norm=True` does the same).
With `normalize_activations`, dictionary_learning rescales the biases at save time, so the saved SAE already takes
raw activations.

Hook: `blocks.{layer}.hook_resid_post` (what SAELens assumes), or `hook_mlp_out` / `hook_attn_out` when the
trainer's `submodule_name` names an MLP or attention output. `model_name` is the last part of `lm_name`, the dataset
`monology/pile-uncopyrighted` and the context size `buffer.ctx_len`, as in SAELens' `dictionary_learning_1` loader.
"""

from __future__ import annotations

import pickle
from pathlib import Path, PurePosixPath

import torch

from nnsae.config import SAELENS_FORMAT_VERSION
from nnsae.io.files import read_json, require

NAME = "dictionary_learning"
CONFIG, WEIGHTS = "config.json", "ae.pt"

# dict_class → (architecture, apply_b_dec_to_input, {SAELens key: (ae.pt key, transpose)})
_LINEAR = {"W_enc": ("encoder.weight", True), "W_dec": ("decoder.weight", True), "b_enc": ("encoder.bias", False)}
_PARAMS = {"W_enc": ("W_enc", False), "W_dec": ("W_dec", False), "b_enc": ("b_enc", False), "b_dec": ("b_dec", False)}
CLASSES: dict[str, tuple[str, bool, dict[str, tuple[str, bool]]]] = {
    "AutoEncoder": ("standard", True, {**_LINEAR, "b_dec": ("bias", False)}),
    "AutoEncoderNew": ("standard", False, {**_LINEAR, "b_dec": ("decoder.bias", False)}),
    "GatedAutoEncoder": ("gated", True, {"W_enc": ("encoder.weight", True), "W_dec": ("decoder.weight", True),
                                         "b_dec": ("decoder_bias", False), "r_mag": ("r_mag", False),
                                         "b_gate": ("gate_bias", False), "b_mag": ("mag_bias", False)}),
    "AutoEncoderTopK": ("topk", True, {**_LINEAR, "b_dec": ("b_dec", False)}),
    "BatchTopKSAE": ("jumprelu", True, {**_LINEAR, "b_dec": ("b_dec", False), "threshold": ("threshold", False)}),
    "MatryoshkaBatchTopKSAE": ("jumprelu", True, {**_PARAMS, "threshold": ("threshold", False)}),
    "JumpReluAutoEncoder": ("jumprelu", False, {**_PARAMS, "threshold": ("threshold", False)}),
}


def files(path_in_repo: str) -> tuple[list[str], list[str]]:
    return [_join(path_in_repo, CONFIG), _join(path_in_repo, WEIGHTS)], []


def detect(directory: Path) -> bool:
    if not ((directory / WEIGHTS).is_file() and (directory / CONFIG).is_file()):
        return False
    try:
        return isinstance(read_json(directory / CONFIG).get("trainer"), dict)
    except ValueError:
        return False


def load(directory: Path, *, sae_id: str | None = None, repo_id: str | None = None
         ) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor | None]:
    directory = Path(directory)
    config = read_json(require(directory / CONFIG))
    trainer, buffer = config.get("trainer"), config.get("buffer") or {}
    if not isinstance(trainer, dict) or "dict_class" not in trainer:
        raise ValueError(f"{directory / CONFIG} is not a dictionary_learning config: it has no trainer.dict_class.")
    dict_class = trainer["dict_class"]
    if dict_class not in CLASSES:
        raise NotImplementedError(f"{directory}: dictionary class {dict_class!r} is not supported; supported: "
                                  f"{sorted(CLASSES)}.")
    architecture, apply_b_dec, keys = CLASSES[dict_class]
    raw = read_ae(require(directory / WEIGHTS))
    missing = sorted(key for key, _ in keys.values() if key not in raw)
    if missing:
        raise ValueError(f"{directory / WEIGHTS} does not hold a {dict_class}: it lacks {missing}.")
    state_dict = {name: (raw[key].T if transpose else raw[key]).float().contiguous()
                  for name, (key, transpose) in keys.items()}
    d_in, d_sae = state_dict["W_enc"].shape
    extra: dict = {}
    if architecture == "jumprelu" and state_dict["threshold"].ndim == 0:
        state_dict["threshold"] = torch.full((d_sae,), float(state_dict["threshold"]))
    if architecture == "topk":
        k = trainer.get("k", int(raw["k"]) if "k" in raw else None)
        if k is None:
            raise ValueError(f"{directory}: an AutoEncoderTopK needs k (in ae.pt or trainer.k).")
        if "k" in raw and int(raw["k"]) != int(k):
            raise ValueError(f"{directory}: trainer.k={k} in {CONFIG} but k={int(raw['k'])} in {WEIGHTS}.")
        extra = {"k": int(k), "rescale_acts_by_decoder_norm": False}

    layer = trainer.get("layer")
    lm_name = trainer.get("lm_name")
    metadata = {
        "model_name": lm_name.split("/")[-1] if lm_name else None,
        "hook_name": _hook_name(layer, trainer.get("submodule_name")), "hook_head_index": None,
        "prepend_bos": True, "dataset_path": "monology/pile-uncopyrighted", "context_size": buffer.get("ctx_len"),
        "neuronpedia_id": None,
    }
    cfg = {
        "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None, **metadata},
        **extra, "architecture": architecture,
    }
    return cfg, state_dict, None


def read_ae(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `ae.pt`, unpickled with `weights_only=True` (tensors and plain containers only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} could not be read as a tensors-only state dict ({e}).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors.")
    return state


def _hook_name(layer: int | None, submodule_name: str | None) -> str | None:
    if layer is None or layer == "":
        return None
    site = (submodule_name or "").lower()
    if "mlp" in site:
        return f"blocks.{layer}.hook_mlp_out"
    if "attn" in site or "attention" in site:
        return f"blocks.{layer}.hook_attn_out"
    return f"blocks.{layer}.hook_resid_post"


def _join(path_in_repo: str, name: str) -> str:
    path_in_repo = path_in_repo.strip("/")
    return str(PurePosixPath(path_in_repo) / name) if path_in_repo else name
