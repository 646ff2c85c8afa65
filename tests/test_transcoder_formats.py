"""`nnsae.circuits.load_transcoders` on other libraries' transcoder files.

Each fixture is written here from the format's description; the loaded transcoders are checked against the math
written out from the raw arrays, and against SAELens' own loaders where SAELens reads the format (its Hugging Face
download calls redirected to the fixture files).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from nnsae.circuits import CrossLayerTranscoder, TranscoderSet, load_transcoders
from tests import random_transcoders

D, N_TC, N_LAYERS = 8, 12, 3


def _arrays(seed: int, d_out: int = D) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W_enc": rng.normal(size=(D, N_TC)).astype(np.float32) * 0.5,
            "W_dec": rng.normal(size=(N_TC, d_out)).astype(np.float32) * 0.3,
            "b_enc": rng.normal(size=N_TC).astype(np.float32) * 0.2,
            "b_dec": rng.normal(size=d_out).astype(np.float32) * 0.1,
            "threshold": np.abs(rng.normal(size=N_TC)).astype(np.float32) * 0.3}


def _jumprelu_recon(a: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """JumpReLU transcoder from SAELens-oriented arrays (W_enc [d_in, d_tc]), in float64."""
    t = {k: torch.from_numpy(v).double() for k, v in a.items()}
    pre = x.double() @ t["W_enc"] + t["b_enc"]
    return (pre * (pre > t["threshold"])) @ t["W_dec"] + t["b_dec"]


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 results against float64 references."""
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def _gemma_scope_dir(root: Path, extra_variant_for_layer: int | None = None) -> list[dict[str, np.ndarray]]:
    arrays = []
    for layer in range(N_LAYERS):
        a = _arrays(layer)
        arrays.append(a)
        folder = root / f"layer_{layer}" / "width_16k" / f"average_l0_{10 + layer}"
        folder.mkdir(parents=True)
        np.savez(folder / "params.npz", **a)
        if layer == extra_variant_for_layer:
            other = root / f"layer_{layer}" / "width_16k" / "average_l0_99"
            other.mkdir(parents=True)
            np.savez(other / "params.npz", **_arrays(100))
    return arrays


def test_gemma_scope_transcoders(tmp_path, monkeypatch):
    root = tmp_path / "gemma-scope-2b-pt-transcoders"
    arrays = _gemma_scope_dir(root, extra_variant_for_layer=1)
    with pytest.raises(ValueError, match="2 transcoders for layer 1.*variant="):
        load_transcoders(root)
    with pytest.raises(ValueError, match="layers 0..N"):
        load_transcoders(root, variant="average_l0_99")
    # Without the extra variant the directory is one set.
    import shutil
    shutil.rmtree(root / "layer_1" / "width_16k" / "average_l0_99")
    tc = load_transcoders(root)
    assert isinstance(tc, TranscoderSet) and tc.n_layers == N_LAYERS
    assert (tc.feature_input_hook, tc.feature_output_hook) == ("ln2.hook_normalized", "hook_mlp_out")
    x = torch.randn(5, D)
    for layer, a in enumerate(arrays):
        assert tc[layer].activation == "jumprelu" and tc[layer].W_enc.shape == (N_TC, D)
        _close(tc[layer](x), _jumprelu_recon(a, x))

    # SAELens' own Gemma Scope transcoder loader, its downloads redirected to the fixture files.
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.loading import pretrained_sae_loaders as loaders

    monkeypatch.setattr(loaders, "hf_hub_download", lambda repo_id, filename, **kw: str(root / filename))
    for layer in range(N_LAYERS):
        folder = f"layer_{layer}/width_16k/average_l0_{10 + layer}"
        cfg, state, _ = loaders.gemma_2_transcoder_huggingface_loader("google/gemma-scope-2b-pt-transcoders", folder)
        cfg.update(d_in=D, d_out=D, d_sae=N_TC)  # their config hard-codes Gemma 2 2B's width
        theirs = sae_lens.SAE.from_dict(cfg)
        theirs.load_state_dict(state)
        assert cfg["hook_name"] == f"blocks.{layer}.{tc.feature_input_hook}"
        assert cfg["hook_name_out"] == f"blocks.{layer}.{tc.feature_output_hook}"
        with torch.no_grad():
            torch.testing.assert_close(tc[layer](x), theirs.decode(theirs.encode(x)))


def test_circuit_tracer_config_listing_gemma_scope_npz_files(tmp_path):
    arrays = _gemma_scope_dir(tmp_path / "files")
    names = [f"files/layer_{i}/width_16k/average_l0_{10 + i}/params.npz" for i in range(N_LAYERS)]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out", "scan": "gemma-test", "transcoders": names}))
    tc = load_transcoders(tmp_path)
    x = torch.randn(4, D)
    assert tc.scan == "gemma-test"
    _close(tc[2](x), _jumprelu_recon(arrays[2], x))


