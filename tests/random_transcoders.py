"""Random transcoders for tests: a cross-layer transcoder and SAELens-layout per-layer transcoder SAEs."""

from __future__ import annotations

import torch

from nnsae import SAE, SAEConfig
from nnsae.circuits import CrossLayerTranscoder


def random_clt(n_layers: int, d_model: int, d_tc: int, seed: int = 1, b_enc_shift: float = 0.0,
               scan: str | None = None) -> CrossLayerTranscoder:
    """A JumpReLU CLT from `mlp.hook_in` to `hook_mlp_out` (b_enc shifted by `b_enc_shift`: more negative, sparser)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    return CrossLayerTranscoder(
        r(n_layers, d_tc, d_model, scale=0.4), [r(d_tc, n_layers - i, d_model, scale=0.15) for i in range(n_layers)],
        r(n_layers, d_tc, scale=0.3) + b_enc_shift, r(n_layers, d_model, scale=0.1), activation="jumprelu",
        threshold=r(n_layers, d_tc, scale=0.1).abs(), feature_input_hook="mlp.hook_in",
        feature_output_hook="hook_mlp_out", scan=scan)


def saelens_transcoder_saes(architecture: str, n_layers: int, d_model: int, d_tc: int, scale: float) -> list[SAE]:
    """One SAELens transcoder per layer (`blocks.L.mlp.hook_in` → `blocks.L.hook_mlp_out`), parameters drawn from the
    global generator (× `scale`; thresholds made positive)."""
    saes = []
    for layer in range(n_layers):
        cfg = SAEConfig(architecture=architecture, d_in=d_model, d_sae=d_tc, d_out=d_model,
                        apply_b_dec_to_input=False)
        cfg.metadata.hook_name = f"blocks.{layer}.mlp.hook_in"
        cfg.metadata.hook_name_out = f"blocks.{layer}.hook_mlp_out"
        sae = SAE.from_config(cfg)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * scale)
            if hasattr(sae, "threshold"):
                sae.threshold.abs_()
        saes.append(sae)
    return saes
