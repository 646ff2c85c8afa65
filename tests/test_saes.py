"""The SAE family against formulas written here from the SAELens spec (not the library's own code)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import nnsae
from nnsae import SAE, SAEConfig

D_IN, D_SAE, D_OUT, K = 12, 40, 10, 5
ARCHS = ["standard", "gated", "jumprelu", "topk", "abstopk", "transcoder", "skip_transcoder", "jumprelu_transcoder",
         "jumprelu_skip_transcoder"]
TRANSCODERS = [a for a in ARCHS if "transcoder" in a]


def make_sae(arch: str, dtype=torch.float32, seed: int = 0, **overrides) -> SAE:
    kw: dict = dict(d_in=D_IN, d_sae=D_SAE, architecture=arch, dtype=str(dtype).removeprefix("torch."))
    if arch in TRANSCODERS:
        kw.update(apply_b_dec_to_input=False, d_out=D_OUT)
    if "topk" in arch:
        kw["k"] = K
    kw.update(overrides)
    sae = SAE.from_config(SAEConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random everything, so every term of the formulas matters
        for p in sae.parameters():
            p.copy_((0.3 * torch.randn(p.shape, generator=g)).to(p.dtype))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(D_SAE, generator=g).to(dtype) * 0.3)
    return sae


def params(sae: SAE, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype) for k, v in sae.state_dict().items()}


def expected_encode(arch: str, p: dict, x: torch.Tensor, apply_b_dec: bool, rescale: bool = False) -> torch.Tensor:
    """Feature activations per saelens-compat.md §1, in float64."""
    xt = x - p["b_dec"] if apply_b_dec else x
    if arch == "gated":
        gate = (xt @ p["W_enc"] + p["b_gate"]) > 0
        mag = torch.relu(xt @ (p["W_enc"] * torch.exp(p["r_mag"])) + p["b_mag"])
        return gate * mag
    z = xt @ p["W_enc"] + p["b_enc"]
    if arch in ("standard", "transcoder", "skip_transcoder"):
        return torch.relu(z)
    if "jumprelu" in arch:
        return torch.relu(z) * (z > p["threshold"])
    if rescale:
        z = z * p["W_dec"].norm(dim=-1)
    key = z.abs() if arch == "abstopk" else z
    idx = key.argsort(dim=-1, descending=True)[..., :K]
    out = torch.zeros_like(z)
    vals = z.gather(-1, idx)
    out.scatter_(-1, idx, vals if arch == "abstopk" else torch.relu(vals))
    return out


def expected_decode(arch: str, p: dict, f: torch.Tensor, rescale: bool = False) -> torch.Tensor:
    if rescale:
        f = f / p["W_dec"].norm(dim=-1)
    return f @ p["W_dec"] + p["b_dec"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_decode_forward_match_formulas(arch, dtype):
    sae = make_sae(arch, dtype)
    # float32 SAEs are checked against float64 math; bf16 ones against the same formulas evaluated in bf16
    # (in float64, bf16 rounding would flip features sitting on a threshold or at the k-th place).
    ref = torch.float64 if dtype == torch.float32 else dtype
    p = params(sae, ref)
    x = torch.randn(3, 7, D_IN)
    xq = x.to(dtype).to(ref)  # the SAE casts its input to its dtype first
    f_exp = expected_encode(arch, p, xq, sae.cfg.apply_b_dec_to_input)
    f = sae.encode(x)
    assert f.shape == (3, 7, D_SAE) and f.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    if dtype == torch.bfloat16 and "topk" in arch:  # bf16 ties at the k-th place may pick other indices
        torch.testing.assert_close(f.to(ref).sort(-1).values, f_exp.sort(-1).values, **tol)
    else:
        torch.testing.assert_close(f.to(ref), f_exp, **tol)
    exp_out = expected_decode(arch, p, f.to(ref))
    torch.testing.assert_close(sae.decode(f).to(ref), exp_out, **tol)
    if "skip" in arch:
        exp_out = exp_out + xq @ p["W_skip"].T
    torch.testing.assert_close(sae(x).to(ref), exp_out, **tol)


def test_topk_rescale_by_decoder_norm():
    sae = make_sae("topk", rescale_acts_by_decoder_norm=True)
    p = params(sae)
    x = torch.randn(4, D_IN)
    f = sae.encode(x)
    torch.testing.assert_close(f.double(), expected_encode("topk", p, x.double(), True, rescale=True),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(f).double(), expected_decode("topk", p, f.double(), rescale=True),
                               atol=1e-5, rtol=1e-5)
    assert ((f != 0).sum(-1) <= K).all()


def test_topk_keeps_exactly_k_and_abstopk_keeps_signs():
    x = torch.randn(50, D_IN)
    topk = make_sae("topk")
    assert ((topk.encode(x) != 0).sum(-1) <= K).all() and (topk.encode(x) >= 0).all()
    abstopk = make_sae("abstopk")
    f = abstopk.encode(x)
    assert ((f != 0).sum(-1) == K).all() and (f < 0).any()


def test_jumprelu_threshold_is_strict():
    sae = make_sae("jumprelu", apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.linspace(-1, 1, D_SAE))
        sae.threshold.copy_(sae.b_enc)  # z == θ exactly: must not fire
    assert (sae.encode(torch.randn(2, D_IN)) == 0).all()


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_normalize_constant_norm_rescale_and_layer_norm(arch):
    x = torch.randn(5, D_IN) * 7 + 3
    xd = x.double()
    for mode in ("constant_norm_rescale", "layer_norm"):
        sae = make_sae(arch, normalize_activations=mode)
        p = params(sae)
        if mode == "constant_norm_rescale":
            coeff = math.sqrt(D_IN) / xd.norm(dim=-1, keepdim=True)
            xn = xd * coeff
        else:
            mu = xd.mean(-1, keepdim=True)
            std = (xd - mu).std(-1, keepdim=True)  # unbiased, eps added to σ
            xn = (xd - mu) / (std + 1e-5)
        f_exp = expected_encode(arch, p, xn, True)
        torch.testing.assert_close(sae.encode(x).double(), f_exp, atol=1e-5, rtol=1e-5)
        recon = expected_decode(arch, p, f_exp)
        recon = recon / coeff if mode == "constant_norm_rescale" else recon * std + mu
        torch.testing.assert_close(sae(x).double(), recon, atol=1e-4, rtol=1e-5)


def test_expected_average_only_in_is_not_applied_inside():
    a = make_sae("standard")
    b = make_sae("standard", normalize_activations="expected_average_only_in")
    x = torch.randn(4, D_IN)
    assert torch.equal(a(x), b(x))


def test_hook_z_reshape_is_head_major():
    sae = make_sae("standard", reshape_activations="hook_z")
    p = params(sae)
    x = torch.randn(2, 5, 3, 4)  # [batch, pos, n_heads, d_head], 3*4 = D_IN
    flat = x.double().reshape(2, 5, 12)  # head-major flatten
    f = sae.encode(x)
    torch.testing.assert_close(f.double(), expected_encode("standard", p, flat, True), atol=1e-5, rtol=1e-5)
    out = sae.decode(f)
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), expected_decode("standard", p, f.double()).reshape(2, 5, 3, 4),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_error_term_gives_back_the_target_and_edits_change_only_the_reconstruction(arch):
    sae = make_sae(arch)
    x = torch.randn(4, D_IN)
    target = torch.randn(4, sae.cfg.output_dim) if arch in TRANSCODERS else x
    kwargs = {"target": target} if arch in TRANSCODERS else {}
    torch.testing.assert_close(sae(x, use_error_term=True, **kwargs), target, atol=1e-5, rtol=0)
    # Ablate every feature through the hook module: output = b_dec (+ skip) + clean error.
    handle = sae.hook_sae_acts_post.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        clean_recon = sae.reconstruct(x).detach()
        out = sae(x, use_error_term=True, **kwargs)
    finally:
        handle.remove()
    p = params(sae)
    ablated = p["b_dec"].expand(4, -1)
    if "skip" in arch:
        ablated = ablated + x.double() @ p["W_skip"].T
    # clean_recon above was computed with the ablation active; recompute the true clean reconstruction
    true_clean = sae.reconstruct(x).double()
    assert not torch.allclose(clean_recon.double(), true_clean)
    torch.testing.assert_close(out.double(), ablated + (target.double() - true_clean), atol=1e-5, rtol=1e-5)


def test_error_term_has_no_gradient_path():
    sae = make_sae("standard")
    x = torch.randn(3, D_IN, requires_grad=True)
    sae(x, use_error_term=True).sum().backward()
    g_expected = torch.autograd.grad(sae(x).sum(), x)[0]  # only the reconstruction path carries gradient
    torch.testing.assert_close(x.grad, g_expected)


def test_transcoder_error_term_needs_target():
    with pytest.raises(ValueError, match="target"):
        make_sae("transcoder")(torch.randn(2, D_IN), use_error_term=True)


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "transcoder", "jumprelu_skip_transcoder"])
def test_fold_W_dec_norm_keeps_outputs(arch):
    sae = make_sae(arch)
    x = torch.randn(6, D_IN)
    before_f, before = sae.encode(x), sae(x)
    norms = sae.W_dec.detach().norm(dim=-1)
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.encode(x), before_f * norms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x), before, atol=1e-5, rtol=1e-5)


def test_fold_W_dec_norm_topk_needs_rescaling():
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
        make_sae("topk").fold_W_dec_norm()
    sae = make_sae("topk", rescale_acts_by_decoder_norm=True)
    x = torch.randn(6, D_IN)
    before = sae(x)
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
def test_fold_activation_norm_scaling_factor(arch):
    sae = make_sae(arch, normalize_activations="expected_average_only_in")
    x, s = torch.randn(5, D_IN), 2.5
    f_scaled, out_scaled = sae.encode(x * s), sae(x * s)
    sae.fold_activation_norm_scaling_factor(s)
    assert sae.cfg.normalize_activations == "none"
    torch.testing.assert_close(sae.encode(x), f_scaled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x), out_scaled / s, atol=1e-5, rtol=1e-5)


def test_default_initialisation_follows_saelens():
    sae = SAE.from_config(SAEConfig(d_in=D_IN, d_sae=D_SAE))
    assert torch.equal(sae.W_enc, sae.W_dec.T) and not sae.W_dec.eq(0).all()
    bound = math.sqrt(6 / D_IN)  # kaiming_uniform, fan_in = d_in for a [d_sae, d_in] matrix
    assert sae.W_dec.abs().max() <= bound and sae.W_dec.abs().max() > 0.8 * bound
    assert sae.b_enc.eq(0).all() and sae.b_dec.eq(0).all()
    tc = SAE.from_config(SAEConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, architecture="skip_transcoder",
                                   apply_b_dec_to_input=False))
    assert not torch.equal(tc.W_enc, tc.W_dec.T[:D_IN]) and tc.W_skip.eq(0).all()


# ---- files --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_identical(arch, dtype, tmp_path):
    sae = make_sae(arch, dtype)
    sae.cfg.metadata.hook_name = "blocks.3.hook_resid_post"
    sae.cfg.metadata.some_future_key = {"nested": [1, 2]}
    log_sparsity = torch.randn(D_SAE)
    sae.save_model(tmp_path, log_sparsity)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors",
                                                         "sparsity.safetensors"]
    loaded = SAE.load_from_disk(tmp_path, dtype=None)
    assert type(loaded) is type(sae) and loaded.cfg.to_dict() == sae.cfg.to_dict()
    for k, v in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v) and loaded.state_dict()[k].dtype == dtype
    assert torch.equal(loaded.log_feature_sparsity, log_sparsity)
    assert loaded.cfg.metadata.some_future_key == {"nested": [1, 2]}


def test_cfg_json_is_saelens_layout(tmp_path):
    make_sae("topk").save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert list(cfg) == ["d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                         "reshape_activations", "metadata", "k", "rescale_acts_by_decoder_norm", "architecture"]
    assert cfg["architecture"] == "topk" and cfg["k"] == K and cfg["metadata"]["sae_lens_version"].startswith("6.")
    make_sae("standard").save_model(tmp_path / "s")
    assert "k" not in json.loads((tmp_path / "s" / "cfg.json").read_text())


def test_load_overrides_dtype_and_device(tmp_path):
    make_sae("jumprelu").save_model(tmp_path)
    for spelling in ("bfloat16", "torch.bfloat16", torch.bfloat16):
        sae = SAE.load_from_disk(tmp_path, device="cpu", dtype=spelling)
        assert sae.W_enc.dtype == torch.bfloat16 and sae.cfg.dtype == "bfloat16"


LEGACY_CASES = [
    # (legacy cfg, expected v6 fields)
    ({"d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "device": "cpu", "hook_point": "blocks.2.hook_resid_pre",
      "hook_point_layer": 2, "hook_point_head_index": None, "l1_coefficient": 8e-5, "model_name": "gpt2-small",
      "context_size": 128, "normalize_activations": False, "finetuning_scaling_factor": False},
     {"architecture": "standard", "apply_b_dec_to_input": True, "normalize_activations": "none",
      "metadata": {"hook_name": "blocks.2.hook_resid_pre", "hook_head_index": None, "model_name": "gpt2-small",
                   "context_size": 128, "prepend_bos": True}}),
    ({"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "hook_name": "blocks.1.attn.hook_z",
      "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "normalize_activations": True,
      "apply_b_dec_to_input": False, "sae_lens_training_version": "3.1.0"},
     {"architecture": "topk", "k": K, "apply_b_dec_to_input": False, "reshape_activations": "hook_z",
      "normalize_activations": "expected_average_only_in",
      "metadata": {"hook_name": "blocks.1.attn.hook_z", "prepend_bos": True, "sae_lens_training_version": "3.1.0"}}),
    ({"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "hook_name": "blocks.0.hook_mlp_out", "architecture": "gated",
      "sae_lens_version": "5.9.1", "prepend_bos": False, "normalize_activations": None},
     {"architecture": "gated", "normalize_activations": "none",
      "metadata": {"hook_name": "blocks.0.hook_mlp_out", "prepend_bos": False}}),
]


@pytest.mark.parametrize("legacy,expected", LEGACY_CASES)
def test_legacy_config_migration(legacy, expected, tmp_path):
    arch = expected["architecture"]
    donor = make_sae(arch, **({"k": K} if arch == "topk" else {}))
    tmp_path.joinpath("cfg.json").write_text(json.dumps(legacy))
    state = donor.state_dict()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "sae_weights.safetensors")
    sae = SAE.load_from_disk(tmp_path)
    cfg = sae.cfg.to_dict()
    for key, value in expected.items():
        if key == "metadata":
            for mk, mv in value.items():
                assert cfg["metadata"][mk] == mv, mk
            assert "l1_coefficient" not in cfg["metadata"] and "hook_point_layer" not in cfg["metadata"]
        else:
            assert cfg[key] == value, key


def test_legacy_scaling_factor_is_folded_into_the_decoder(tmp_path):
    sae = make_sae("standard")
    scale = torch.rand(D_SAE) + 0.5
    state = {k: v.contiguous() for k, v in sae.state_dict().items()} | {"scaling_factor": scale}
    from safetensors.torch import save_file
    save_file(state, tmp_path / "sae_weights.safetensors")
    tmp_path.joinpath("cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
                                                         "hook_point": "blocks.0.hook_resid_pre",
                                                         "finetuning_scaling_factor": True}))
    loaded = SAE.load_from_disk(tmp_path)
    x = torch.randn(3, D_IN)
    f = sae.encode(x)
    torch.testing.assert_close(loaded(x), (f * scale) @ sae.W_dec + sae.b_dec)


# ---- bad input ----------------------------------------------------------------------------------------------------


def test_wrong_input_width_names_expected_and_got():
    with pytest.raises(ValueError, match=r"d_in=12.*\(2, 13\)"):
        make_sae("standard").encode(torch.randn(2, 13))
    with pytest.raises(ValueError, match="d_in=12"):
        make_sae("transcoder")(torch.randn(2, 13))


def test_device_mismatch_is_a_clear_error():
    sae = make_sae("standard").to("meta")
    with pytest.raises(ValueError, match="sae.to"):
        sae.encode(torch.randn(2, D_IN))


def test_unknown_architecture_lists_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown SAE architecture 'relu2'.*jumprelu"):
        SAEConfig(d_in=4, d_sae=8, architecture="relu2")


@pytest.mark.parametrize("bad", ["float", "fp32", "torch.int8", 3])
def test_nonsense_dtype_rejected(bad):
    with pytest.raises(ValueError, match="Unsupported dtype"):
        SAEConfig(d_in=4, d_sae=8, dtype=bad)


def test_bad_config_values():
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        SAEConfig(d_in=4, d_sae=8, d_out=4, architecture="transcoder")
    with pytest.raises(ValueError, match="normalize_activations"):
        SAEConfig(d_in=4, d_sae=8, normalize_activations="whiten")
    with pytest.raises(ValueError, match="k=9"):
        SAEConfig(d_in=4, d_sae=8, architecture="topk", k=9)


def test_missing_files_are_named(tmp_path):
    make_sae("standard").save_model(tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        SAE.load_from_disk(tmp_path, format="saelens")
    with pytest.raises(ValueError, match="Could not detect the SAE format"):
        SAE.load_from_disk(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SAE.load_from_disk(tmp_path / "nope")


def test_corrupt_files_are_named(tmp_path):
    make_sae("standard").save_model(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="sae_weights.safetensors.*corrupt"):
        SAE.load_from_disk(tmp_path)
    make_sae("standard").save_model(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json.*not valid JSON"):
        SAE.load_from_disk(tmp_path)


def test_shape_mismatch_between_cfg_and_weights(tmp_path):
    make_sae("standard").save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = D_SAE * 2
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"W_enc.*\(12, 40\).*\(12, 80\)"):
        SAE.load_from_disk(tmp_path)


def test_wrong_architecture_keys(tmp_path):
    make_sae("standard").save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["architecture"] = "jumprelu"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing \['threshold'\]"):
        SAE.load_from_disk(tmp_path)


def test_public_api_exports():
    for name in ("SAE", "SAEConfig", "SAEMetadata", "models"):
        assert hasattr(nnsae, name)


def test_saved_files_get_the_permissions_a_plain_open_gives(tmp_path):
    # Atomic writes go through mkstemp (mode 0600); saved SAEs must be as readable as any file the user writes.
    import os

    sae = SAE.from_config(SAEConfig(d_in=8, d_sae=16, architecture="standard"))
    sae.save_model(tmp_path / "sae")
    (tmp_path / "plain").write_text("x")
    expected = os.stat(tmp_path / "plain").st_mode & 0o777
    for name in ("cfg.json", "sae_weights.safetensors"):
        assert os.stat(tmp_path / "sae" / name).st_mode & 0o777 == expected, name
