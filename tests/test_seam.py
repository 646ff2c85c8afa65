"""The seam to nnsight: every private internal is listed and present, only nnsae/seam.py touches them, and the one
splice computation makes the inline `splice()` equal the mounted `attach` for every architecture and reshape."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nnsight
import pytest
import torch
from nnsight.intervention.interleaver import Interleaver

from nnsae import SAE, SAEConfig, seam
from nnsae.architectures import ARCHITECTURES
from nnsae.attachment import attach, splice
from tests.tiny_models import D_MODEL, tiny_model, tiny_tokens

PACKAGE = Path(seam.__file__).parent
IDS = tiny_tokens(batch=2, seq=8)


def test_every_listed_internal_exists_in_this_nnsight():
    assert seam.missing_internals() == []
    assert set(seam.INTERNALS) >= {"Interleaver.cancel", "Envoy._update", "Controller", "Mediator.current"}


def test_a_changed_internal_is_named(monkeypatch):
    monkeypatch.delattr(Interleaver, "check_dangling_mediators")
    missing = seam.missing_internals()
    assert missing == [f"Interleaver.check_dangling_mediators: {seam.INTERNALS['Interleaver.check_dangling_mediators']}"]


# What only the seam may do: import nnsight's internal packages, or touch these private attributes.
PRIVATE = re.compile(r"\._module\b|_hf_hook|\._update\(|_forward(_pre)?_hooks|_global_forward|sys\._getframe|"
                     r"\binterleaver\b|\bMediator\b|\bController\b|\._version\b|\._modules\b|\._parameters\b|"
                     r"\._buffers\b|torch\._C\b|torch\.ops\.aten\._")


def test_only_the_seam_touches_nnsight_and_torch_internals():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "seam.py" and path.parent == PACKAGE:
            continue
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nnsight."):
                offenders.append(f"{path.relative_to(PACKAGE)}: from {node.module} import ...")
            if isinstance(node, ast.Import):
                offenders += [f"{path.relative_to(PACKAGE)}: import {a.name}" for a in node.names
                              if a.name.startswith("nnsight.")]
        for lineno, line in enumerate(source.splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE.search(code) and not code.lstrip().startswith(('"', "'")):
                offenders.append(f"{path.relative_to(PACKAGE)}:{lineno}: {line.strip()}")
    assert offenders == []


# ---------------------------------------------------------------------------------------------------------------
# splice() == attach, for every architecture and reshape
# ---------------------------------------------------------------------------------------------------------------

TRANSCODERS = {"transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder", "topk_transcoder",
               "topk_skip_transcoder"}


def make_sae(architecture: str) -> tuple[SAE, dict]:
    cfg = dict(architecture=architecture, d_in=D_MODEL, d_sae=96)
    if architecture in TRANSCODERS:
        cfg.update(d_out=D_MODEL, apply_b_dec_to_input=False,
                   metadata={"hook_name": "blocks.1.mlp.hook_in", "hook_name_out": "blocks.1.hook_mlp_out"})
    else:
        cfg["metadata"] = {"hook_name": "blocks.1.hook_resid_post"}
    if "topk" in architecture:
        cfg["k"] = 8
    sae = SAE.from_config(SAEConfig(**cfg))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(0.01 * noise.abs() if name == "threshold" else 0.2 * noise)
    return sae, cfg


def hook_z_sae(architecture: str) -> SAE:
    cfg = dict(architecture=architecture, d_in=D_MODEL, d_sae=96, reshape_activations="hook_z",
               metadata={"hook_name": "blocks.1.attn.hook_z"})
    if architecture in ("topk", "abstopk"):
        cfg["k"] = 8
    sae = SAE.from_config(SAEConfig(**cfg))
    torch.manual_seed(6)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(0.01 * torch.rand(p.shape) if name == "threshold" else 0.2 * torch.randn(p.shape))
    return sae


CASES = [(a, "none") for a in sorted(ARCHITECTURES)] + [(a, "hook_z") for a in ("standard", "jumprelu", "topk")]


@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("architecture,reshape", CASES)
def test_inline_splice_equals_attach(architecture, reshape, use_error_term):
    sae = hook_z_sae(architecture) if reshape == "hook_z" else make_sae(architecture)[0]
    model = nnsight.NNsight(tiny_model("llama"))
    clean = tiny_model("llama")(IDS).logits.detach()
    ablate = torch.arange(0, 48)

    def edit(features: torch.Tensor) -> None:
        features[..., ablate] = 0

    with torch.no_grad():
        with model.trace(IDS):
            h = attach(model, sae, use_error_term=use_error_term)
            mounted_feats = h.hook_sae_acts_post.output.save()
            h.hook_sae_acts_post.output[..., ablate] = 0
            mounted = model.output.logits.save()
        with model.trace(IDS):
            inline_feats = splice(model, sae, use_error_term=use_error_term, edit=edit).save()
            inline = model.output.logits.save()
    torch.testing.assert_close(inline, mounted, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inline_feats, mounted_feats, rtol=1e-6, atol=1e-6)
    assert (mounted - clean).abs().max() > 1e-4  # the splice and the ablation matter


@pytest.mark.parametrize("with_op", [True, False])
def test_row_dots_equal_plain_dot_products(monkeypatch, with_op):
    """seam.row_dots (torch's private per-sample-weight kernel, or the chunked gather where torch lacks it) against
    float64 dot products written out here."""
    if not with_op:
        monkeypatch.setattr(seam, "_per_sample_weights_op", lambda: None)
    g = torch.Generator().manual_seed(0)
    rows, weight = torch.randn(6, 10, generator=g), torch.randn(9, 10, generator=g)
    row_of = torch.arange(6).repeat_interleave(3)
    cols = torch.randint(0, 9, (18,), generator=g)
    got = seam.row_dots(rows, weight, cols, torch.arange(0, 18, 3), row_of)
    want = (rows.double()[row_of] * weight.double()[cols]).sum(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
