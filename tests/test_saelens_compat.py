"""Files and math against SAELens 6 itself (installed by the test extra): both directions, every architecture."""

from __future__ import annotations

import json

import pytest
import torch

from nnsae import SAE, SAEConfig
from tests.test_saes import ARCHS, LEGACY_CASES, TRANSCODERS, make_sae

sae_lens = pytest.importorskip("sae_lens", reason="the compat tests need the `test` extra (sae-lens)")


def saelens_outputs(sl_sae, x):
    with torch.no_grad():
        return sl_sae.encode(x), sl_sae(x)


VARIANTS = [(arch, {}) for arch in ARCHS] + [
    ("topk", {"rescale_acts_by_decoder_norm": True}),
    ("standard", {"normalize_activations": "constant_norm_rescale"}),
    ("jumprelu", {"normalize_activations": "layer_norm"}),
    ("standard", {"reshape_activations": "hook_z"}),
]


@pytest.mark.parametrize("arch,overrides", VARIANTS)
def test_nnsae_files_load_in_saelens_with_identical_outputs(arch, overrides, tmp_path):
    sae = make_sae(arch, **overrides)
    sae.cfg.metadata.hook_name = "blocks.1.attn.hook_z" if "hook_z" in str(overrides) else "blocks.1.hook_resid_pre"
    sae.cfg.metadata.hf_hook_name = "model.layers.1.input"
    sae.save_model(tmp_path)
    sl = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert sl.cfg.architecture() == arch
    assert sl.cfg.metadata.hf_hook_name == "model.layers.1.input"
    x = torch.randn(4, 3, 4) if "hook_z" in str(overrides) else torch.randn(4, sae.cfg.d_in)
    f_sl, out_sl = saelens_outputs(sl, x)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f_sl, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sae(x), out_sl, atol=1e-6, rtol=1e-6)


def _saelens_sae(arch: str, overrides: dict, seed: int = 1):
    cfg = SAEConfig(**{**make_sae(arch, **overrides).cfg.to_dict(), "metadata": {}}).to_dict()
    hook = "blocks.0.attn.hook_z" if overrides.get("reshape_activations") == "hook_z" else "blocks.0.hook_resid_post"
    cfg["metadata"] = {"hook_name": hook, "model_name": "tiny", "custom_key": [1, 2]}
    sl = sae_lens.SAE.from_dict(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sl.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        if hasattr(sl, "threshold"):
            sl.threshold.copy_(torch.rand(sl.cfg.d_sae, generator=g) * 0.3)
    return sl


@pytest.mark.parametrize("arch,overrides", VARIANTS)
def test_saelens_files_load_in_nnsae_with_identical_outputs(arch, overrides, tmp_path):
    sl = _saelens_sae(arch, overrides)
    sl.save_model(str(tmp_path))
    sparsity = torch.randn(sl.cfg.d_sae)
    from safetensors.torch import save_file
    save_file({"sparsity": sparsity}, tmp_path / "sparsity.safetensors")
    sae = SAE.load_from_disk(tmp_path)
    assert sae.cfg.architecture == arch and sae.cfg.metadata.custom_key == [1, 2]
    assert torch.equal(sae.log_feature_sparsity, sparsity)
    x = torch.randn(4, 3, 4) if "hook_z" in str(overrides) else torch.randn(4, sl.cfg.d_in)
    f_sl, out_sl = saelens_outputs(sl, x)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f_sl, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sae(x), out_sl, atol=1e-6, rtol=1e-6)
    # and back: our re-save loads in SAELens with the same config
    sae.save_model(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "cfg.json").read_text())
    original = json.loads((tmp_path / "cfg.json").read_text())
    assert again == original


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in TRANSCODERS])
def test_error_term_matches_saelens(arch):
    sl = _saelens_sae(arch, {})
    sl.use_error_term = True
    sae = SAE.from_dict(sl.cfg.to_dict(), {k: v.clone() for k, v in sl.state_dict().items()})
    x = torch.randn(5, sl.cfg.d_in)
    ablate = lambda act, hook: act * 0  # noqa: E731
    sl.add_hook("hook_sae_acts_post", ablate)
    handle = sae.hook_sae_acts_post.register_forward_hook(lambda m, i, o: o * 0)
    with torch.no_grad():
        torch.testing.assert_close(sae(x, use_error_term=True), sl(x), atol=1e-6, rtol=1e-6)
    handle.remove()


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "jumprelu_transcoder"])
def test_folding_matches_saelens(arch):
    sl = _saelens_sae(arch, {})
    sae = SAE.from_dict(sl.cfg.to_dict(), {k: v.clone() for k, v in sl.state_dict().items()})
    sl.fold_W_dec_norm()
    sae.fold_W_dec_norm()
    sl.fold_activation_norm_scaling_factor(1.7)
    sae.fold_activation_norm_scaling_factor(1.7)
    for k, v in sl.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[k], v)


@pytest.mark.parametrize("legacy,expected", LEGACY_CASES)
def test_legacy_migration_matches_saelens(legacy, expected):
    from nnsae.config import migrate_legacy_config
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    ours = SAEConfig.from_dict(migrate_legacy_config(legacy)).to_dict()
    theirs = sae_lens.SAE.from_dict(handle_config_defaulting(dict(legacy))).cfg.to_dict()
    theirs["metadata"]["sae_lens_version"] = ours["metadata"]["sae_lens_version"]  # ours marks the 6.x form
    theirs["dtype"] = theirs["dtype"].removeprefix("torch.")  # SAELens keeps the spelling it was given
    assert ours == theirs