def _gemma_scope_2_layer(folder: Path, seed: int, affine: bool, layer: int | None = None) -> dict[str, np.ndarray]:
    layer = seed if layer is None else layer
    folder.mkdir(parents=True)
    a = _arrays(20 + seed)
    tensors = {"w_enc": a["W_enc"], "w_dec": a["W_dec"], "b_enc": a["b_enc"], "b_dec": a["b_dec"],
               "threshold": a["threshold"]}
    if affine:
        tensors["affine_skip_connection"] = np.random.default_rng(seed).normal(size=(D, D)).astype(np.float32) * .1
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "gemma-v3-1b-pt", "type": "transcoder",
        "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
        "affine_connection": affine}))
    return tensors


def test_gemma_scope_2_per_layer_transcoders(tmp_path, monkeypatch):
    root = tmp_path / "gemma-scope-2-1b-pt" / "transcoder"
    tensors = []
    for layer in range(N_LAYERS):
        tensors.append(_gemma_scope_2_layer(root / f"layer_{layer}_width_16k_l0_small_affine", layer, affine=True))
        _gemma_scope_2_layer(root / f"layer_{layer}_width_16k_l0_small", layer + 10, affine=False, layer=layer)
    with pytest.raises(ValueError, match="variant="):
        load_transcoders(root)
    tc = load_transcoders(root, variant="l0_small")
    assert not tc.skip_connection  # `l0_small`, not `l0_small_affine`
    tc = load_transcoders(root, variant="l0_small_affine")
    assert tc.skip_connection and (tc.feature_input_hook, tc.feature_output_hook) == ("mlp.hook_in", "hook_mlp_out")
    x = torch.randn(5, D)
    for layer, t in enumerate(tensors):
        a = {"W_enc": t["w_enc"], "W_dec": t["w_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"],
             "threshold": t["threshold"]}
        expected = _jumprelu_recon(a, x) + x.double() @ torch.from_numpy(t["affine_skip_connection"]).double()
        _close(tc[layer](x), expected)

    # SAELens' Gemma Scope 2 loader on the same files.
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.loading import pretrained_sae_loaders as loaders

    repo_root = tmp_path / "gemma-scope-2-1b-pt"

    def download(repo_id, filename=None, subfolder=None, **kw):
        return str(repo_root / (f"{subfolder}/{filename}" if subfolder else filename))

    def shapes(repo_id, filename, **kw):
        from safetensors import safe_open
        with safe_open(str(repo_root / filename), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

    monkeypatch.setattr(loaders, "hf_hub_download", download)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", shapes)
    for layer in range(N_LAYERS):
        cfg, state, _ = loaders.gemma_3_sae_huggingface_loader(
            "google/gemma-scope-2-1b-pt", f"transcoder/layer_{layer}_width_16k_l0_small_affine")
        assert cfg["hf_hook_name"].endswith("pre_feedforward_layernorm.output")  # TL's mlp.hook_in for Gemma 3
        theirs = sae_lens.SAE.from_dict(cfg)
        theirs.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(tc[layer](x), theirs.forward(x))


def test_gemma_scope_2_clt(tmp_path):
    rng = np.random.default_rng(0)
    raw = []
    for i in range(N_LAYERS):
        t = {"w_enc": rng.normal(size=(D, N_TC)) * 0.5, "w_dec": rng.normal(size=(N_TC, N_LAYERS, D)) * 0.3,
             "b_enc": rng.normal(size=N_TC) * 0.2, "b_dec": rng.normal(size=D) * 0.1,
             "threshold": np.abs(rng.normal(size=N_TC)) * 0.3}
        raw.append({k: torch.from_numpy(v.astype(np.float32)) for k, v in t.items()})
    (tmp_path / "clt").mkdir()
    for i, t in enumerate(raw):
        save_file(t, str(tmp_path / "clt" / f"layer_{i}.safetensors"))
    xs = torch.randn(N_LAYERS, 4, D)
    acts = []
    for i, t in enumerate(raw):
        pre = xs[i].double() @ t["w_enc"].double() + t["b_enc"].double()
        acts.append(pre * (pre > t["threshold"].double()))
    # Layer L's output: every source s <= L through w_dec_s[:, L] (entries for earlier targets are unused).
    expected = torch.stack([sum(acts[s] @ raw[s]["w_dec"][:, L].double() for s in range(L + 1))
                            + raw[L]["b_dec"].double() for L in range(N_LAYERS)])
    for clt in (load_transcoders(tmp_path / "clt"), _listed_clt(tmp_path, raw)):
        assert isinstance(clt, CrossLayerTranscoder) and clt.activation == "jumprelu"
        assert clt.feature_input_hook == "mlp.hook_in" or clt.scan == "listed"
        _close(clt(xs), expected)


def _listed_clt(tmp_path: Path, raw: list[dict[str, torch.Tensor]]) -> CrossLayerTranscoder:
    """The same files listed in a circuit-tracer config.yaml, as circuit-tracer's Gemma Scope 2 configs do."""
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "cross_layer_transcoder", "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out", "scan": "listed",
        "transcoders": [f"../clt/layer_{i}.safetensors" for i in range(N_LAYERS)]}))
    with pytest.raises(ValueError, match="outside"):
        load_transcoders(tmp_path / "listed")
    for i in range(N_LAYERS):
        save_file(raw[i], str(tmp_path / "listed" / f"layer_{i}.safetensors"))
    (tmp_path / "listed" / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "cross_layer_transcoder", "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out", "scan": "listed",
        "transcoders": [f"layer_{i}.safetensors" for i in range(N_LAYERS)]}))
    return load_transcoders(tmp_path / "listed")


