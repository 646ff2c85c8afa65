"""Foreign SAE formats: each test writes a directory in the peer's exact layout (random weights), loads it with
`SAE.load_from_disk(dir, format=NAME)` and with auto-detection, and checks encode/decode against the peer's own math
computed here directly from the raw arrays, plus the config fields SAELens would produce."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nnsae import SAE
from nnsae.io.formats import FORMAT_NAMES, detect_format, load_directory
from nnsae.io.formats import dictionary_learning, gemma_scope, gemma_scope_2, llama_scope, sparsify

D_IN, D_SAE, N = 16, 48, 7
ATOL = 1e-5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)) * scale


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=1e-5)


def _load_both(directory: Path, name: str) -> SAE:
    """Load with the explicit format and with auto-detection; both must give the same SAE."""
    assert detect_format(directory) == name
    sae = SAE.load_from_disk(directory, format=name)
    auto = SAE.load_from_disk(directory)
    assert auto.cfg.to_dict() == sae.cfg.to_dict()
    for key, value in sae.state_dict().items():
        assert torch.equal(value, auto.state_dict()[key]), key
    return sae


def _jumprelu(z: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.relu(z) * (z > threshold)


def _dense_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    top = values.topk(k, dim=-1)
    return torch.zeros_like(values).scatter_(-1, top.indices, top.values)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------------------------
# Gemma Scope 1: params.npz, everything else in the repository / folder names
# ---------------------------------------------------------------------------------------------------------------

def _gemma_scope_params(d_in: int = D_IN, d_out: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    d_out = d_out or d_in
    return {
        "w_enc": _randn(d_in, D_SAE, seed=seed).numpy(),
        "w_dec": _randn(D_SAE, d_out, seed=seed + 1, scale=0.2).numpy(),
        "b_enc": _randn(D_SAE, seed=seed + 2, scale=0.3).numpy(),
        "b_dec": _randn(d_out, seed=seed + 3).numpy(),
        "threshold": torch.rand(D_SAE, generator=_gen(seed + 4)).numpy(),
    }


def _write_gemma_scope(directory: Path, params: dict[str, np.ndarray]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "params.npz", **params)
    return directory


def _gemma_expected(params: dict[str, np.ndarray], x: torch.Tensor, enc_scale: float = 1.0, dec_scale: float = 1.0):
    p = {k: torch.from_numpy(v) for k, v in params.items()}
    z = x @ (p["w_enc"] * enc_scale) + p["b_enc"]
    f = _jumprelu(z, p["threshold"])
    return f, f @ (p["w_dec"] * dec_scale) + p["b_dec"]


def test_gemma_scope_res_from_repo_name_in_path(tmp_path):
    params = _gemma_scope_params()
    directory = _write_gemma_scope(tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82",
                                   params)
    sae = _load_both(directory, "gemma_scope")
    x = _randn(N, D_IN, seed=10)
    f, recons = _gemma_expected(params, x)
    assert (f > 0).any() and (f == 0).any()
    _close(sae.encode(x), f)
    _close(sae.decode(f), recons)
    _close(sae(x), recons)
    assert sae.cfg.to_dict() == {
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": None, "model_name": "gemma-2-2b",
                     "hook_name": "blocks.12.hook_resid_post", "hook_head_index": None, "prepend_bos": True,
                     "dataset_path": "monology/pile-uncopyrighted", "context_size": 1024, "neuronpedia_id": None},
        "architecture": "jumprelu",
    }


def test_gemma_scope_mlp_from_hf_cache_path(tmp_path):
    params = _gemma_scope_params(seed=20)
    directory = _write_gemma_scope(
        tmp_path / "models--google--gemma-scope-9b-it-mlp" / "snapshots" / "0123abcd" / "layer_3" / "width_131k"
        / "average_l0_50", params)
    sae = _load_both(directory, "gemma_scope")
    assert sae.cfg.metadata.model_name == "gemma-2-9b-it"
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_mlp_out"
    assert sae.cfg.metadata.hf_hook_name is None
    x = _randn(N, D_IN, seed=21)
    f, recons = _gemma_expected(params, x)
    _close(sae.encode(x), f)
    _close(sae(x), recons)


def test_gemma_scope_attention_reads_hook_z(tmp_path):
    n_heads, d_head = 4, 4
    params = _gemma_scope_params(d_in=n_heads * d_head, seed=30)
    directory = _write_gemma_scope(tmp_path / "gemma-scope-2b-pt-att" / "layer_5" / "width_16k" / "average_l0_9",
                                   params)
    sae = _load_both(directory, "gemma_scope")
    assert sae.cfg.reshape_activations == "hook_z"
    assert sae.cfg.metadata.hook_name == "blocks.5.attn.hook_z"
    z = _randn(N, n_heads, d_head, seed=31)
    f, recons = _gemma_expected(params, z.flatten(-2))  # head-major flatten
    _close(sae.encode(z), f)
    _close(sae(z), recons.unflatten(-1, (n_heads, d_head)))


def test_gemma_scope_embedding_is_rescaled(tmp_path):
    params = _gemma_scope_params(seed=40)
    directory = _write_gemma_scope(tmp_path / "gemma-scope-2b-pt-res" / "embedding" / "width_4k" / "average_l0_6",
                                   params)
    sae = _load_both(directory, "gemma_scope")
    assert sae.cfg.metadata.hook_name == "hook_embed"
    x = _randn(N, D_IN, seed=41, scale=4.0)
    f, recons = _gemma_expected(params, x, enc_scale=1 / math.sqrt(D_IN), dec_scale=math.sqrt(D_IN))
    _close(sae.encode(x), f)
    _close(sae(x), recons)


def test_gemma_scope_transcoder(tmp_path):
    params = _gemma_scope_params(seed=50)
    directory = _write_gemma_scope(
        tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_3" / "width_16k" / "average_l0_76", params)
    sae = _load_both(directory, "gemma_scope")
    assert sae.cfg.architecture == "jumprelu_transcoder"
    assert sae.cfg.d_out == D_IN and not sae.cfg.apply_b_dec_to_input
    assert sae.cfg.metadata.hook_name == "blocks.3.ln2.hook_normalized"
    assert sae.cfg.metadata.hook_name_out == "blocks.3.hook_mlp_out"
    x = _randn(N, D_IN, seed=51)
    f, recons = _gemma_expected(params, x)
    _close(sae.encode(x), f)
    _close(sae(x), recons)


def test_gemma_scope_without_names_uses_shapes(tmp_path):
    params = _gemma_scope_params(seed=60)
    directory = _write_gemma_scope(tmp_path / "my_sae", params)
    sae = _load_both(directory, "gemma_scope")
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.architecture) == (D_IN, D_SAE, "jumprelu")
    assert sae.cfg.metadata.model_name is None and sae.cfg.metadata.hook_name is None
    # Names given explicitly win over the (uninformative) path.
    cfg, _, _ = load_directory(directory, format="gemma_scope", repo_id="google/gemma-scope-27b-pt-res",
                               sae_id="layer_20/width_16k/average_l0_71")
    assert cfg["metadata"]["model_name"] == "gemma-2-27b"
    assert cfg["metadata"]["hook_name"] == "blocks.20.hook_resid_post"


def test_gemma_scope_threshold_is_strict(tmp_path):
    params = _gemma_scope_params(seed=70)
    params["b_enc"] = np.abs(params["b_enc"]) + 0.1
    params["threshold"][:10] = params["b_enc"][:10]  # x = 0 gives z = b_enc exactly: on the threshold, not above
    params["threshold"][10:] = 0.0
    sae = SAE.load_from_disk(_write_gemma_scope(tmp_path / "s", params))
    f = sae.encode(torch.zeros(1, D_IN))[0]
    assert (f[:10] == 0).all() and (f[10:] > 0).all()


def test_gemma_scope_npz_is_read_without_pickle(tmp_path):
    directory = tmp_path / "bad"
    directory.mkdir()
    np.savez(directory / "params.npz", w_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="params.npz"):
        gemma_scope.load(directory)


# ---------------------------------------------------------------------------------------------------------------
# Gemma Scope 2: config.json + params.safetensors
# ---------------------------------------------------------------------------------------------------------------

def _write_gemma_scope_2(directory: Path, config: dict | None, d_out: int = D_IN, affine: bool = False,
                         seed: int = 0) -> dict[str, torch.Tensor]:
    params = {
        "w_enc": _randn(D_IN, D_SAE, seed=seed),
        "w_dec": _randn(D_SAE, d_out, seed=seed + 1, scale=0.2),
        "b_enc": _randn(D_SAE, seed=seed + 2, scale=0.3),
        "b_dec": _randn(d_out, seed=seed + 3),
        "threshold": torch.rand(D_SAE, generator=_gen(seed + 4)),
    }
    if affine:
        params["affine_skip_connection"] = _randn(D_IN, d_out, seed=seed + 5, scale=0.1)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(params, directory / "params.safetensors")
    if config is not None:
        _write_json(directory / "config.json", config)
    return params


def _gs2_config(layer: int, hook_in: str, hook_out: str, kind: str = "sae", affine: bool = False) -> dict:
    return {"width": 16384, "model_name": "google/gemma-3-4b-pt", "architecture": "jump_relu", "l0": 150,
            "affine_connection": affine, "hf_hook_point_in": hook_in, "hf_hook_point_out": hook_out, "type": kind}


def test_gemma_scope_2_resid_post(tmp_path):
    directory = tmp_path / "resid_post" / "layer_7_width_16k_l0_big"
    config = _gs2_config(7, "model.layers.7.output", "model.layers.7.output")
    p = _write_gemma_scope_2(directory, config, seed=100)
    sae = _load_both(directory, "gemma_scope_2")
    x = _randn(N, D_IN, seed=101)
    f = _jumprelu(x @ p["w_enc"] + p["b_enc"], p["threshold"])
    _close(sae.encode(x), f)
    _close(sae(x), f @ p["w_dec"] + p["b_dec"])
    assert sae.cfg.to_dict() == {
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": None,
                     "model_name": "google/gemma-3-4b-pt", "hook_name": "blocks.7.hook_resid_post",
                     "hook_head_index": None, "prepend_bos": True, "dataset_path": "monology/pile-uncopyrighted",
                     "context_size": 1024, "neuronpedia_id": None, "hf_hook_name": "model.layers.7.output"},
        "architecture": "jumprelu",
    }


def test_gemma_scope_2_attention_without_config_is_inferred(tmp_path):
    # No config.json: SAELens infers it from the repository and folder names.
    directory = tmp_path / "gemma-scope-2-270m-pt" / "attn_out" / "layer_5_width_16k_l0_small"
    p = _write_gemma_scope_2(directory, None, seed=110)
    sae = _load_both(directory, "gemma_scope_2")
    assert sae.cfg.reshape_activations == "none"  # flat o_proj input, unlike Gemma Scope 1
    assert sae.cfg.metadata.hook_name == "blocks.5.attn.hook_z"
    assert sae.cfg.metadata.hf_hook_name == "model.layers.5.self_attn.o_proj.input"
    assert sae.cfg.metadata.model_name == "google/gemma-3-270m"
    x = _randn(N, D_IN, seed=111)
    f = _jumprelu(x @ p["w_enc"] + p["b_enc"], p["threshold"])
    _close(sae.encode(x), f)
    _close(sae(x), f @ p["w_dec"] + p["b_dec"])


def test_gemma_scope_2_mlp_kind_from_config_when_folder_is_renamed(tmp_path):
    directory = tmp_path / "renamed"
    _write_gemma_scope_2(directory, _gs2_config(9, "model.layers.9.post_feedforward_layernorm.output",
                                                "model.layers.9.post_feedforward_layernorm.output"), seed=115)
    sae = _load_both(directory, "gemma_scope_2")
    assert sae.cfg.metadata.hook_name == "blocks.9.hook_mlp_out"
    assert sae.cfg.metadata.hf_hook_name == "model.layers.9.post_feedforward_layernorm.output"


@pytest.mark.parametrize("affine", [False, True])
def test_gemma_scope_2_transcoder(tmp_path, affine):
    d_out = 12
    folder = "layer_17_width_16k_l0_big" + ("_affine" if affine else "")
    directory = tmp_path / "transcoder" / folder
    config = _gs2_config(17, "model.layers.17.pre_feedforward_layernorm.output",
                         "model.layers.17.post_feedforward_layernorm.output", "transcoder", affine)
    p = _write_gemma_scope_2(directory, config, d_out=d_out, affine=affine, seed=120)
    sae = _load_both(directory, "gemma_scope_2")
    assert sae.cfg.architecture == ("jumprelu_skip_transcoder" if affine else "jumprelu_transcoder")
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.d_out) == (D_IN, D_SAE, d_out)
    meta = sae.cfg.metadata
    assert (meta.hook_name, meta.hook_name_out) == ("blocks.17.hook_mlp_in", "blocks.17.hook_mlp_out")
    assert meta.hf_hook_name == "model.layers.17.pre_feedforward_layernorm.output"
    assert meta.hf_hook_name_out == "model.layers.17.post_feedforward_layernorm.output"
    x = _randn(N, D_IN, seed=121)
    f = _jumprelu(x @ p["w_enc"] + p["b_enc"], p["threshold"])
    expected = f @ p["w_dec"] + p["b_dec"]
    if affine:
        expected = expected + x @ p["affine_skip_connection"]
    _close(sae.encode(x), f)
    _close(sae(x), expected)


def test_gemma_scope_2_rejects_clt_and_other_architectures(tmp_path):
    clt = tmp_path / "clt" / "layer_3_width_16k"
    _write_gemma_scope_2(clt, _gs2_config(3, "a", "b", "clt"))
    with pytest.raises(NotImplementedError, match="clt"):
        SAE.load_from_disk(clt, format="gemma_scope_2")
    other = tmp_path / "resid_post" / "layer_3_width_16k_l0_big"
    _write_gemma_scope_2(other, {**_gs2_config(3, "model.layers.3.output", "x"), "architecture": "topk"})
    with pytest.raises(ValueError, match="jump_relu"):
        SAE.load_from_disk(other, format="gemma_scope_2")


# ---------------------------------------------------------------------------------------------------------------
# Llama Scope: hyperparams.json + checkpoints/final.safetensors
# ---------------------------------------------------------------------------------------------------------------

def _write_llama_scope(directory: Path, hook_in: str, hook_out: str, norm_in: float, norm_out: float,
                       d_out: int = D_IN, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    hp = {"device": "cuda:0", "seed": 42, "dtype": "torch.bfloat16", "hook_point_in": hook_in,
          "hook_point_out": hook_out, "expansion_factor": D_SAE // D_IN, "d_model": D_IN, "d_sae": D_SAE,
          "act_fn": "jumprelu", "jump_relu_threshold": 0.4, "norm_activation": "dataset-wise",
          "dataset_average_activation_norm": {"in": norm_in, "out": norm_out}, "use_decoder_bias": True,
          "apply_decoder_bias_to_pre_encoder": False, "sparsity_include_decoder_norm": True, "top_k": 50}
    weights = {
        "encoder.weight": _randn(D_SAE, D_IN, seed=seed, scale=0.5),
        "encoder.bias": _randn(D_SAE, seed=seed + 1, scale=0.3),
        "decoder.weight": _randn(d_out, D_SAE, seed=seed + 2, scale=0.2),
        "decoder.bias": _randn(d_out, seed=seed + 3),
    }
    _write_json(directory / "hyperparams.json", hp)
    (directory / "checkpoints").mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, directory / "checkpoints" / "final.safetensors")
    return hp, {k: v.to(torch.bfloat16).float() for k, v in weights.items()}


def test_llama_scope_sae(tmp_path):
    directory = tmp_path / "Llama3_1-8B-Base-L3R-8x"
    hp, w = _write_llama_scope(directory, "blocks.3.hook_resid_post", "blocks.3.hook_resid_post", 2.5, 2.5, seed=200)
    s = math.sqrt(D_IN) / 2.5
    assert llama_scope.norm_scaling_factor(directory) == pytest.approx(s)
    # The converter's output (as SAELens' loader gives it) takes the normalised activation x·s.
    cfg_dict, state_dict, _ = llama_scope.load(directory)
    raw = SAE.from_dict(cfg_dict, state_dict)
    cfg = raw.cfg
    assert (cfg.architecture, cfg.apply_b_dec_to_input, cfg.normalize_activations) == (
        "jumprelu", False, "expected_average_only_in")
    assert cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert cfg.metadata.model_name == "meta-llama/Llama-3.1-8B"
    assert cfg.metadata.hf_hook_name is None
    _close(raw.threshold, torch.full((D_SAE,), 0.4 * s))
    x = _randn(N, D_IN, seed=201, scale=0.7)
    z = (x * s) @ w["encoder.weight"].T + w["encoder.bias"]
    f = _jumprelu(z, torch.tensor(0.4 * s))
    assert (f > 0).any() and (f == 0).any()
    _close(raw.encode(x * s), f)
    _close(raw.decode(f), f @ w["decoder.weight"].T + w["decoder.bias"])
    # load_from_disk folds s (as SAELens' from_pretrained does with the YAML norm_scaling_factor): raw space in/out.
    sae = _load_both(directory, "llama_scope")
    assert sae.cfg.normalize_activations == "none"
    _close(sae.encode(x), f)
    _close(sae(x), (f @ w["decoder.weight"].T + w["decoder.bias"]) / s)


def test_llama_scope_transcoder_folds_both_norms(tmp_path):
    d_out = 12
    directory = tmp_path / "Llama3_1-8B-Base-L8TC-8x"
    _, w = _write_llama_scope(directory, "blocks.8.ln2.hook_normalized", "blocks.8.hook_mlp_out", 3.2, 0.5,
                              d_out=d_out, seed=210)
    sae = _load_both(directory, "llama_scope")
    s_in, s_out = math.sqrt(D_IN) / 3.2, math.sqrt(D_IN) / 0.5
    assert (sae.cfg.architecture, sae.cfg.d_out, sae.cfg.normalize_activations) == (
        "jumprelu_transcoder", d_out, "none")
    assert sae.cfg.metadata.hook_name == "blocks.8.ln2.hook_normalized"
    assert sae.cfg.metadata.hook_name_out == "blocks.8.hook_mlp_out"
    x = _randn(N, D_IN, seed=211, scale=4.0)
    z = (x * s_in) @ w["encoder.weight"].T + w["encoder.bias"]  # lm-saes: normalised input
    f = _jumprelu(z, torch.tensor(0.4 * s_in))
    y = (f @ w["decoder.weight"].T + w["decoder.bias"]) / s_out  # normalised output, back to raw scale
    _close(sae.encode(x), f)
    _close(sae(x), y)


# ---------------------------------------------------------------------------------------------------------------
# sparsify: <hookpoint>/cfg.json + sae.safetensors, run config.json one level up
# ---------------------------------------------------------------------------------------------------------------

def _write_sparsify(directory: Path, cfg: dict, run: dict | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    d_sae = cfg.get("num_latents") or cfg["d_in"] * cfg["expansion_factor"]
    weights = {
        "encoder.weight": _randn(d_sae, cfg["d_in"], seed=seed, scale=0.5),
        "encoder.bias": _randn(d_sae, seed=seed + 1, scale=0.3),
        "W_dec": _randn(d_sae, cfg["d_in"], seed=seed + 2, scale=0.2),
        "b_dec": _randn(cfg["d_in"], seed=seed + 3),
    }
    _write_json(directory / "cfg.json", cfg)
    save_file(weights, directory / "sae.safetensors")
    if run is not None:
        _write_json(directory.parent / "config.json", run)
    return weights


def _sparsify_cfg(**overrides) -> dict:
    return {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": D_SAE, "k": 5,
            "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN, **overrides}


def _sparsify_expected(w: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # sparsify: top-k of relu(encoder(x - b_dec)), decoded as sum of acts * W_dec rows + b_dec
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    f = _dense_topk(pre, k)
    return f, f @ w["W_dec"] + w["b_dec"]


def test_sparsify_residual_pythia(tmp_path):
    directory = tmp_path / "sae-pythia-70m-32k" / "layers.2"
    w = _write_sparsify(directory, _sparsify_cfg(), {"model": "EleutherAI/pythia-70m", "dataset": "pile",
                                                      "ctx_len": 512}, seed=300)
    sae = _load_both(directory, "sparsify")
    cfg = sae.cfg
    assert (cfg.architecture, cfg.k, cfg.apply_b_dec_to_input, cfg.rescale_acts_by_decoder_norm) == (
        "topk", 5, True, False)
    assert cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert cfg.metadata.hf_hook_name == "gpt_neox.layers.2"
    assert (cfg.metadata.model_name, cfg.metadata.dataset_path, cfg.metadata.context_size) == (
        "EleutherAI/pythia-70m", "pile", 512)
    x = _randn(N, D_IN, seed=301, scale=2.0)
    f, recons = _sparsify_expected(w, x, 5)
    assert ((f > 0).sum(-1) == 5).all()
    _close(sae.encode(x), f)
    _close(sae.decode(f), recons)
    _close(sae(x), recons)


def test_sparsify_embedding_without_run_config(tmp_path):
    directory = tmp_path / "embed_tokens"
    cfg = _sparsify_cfg(num_latents=0, normalize_decoder=False, k=7)  # width from expansion_factor
    w = _write_sparsify(directory, cfg, seed=310)
    sae = _load_both(directory, "sparsify")
    assert (sae.cfg.d_sae, sae.cfg.k, sae.cfg.apply_b_dec_to_input) == (D_IN * 3, 7, True)
    assert sae.cfg.metadata.hook_name == "hook_embed"
    assert sae.cfg.metadata.hf_hook_name is None and sae.cfg.metadata.model_name is None
    x = _randn(N, D_IN, seed=311)
    f, recons = _sparsify_expected(w, x, 7)
    _close(sae.encode(x), f)
    _close(sae(x), recons)


def test_sparsify_module_hookpoints_and_seed_folders(tmp_path):
    run = {"model": "meta-llama/Llama-3.2-1B"}
    mlp = tmp_path / "run" / "layers.1.mlp"
    _write_sparsify(mlp, _sparsify_cfg(), run, seed=320)
    sae = SAE.load_from_disk(mlp)
    assert (sae.cfg.metadata.hook_name, sae.cfg.metadata.hf_hook_name) == (
        "blocks.1.hook_mlp_out", "model.layers.1.mlp")
    gpt2 = tmp_path / "gpt2run" / "h.4.attn"
    _write_sparsify(gpt2, _sparsify_cfg(), {"model": "openai-community/gpt2"}, seed=321)
    sae = SAE.load_from_disk(gpt2)
    assert (sae.cfg.metadata.hook_name, sae.cfg.metadata.hf_hook_name) == (
        "blocks.4.hook_attn_out", "transformer.h.4.attn")
    seeded = tmp_path / "seedrun" / "layers.3" / "seed1"
    _write_sparsify(seeded, _sparsify_cfg(), None, seed=322)
    _write_json(tmp_path / "seedrun" / "config.json", run)
    sae = SAE.load_from_disk(seeded)
    assert (sae.cfg.metadata.hook_name, sae.cfg.metadata.hf_hook_name) == (
        "blocks.3.hook_resid_post", "model.layers.3")


def test_sparsify_signed_is_abstopk(tmp_path):
    directory = tmp_path / "layers.0"
    w = _write_sparsify(directory, {"expansion_factor": 3, "normalize_decoder": True, "num_latents": D_SAE, "k": 4,
                                    "signed": True, "d_in": D_IN}, seed=330)
    sae = _load_both(directory, "sparsify")
    assert sae.cfg.architecture == "abstopk"
    x = _randn(N, D_IN, seed=331)
    pre = (x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]
    idx = pre.abs().topk(4, dim=-1).indices
    f = torch.zeros_like(pre).scatter_(-1, idx, pre.gather(-1, idx))
    _close(sae.encode(x), f)
    _close(sae(x), f @ w["W_dec"] + w["b_dec"])


@pytest.mark.parametrize("overrides, match", [({"transcode": True}, "transcoder"),
                                              ({"skip_connection": True}, "skip"),
                                              ({"activation": "groupmax"}, "groupmax")])
def test_sparsify_unsupported_variants(tmp_path, overrides, match):
    directory = tmp_path / "layers.0"
    _write_sparsify(directory, _sparsify_cfg(**overrides))
    with pytest.raises(NotImplementedError, match=match):
        SAE.load_from_disk(directory, format="sparsify")


def test_sparsify_matches_saelens_where_saelens_is_right(tmp_path):
    """SAELens' own sparsify disk loader: same encoder; it transposes W_dec (wrong) and derives
    apply_b_dec_to_input from normalize_decoder (wrong); with a square SAE its load at least runs."""
    loaders = pytest.importorskip("sae_lens.loading.pretrained_sae_loaders")
    directory = tmp_path / "layers.2"
    w = _write_sparsify(directory, _sparsify_cfg(num_latents=D_IN), seed=340)
    theirs_cfg, theirs = loaders.sparsify_disk_loader(directory, cfg_overrides={"dtype": "float32"})
    ours_cfg, ours, _ = sparsify.load(directory)
    torch.testing.assert_close(ours["W_enc"], theirs["W_enc"])
    torch.testing.assert_close(ours["b_enc"], theirs["b_enc"])
    torch.testing.assert_close(ours["W_dec"], theirs["W_dec"].T)  # theirs is transposed
    assert theirs_cfg["apply_b_dec_to_input"] is False and ours_cfg["apply_b_dec_to_input"] is True
    assert theirs_cfg["hook_name"] == ours_cfg["metadata"]["hook_name"]
    assert theirs_cfg["activation_fn_kwargs"]["k"] == ours_cfg["k"]
    assert torch.equal(ours["W_dec"], w["W_dec"])


# ---------------------------------------------------------------------------------------------------------------
# dictionary_learning: config.json + ae.pt
# ---------------------------------------------------------------------------------------------------------------

def _dl_config(dict_class: str, **trainer) -> dict:
    return {"trainer": {"trainer_class": "X", "dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE,
                        "layer": 3, "lm_name": "EleutherAI/pythia-70m-deduped",
                        "submodule_name": "resid_post_layer_3", **trainer},
            "buffer": {"d_submodule": D_IN, "io": "out", "n_ctxs": 100, "ctx_len": 128}}


def _write_dl(directory: Path, config: dict, state: dict) -> Path:
    _write_json(directory / "config.json", config)
    torch.save(state, directory / "ae.pt")
    return directory


def _linear_state(seed: int, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"encoder.weight": _randn(D_SAE, D_IN, seed=seed, scale=0.5),
            "encoder.bias": _randn(D_SAE, seed=seed + 1, scale=0.3),
            "decoder.weight": _randn(D_IN, D_SAE, seed=seed + 2, scale=0.2), **extra}


def _dl_autoencoder(s, x):
    f = torch.relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
    return f, f @ s["decoder.weight"].T + s["bias"]


def _dl_autoencoder_new(s, x):
    f = torch.relu(x @ s["encoder.weight"].T + s["encoder.bias"])
    return f, f @ s["decoder.weight"].T + s["decoder.bias"]


def _dl_gated(s, x):
    x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
    gate = (x_enc + s["gate_bias"] > 0).float()
    f = gate * torch.relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
    return f, f @ s["decoder.weight"].T + s["decoder_bias"]


def _dl_topk(s, x):
    f = _dense_topk(torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"]), int(s["k"]))
    return f, f @ s["decoder.weight"].T + s["b_dec"]


def _dl_batch_topk(s, x):
    post = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
    f = post * (post > s["threshold"])
    return f, f @ s["decoder.weight"].T + s["b_dec"]


def _dl_matryoshka(s, x):
    post = torch.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
    f = post * (post > s["threshold"])
    return f, f @ s["W_dec"] + s["b_dec"]


def _dl_jumprelu(s, x):
    pre = x @ s["W_enc"] + s["b_enc"]
    f = torch.relu(pre * (pre > s["threshold"]))
    return f, f @ s["W_dec"] + s["b_dec"]


def _param_state(seed: int, threshold: torch.Tensor, **extra) -> dict[str, torch.Tensor]:
    return {"W_enc": _randn(D_IN, D_SAE, seed=seed, scale=0.5), "b_enc": _randn(D_SAE, seed=seed + 1, scale=0.3),
            "W_dec": _randn(D_SAE, D_IN, seed=seed + 2, scale=0.2), "b_dec": _randn(D_IN, seed=seed + 3),
            "threshold": threshold, **extra}


DL_CASES = {
    "AutoEncoder": ("standard", True, lambda: _linear_state(400, bias=_randn(D_IN, seed=405)), _dl_autoencoder),
    "AutoEncoderNew": ("standard", False, lambda: _linear_state(410, **{"decoder.bias": _randn(D_IN, seed=415)}),
                       _dl_autoencoder_new),
    "GatedAutoEncoder": ("gated", True, lambda: {
        "encoder.weight": _randn(D_SAE, D_IN, seed=420, scale=0.5), "decoder.weight": _randn(D_IN, D_SAE, seed=421),
        "decoder_bias": _randn(D_IN, seed=422), "r_mag": _randn(D_SAE, seed=423, scale=0.3),
        "gate_bias": _randn(D_SAE, seed=424, scale=0.3), "mag_bias": _randn(D_SAE, seed=425, scale=0.3)}, _dl_gated),
    "AutoEncoderTopK": ("topk", True, lambda: _linear_state(
        430, b_dec=_randn(D_IN, seed=435), k=torch.tensor(6, dtype=torch.int), threshold=torch.tensor(0.25)),
        _dl_topk),
    "BatchTopKSAE": ("jumprelu", True, lambda: _linear_state(
        440, b_dec=_randn(D_IN, seed=445), k=torch.tensor(6, dtype=torch.int), threshold=torch.tensor(0.3)),
        _dl_batch_topk),
    "MatryoshkaBatchTopKSAE": ("jumprelu", True, lambda: _param_state(
        450, torch.tensor(0.3), k=torch.tensor(6, dtype=torch.int), group_sizes=torch.tensor([16, 32])),
        _dl_matryoshka),
    "JumpReluAutoEncoder": ("jumprelu", False, lambda: _param_state(
        460, torch.rand(D_SAE, generator=_gen(466)) * 0.6), _dl_jumprelu),
}


@pytest.mark.parametrize("dict_class", list(DL_CASES))
def test_dictionary_learning_classes(tmp_path, dict_class):
    architecture, apply_b_dec, make_state, expected = DL_CASES[dict_class]
    state = make_state()
    directory = _write_dl(tmp_path / "resid_post_layer_3" / "trainer_0", _dl_config(dict_class, k=6), state)
    sae = _load_both(directory, "dictionary_learning")
    cfg = sae.cfg
    assert (cfg.architecture, cfg.apply_b_dec_to_input, cfg.d_in, cfg.d_sae) == (
        architecture, apply_b_dec, D_IN, D_SAE)
    assert cfg.k == (6 if architecture == "topk" else None)
    assert cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert (cfg.metadata.model_name, cfg.metadata.context_size) == ("pythia-70m-deduped", 128)
    x = _randn(N, D_IN, seed=470, scale=1.5)
    f, recons = expected(state, x)
    assert (f > 0).any() and (f == 0).any()
    _close(sae.encode(x), f)
    _close(sae.decode(f), recons)
    _close(sae(x), recons)


def test_dictionary_learning_submodule_names_the_hook(tmp_path):
    config = _dl_config("AutoEncoder", submodule_name="mlp_out_layer_2", layer=2)
    directory = _write_dl(tmp_path / "d", config, _linear_state(480, bias=torch.zeros(D_IN)))
    assert SAE.load_from_disk(directory).cfg.metadata.hook_name == "blocks.2.hook_mlp_out"


class _NotATensor:
    pass


def test_dictionary_learning_refuses_pickled_objects(tmp_path):
    directory = _write_dl(tmp_path / "evil", _dl_config("AutoEncoder"),
                          {**_linear_state(490, bias=torch.zeros(D_IN)), "payload": _NotATensor()})
    with pytest.raises(ValueError, match="ae.pt"):
        SAE.load_from_disk(directory, format="dictionary_learning")


def test_dictionary_learning_unknown_class(tmp_path):
    directory = _write_dl(tmp_path / "d", _dl_config("IdentityDict"), {"x": torch.zeros(1)})
    with pytest.raises(NotImplementedError, match="IdentityDict"):
        SAE.load_from_disk(directory)


# ---------------------------------------------------------------------------------------------------------------
# Detection, hub file lists, errors
# ---------------------------------------------------------------------------------------------------------------

def test_files_lists_what_a_hub_download_needs():
    assert gemma_scope.files("layer_12/width_16k/average_l0_82") == (
        ["layer_12/width_16k/average_l0_82/params.npz"], [])
    assert gemma_scope_2.files("resid_post/layer_7_width_16k_l0_big") == (
        ["resid_post/layer_7_width_16k_l0_big/params.safetensors"], ["resid_post/layer_7_width_16k_l0_big/config.json"])
    assert llama_scope.files("Llama3_1-8B-Base-L3R-8x/") == (
        ["Llama3_1-8B-Base-L3R-8x/hyperparams.json", "Llama3_1-8B-Base-L3R-8x/checkpoints/final.safetensors"], [])
    assert sparsify.files("layers.10") == (["layers.10/cfg.json", "layers.10/sae.safetensors"], ["config.json"])
    assert sparsify.files("run/layers.10") == (
        ["run/layers.10/cfg.json", "run/layers.10/sae.safetensors"], ["run/config.json"])
    assert dictionary_learning.files("resid_post_layer_3/trainer_1") == (
        ["resid_post_layer_3/trainer_1/config.json", "resid_post_layer_3/trainer_1/ae.pt"], [])


def test_every_format_is_registered():
    for module in (gemma_scope, gemma_scope_2, llama_scope, sparsify, dictionary_learning):
        assert module.NAME in FORMAT_NAMES


def test_undetectable_directory_lists_formats(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError) as info:
        SAE.load_from_disk(tmp_path)
    for name in ("gemma_scope", "gemma_scope_2", "llama_scope", "sparsify", "dictionary_learning"):
        assert name in str(info.value)


@pytest.mark.parametrize("name, present, missing", [
    ("gemma_scope", None, "params.npz"),
    ("gemma_scope_2", "config.json", "params.safetensors"),
    ("llama_scope", "hyperparams.json", "final.safetensors"),
    ("sparsify", "cfg.json", "sae.safetensors"),
    ("dictionary_learning", "config.json", "ae.pt"),
])
def test_missing_file_is_named(tmp_path, name, present, missing):
    if present:
        _write_json(tmp_path / present, {"trainer": {"dict_class": "AutoEncoder"}, "architecture": "jump_relu",
                                         "d_in": D_IN, "k": 2, "hook_point_in": "x", "d_model": D_IN})
    with pytest.raises(FileNotFoundError, match=missing):
        SAE.load_from_disk(tmp_path, format=name)


# ---------------------------------------------------------------------------------------------------------------
# Independent check against SAELens' own loaders (hub downloads redirected to the fixture files)
# ---------------------------------------------------------------------------------------------------------------

def _saelens_load(monkeypatch, tmp_path: Path, loader_name: str, repo_id: str, folder: str):
    """What SAELens' `from_pretrained` builds from the fixture at tmp_path/folder: (cfg.to_dict(), state dict)."""
    loaders = pytest.importorskip("sae_lens.loading.pretrained_sae_loaders")
    from huggingface_hub.utils import EntryNotFoundError
    from sae_lens.registry import get_sae_class

    def download(repo_id, filename=None, subfolder=None, **_):
        path = tmp_path / (f"{subfolder}/{filename}" if subfolder else filename)
        if not path.is_file():
            raise EntryNotFoundError(str(path))
        return str(path)

    def shapes(repo_id, filename):
        from safetensors import safe_open
        with safe_open(tmp_path / filename, framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

    monkeypatch.setattr(loaders, "hf_hub_download", download)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", shapes)
    loader = loaders.NAMED_PRETRAINED_SAE_LOADERS[loader_name]
    cfg, state_dict, _ = loader(repo_id=repo_id, folder_name=folder, device="cpu", force_download=False,
                                cfg_overrides={"device": "cpu", "dtype": "float32"})
    cfg = loaders.handle_config_defaulting(cfg)
    return get_sae_class(cfg["architecture"])[1].from_dict(cfg).to_dict(), state_dict


def _same_as_saelens(ours: tuple, theirs: tuple, ignore: tuple[str, ...] = (), exact: bool = True) -> None:
    (our_cfg, our_sd, _), (their_cfg, their_sd) = ours, theirs
    for key in ignore:
        our_cfg.pop(key), their_cfg.pop(key)
    assert our_cfg == their_cfg
    assert sorted(our_sd) == sorted(their_sd)
    for key in our_sd:
        tol = 0 if exact else 1e-6
        torch.testing.assert_close(our_sd[key], their_sd[key].float(), atol=tol, rtol=tol, msg=key)


@pytest.mark.parametrize("repo_id, folder", [
    ("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82"),
    ("google/gemma-scope-9b-pt-res", "embedding/width_4k/average_l0_6"),
    ("google/gemma-scope-2b-pt-att", "layer_5/width_16k/average_l0_9"),
    ("google/gemma-scope-27b-it-mlp", "layer_3/width_131k/average_l0_50"),
])
def test_gemma_scope_same_as_saelens(monkeypatch, tmp_path, repo_id, folder):
    _write_gemma_scope(tmp_path / folder, _gemma_scope_params(seed=500))
    ours = load_directory(tmp_path / folder, format="gemma_scope", repo_id=repo_id, sae_id=folder)
    their_cfg, their_sd = _saelens_load(monkeypatch, tmp_path, "gemma_2", repo_id, folder)
    if "embedding" in folder:  # SAELens rescales by √(the model's d_in), which the tiny fixture does not have
        ratio = math.sqrt(their_cfg["d_in"] / D_IN)
        their_sd = {**their_sd, "W_enc": their_sd["W_enc"] * ratio, "W_dec": their_sd["W_dec"] / ratio}
    # SAELens takes the widths from the names, not the arrays
    _same_as_saelens(ours, (their_cfg, their_sd), ignore=("d_in", "d_sae"), exact="embedding" not in folder)


def test_gemma_scope_transcoder_same_as_saelens(monkeypatch, tmp_path):
    folder = "layer_3/width_16k/average_l0_76"
    _write_gemma_scope(tmp_path / folder, _gemma_scope_params(seed=510))
    ours = load_directory(tmp_path / folder, format="gemma_scope", repo_id="google/gemma-scope-2b-pt-transcoders")
    theirs = _saelens_load(monkeypatch, tmp_path, "gemma_2_transcoder", "google/gemma-scope-2b-pt-transcoders", folder)
    _same_as_saelens(ours, theirs, ignore=("d_in", "d_sae", "d_out"))


@pytest.mark.parametrize("folder, config, affine", [
    ("resid_post/layer_7_width_16k_l0_big", _gs2_config(7, "model.layers.7.output", "model.layers.7.output"), False),
    ("attn_out/layer_5_width_16k_l0_small", None, False),
    ("mlp_out/layer_2_width_16k_l0_small", None, False),
    ("transcoder/layer_17_width_16k_l0_big_affine", _gs2_config(
        17, "model.layers.17.pre_feedforward_layernorm.output", "model.layers.17.post_feedforward_layernorm.output",
        "transcoder", True), True),
    ("transcoder/layer_1_width_16k_l0_big", None, False),
])
def test_gemma_scope_2_same_as_saelens(monkeypatch, tmp_path, folder, config, affine):
    repo_id = "google/gemma-scope-2-270m-pt"
    _write_gemma_scope_2(tmp_path / folder, config, d_out=12 if "transcoder" in folder else D_IN, affine=affine)
    ours = load_directory(tmp_path / folder, format="gemma_scope_2", repo_id=repo_id, sae_id=folder)
    _same_as_saelens(ours, _saelens_load(monkeypatch, tmp_path, "gemma_3", repo_id, folder))


def test_llama_scope_same_as_saelens(monkeypatch, tmp_path):
    folder = "Llama3_1-8B-Base-L3R-8x"
    _write_llama_scope(tmp_path / folder, "blocks.3.hook_resid_post", "blocks.3.hook_resid_post", 2.5, 2.5)
    ours = load_directory(tmp_path / folder, format="llama_scope", repo_id="fnlp/Llama3_1-8B-Base-LXR-8x")
    _same_as_saelens(ours, _saelens_load(monkeypatch, tmp_path, "llama_scope", "fnlp/Llama3_1-8B-Base-LXR-8x", folder))


@pytest.mark.parametrize("dict_class", [c for c in DL_CASES if c != "AutoEncoderNew"])  # SAELens can't load that one
def test_dictionary_learning_same_as_saelens(monkeypatch, tmp_path, dict_class):
    folder = "resid_post_layer_3/trainer_0"
    _write_dl(tmp_path / folder, _dl_config(dict_class, k=6), DL_CASES[dict_class][2]())
    ours = load_directory(tmp_path / folder, format="dictionary_learning")
    _same_as_saelens(ours, _saelens_load(monkeypatch, tmp_path, "dictionary_learning_1", "x/y", folder))