def test_sparsify_transcoders(tmp_path):
    run = tmp_path / "run"
    k, weights = 3, []
    for layer in range(N_LAYERS):
        folder = run / f"layers.{layer}.mlp"
        folder.mkdir(parents=True)
        g = torch.Generator().manual_seed(layer)
        w = {"encoder.weight": torch.randn(N_TC, D, generator=g), "encoder.bias": torch.randn(N_TC, generator=g),
             "W_dec": torch.randn(N_TC, D, generator=g), "b_dec": torch.randn(D, generator=g),
             "W_skip": torch.randn(D, D, generator=g) * 0.1}
        save_file(w, str(folder / "sae.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({
            "activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": N_TC, "k": k,
            "multi_topk": False, "skip_connection": True, "transcode": True, "d_in": D}))
        weights.append(w)
    (run / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M"}))
    tc = load_transcoders(run)
    assert (tc.feature_input_hook, tc.feature_output_hook) == ("mlp.hook_in", "hook_mlp_out")
    x = torch.randn(6, D)
    for layer, w in enumerate(weights):
        pre = torch.relu(x.double() @ w["encoder.weight"].double().T + w["encoder.bias"].double())
        values, indices = pre.topk(k, dim=-1)  # sparsify: top-k of ReLU(pre), no - b_dec for transcoders
        acts = torch.zeros_like(pre).scatter(-1, indices, values)
        expected = acts @ w["W_dec"].double() + w["b_dec"].double() + x.double() @ w["W_skip"].double().T
        _close(tc[layer](x), expected)

    (run / "config.json").write_text(json.dumps({"model": "google/gemma-2-2b"}))
    with pytest.raises(NotImplementedError, match="post-MLP norm"):
        load_transcoders(run)


def test_unknown_directory_names_the_formats(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ValueError, match="Gemma Scope params.npz"):
        load_transcoders(tmp_path)


def test_convert_a_training_run_to_circuit_tracer(tmp_path, capsys):
    """`nnsae convert RUN DST --to circuit-tracer`: each layer's final transcoder (not its intermediate checkpoints)
    in circuit-tracer's transcoder_set files, read back here with safetensors and checked against the SAEs."""
    from safetensors import safe_open

    from nnsae.cli import main

    run = tmp_path / "run"
    saes = random_transcoders.saelens_transcoder_saes("jumprelu_transcoder", N_LAYERS, D, N_TC, scale=0.3)
    for layer, sae in enumerate(saes):
        sae.save_model(run / f"blocks.{layer}.mlp.hook_in")
        sae.save_model(run / f"blocks.{layer}.mlp.hook_in" / "checkpoints" / "1000")  # an intermediate SAE
    (run / "run.json").write_text("{}")
    main(["convert", str(run), str(tmp_path / "ct"), "--to", "circuit-tracer"])
    assert "transcoder_set (3 layers" in capsys.readouterr().out
    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert (config["model_kind"], config["feature_input_hook"], config["feature_output_hook"]) == (
        "transcoder_set", "mlp.hook_in", "hook_mlp_out")
    for layer, sae in enumerate(saes):
        with safe_open(str(tmp_path / "ct" / f"layer_{layer}.safetensors"), "pt") as f:
            assert torch.equal(f.get_tensor("W_enc"), sae.W_enc.detach().T)  # [d_transcoder, d_model]
            assert torch.equal(f.get_tensor("W_dec"), sae.W_dec.detach())
            assert torch.equal(f.get_tensor("activation_function.threshold"), sae.threshold.detach())
            assert torch.equal(f.get_tensor("b_dec"), sae.b_dec.detach())
    back = load_transcoders(tmp_path / "ct")
    x = torch.randn(4, D)
    for layer, sae in enumerate(saes):
        torch.testing.assert_close(back[layer](x), sae(x))
