"""Transcoder sets and CLTs attached in a trace, against a manual replacement with plain torch forward hooks.

The reference replaces each MLP's output (a forward hook on the MLP module, or on Gemma's post-MLP norm) with
the transcoder math written out here from the weights, reading the MLP input with a forward pre-hook.
"""

from __future__ import annotations

import contextlib
import warnings

import nnsight
import pytest
import torch

import nnsae
from nnsae.attachment import run_with_saes
from nnsae.attachment import attach_transcoders, layer_saes, splice_transcoders
from nnsae.circuits import CrossLayerTranscoder, SingleLayerTranscoder, TranscoderSet
from tests import random_transcoders
from tests.test_attach import make_tokenizer
from tests.tiny_models import D_MODEL, N_LAYERS, tiny_model, tiny_tokens

warnings.filterwarnings("ignore", message=".*LanguageModel is deprecated.*")

D_TC = 24
IDS = tiny_tokens(batch=2, seq=7)
ATOL = 2e-5


def random_set(seed: int = 0, activation: str = "jumprelu", skip: bool = False) -> TranscoderSet:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    return TranscoderSet([SingleLayerTranscoder(
        r(D_TC, D_MODEL, scale=0.4), r(D_TC, D_MODEL, scale=0.2), r(D_TC, scale=0.3), r(D_MODEL, scale=0.1),
        activation=activation, threshold=r(D_TC, scale=0.1).abs() if activation == "jumprelu" else None,
        k=5 if activation == "topk" else None, W_skip=r(D_MODEL, D_MODEL, scale=0.05) if skip else None)
        for _ in range(N_LAYERS)], "mlp.hook_in", "hook_mlp_out")


def random_clt(seed: int = 1) -> CrossLayerTranscoder:
    return random_transcoders.random_clt(N_LAYERS, D_MODEL, D_TC, seed)


def lm(hf):
    return nnsight.LanguageModel(hf, tokenizer=make_tokenizer())


# ---- the reference: weights → math, placed with torch hooks --------------------------------------------------------


def ref_acts(tc, layer: int, x: torch.Tensor) -> torch.Tensor:
    if isinstance(tc, CrossLayerTranscoder):
        W, b, th, kind, k = tc.W_enc[layer], tc.b_enc[layer], tc.threshold[layer], "jumprelu", None
    else:
        t = tc[layer]
        W, b, th, kind, k = t.W_enc, t.b_enc, t.threshold, t.activation, t.k
    pre = x @ W.T + b
    if kind == "jumprelu":
        return pre * (pre > th)
    if kind == "relu":
        return torch.relu(pre)
    values, indices = pre.topk(k, -1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def mlp_modules(model, family: str) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(module whose input is the MLP input, module whose output is hook_mlp_out) per layer."""
    layers = model.model.layers
    out = "post_feedforward_layernorm" if family in ("gemma2", "gemma3") else "mlp"
    return [(layer.mlp, getattr(layer, out)) for layer in layers]


@contextlib.contextmanager
def manual_replacement(model, family: str, tc, layers=None, edit=None, error=False):
    """Every chosen layer's MLP output replaced by the transcoder output (plus the true-minus-clean error when
    `error`); `edit(layer, acts)` edits activations (a CLT's edits reach every later layer)."""
    layers = list(range(N_LAYERS)) if layers is None else layers
    clt = isinstance(tc, CrossLayerTranscoder)
    inputs, acts, clean_acts, handles = {}, {}, {}, []
    for layer, (mlp, out_module) in enumerate(mlp_modules(model, family)):
        if layer not in layers:
            continue

        def pre(module, args, layer=layer):
            inputs[layer] = args[0]

        def post(module, args, output, layer=layer):
            x = inputs[layer]
            a = ref_acts(tc, layer, x)
            clean_acts[layer] = a
            acts[layer] = edit(layer, a.clone()) if edit is not None else a

            def recon(source):
                if clt:
                    return sum(source[s] @ tc.W_dec[s][:, layer - s] for s in range(layer + 1)) + tc.b_dec[layer]
                t = tc[layer]
                skip = x @ t.W_skip.T if t.W_skip is not None else 0
                return source[layer] @ t.W_dec + t.b_dec + skip

            new = recon(acts)
            return new + (output - recon(clean_acts)) if error else new

        handles += [mlp.register_forward_pre_hook(pre), out_module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---- tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,activation,skip", [("llama", "jumprelu", True), ("gemma2", "topk", False),
                                                    ("qwen2", "relu", False)])
def test_set_replaces_mlp_outputs_like_manual_hooks(family, activation, skip):
    tc = random_set(0, activation, skip)
    ref = tiny_model(family)
    with torch.no_grad():
        plain = ref(IDS).logits
        with manual_replacement(ref, family, tc):
            want = ref(IDS).logits
        with manual_replacement(ref, family, tc, layers=[1]):
            want_one = ref(IDS).logits
    assert (want - plain).abs().max() > 1e-3
    model = lm(tiny_model(family))
    with torch.no_grad():
        got = run_with_saes(model, IDS, saes=layer_saes(tc))
        got_one = run_with_saes(model, IDS, saes=layer_saes(tc, layers=[1]))
        with model.trace(IDS):
            att = attach_transcoders(model, tc, use_error_term=True)
            feats = nnsight.save([])
            for layer in range(N_LAYERS):
                feats.append(att[layer].hook_sae_acts_post.output)
            logits = model.output.logits.save()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(got_one, want_one, atol=ATOL, rtol=1e-4)
    assert torch.equal(logits, plain)  # the error term keeps the model exact while nothing is edited
    ref_inputs = {}
    hooks = [mlp.register_forward_pre_hook(lambda m, a, layer=layer: ref_inputs.__setitem__(layer, a[0]))
             for layer, (mlp, _) in enumerate(mlp_modules(ref, family))]
    with torch.no_grad():
        ref(IDS)
    for h in hooks:
        h.remove()
    for layer in range(N_LAYERS):
        torch.testing.assert_close(feats[layer], ref_acts(tc, layer, ref_inputs[layer]), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_clt_edits_reach_later_layers(family):
    tc = random_clt()
    ref = tiny_model(family)

    def ablate(layer, a):
        if layer == 0:
            a[..., :8] = 0
        return a

    with torch.no_grad():
        plain = ref(IDS).logits
        with manual_replacement(ref, family, tc):
            want = ref(IDS).logits
        with manual_replacement(ref, family, tc, edit=ablate, error=True):
            want_edit = ref(IDS).logits
    assert (want_edit - plain).abs().max() > 1e-4
    model = lm(tiny_model(family))
    with torch.no_grad():
        torch.testing.assert_close(run_with_saes(model, IDS, saes=layer_saes(tc)), want, atol=ATOL, rtol=1e-4)
        with model.trace(IDS):
            att = attach_transcoders(model, tc, use_error_term=True)
            att[0].hook_sae_acts_post.output[..., :8] = 0
            recons = nnsight.save([])
            for layer in range(N_LAYERS):
                recons.append(att[layer].hook_sae_recons.output)
            logits = model.output.logits.save()
    torch.testing.assert_close(logits, want_edit, atol=ATOL, rtol=1e-4)
    assert len(recons) == N_LAYERS and nnsae.attached(model) == []  # trace-scoped
    with pytest.raises(ValueError, match="every MLP"):
        layer_saes(tc, layers=[0, 1])


def test_generation_and_steering_a_feature():
    tc = random_set(2, "jumprelu")
    ref = tiny_model("llama")
    prompt = IDS[:1]
    kw = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4, pad_token_id=0)

    def steer(layer, a):
        if layer == 2:
            a[..., 3] = a[..., 3] + 5.0
        return a

    with torch.no_grad():
        plain = ref.generate(prompt, **kw)
        with manual_replacement(ref, "llama", tc, edit=steer, error=True):
            want = ref.generate(prompt, **kw)
    assert not torch.equal(plain, want)
    model = lm(tiny_model("llama"))
    att = attach_transcoders(model, tc, use_error_term=True)  # persistent: every generation step
    try:
        with torch.no_grad(), model.generate(prompt, **kw) as tracer:
            tokens = tracer.result.save()
        assert torch.equal(tokens, plain)
        with torch.no_grad(), model.generate(prompt, **kw) as tracer:
            for _ in tracer.iter[:4]:
                att[2].hook_sae_acts_post.output[..., 3] += 5.0
            tokens = tracer.result.save()
        assert torch.equal(tokens, want)
    finally:
        att.detach()
    assert nnsae.attached(model) == []


def test_inline_splice_matches_attach():
    tc = random_clt()
    model = nnsight.NNsight(tiny_model("llama"))
    saes = layer_saes(tc)
    with torch.no_grad():
        with model.trace(IDS):
            feats = splice_transcoders(model, saes, use_error_term=True,
                                       edit={0: lambda f: f.index_fill_(-1, torch.arange(8), 0)})
            feats = nnsight.save(feats)
            inline = model.output.logits.save()
        with model.trace(IDS):
            att = attach_transcoders(model, tc, use_error_term=True)
            att[0].hook_sae_acts_post.output[..., :8] = 0
            mounted = model.output.logits.save()
    assert torch.equal(inline, mounted)
    assert (feats[0][..., :8] == 0).all() and feats[1].abs().sum() > 0


def test_saelens_transcoder_saes_attach_as_a_set():
    saes = random_transcoders.saelens_transcoder_saes("transcoder", N_LAYERS, D_MODEL, D_TC, scale=0.2)
    tc = TranscoderSet.from_saes(saes)
    ref = tiny_model("llama")
    with torch.no_grad(), manual_replacement(ref, "llama", tc):
        want = ref(IDS).logits
    model = lm(tiny_model("llama"))
    with torch.no_grad():
        with model.trace(IDS):
            attach_transcoders(model, saes)
            logits = model.output.logits.save()
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=1e-4)


def test_remote_body_runs_a_clt_by_value():
    """The inline path in nnsight's real remote payload, run by a process that cannot import nnsae."""
    from nnsight.modeling.transformers import TransformersModel

    from tests.remote_server import CaptureBackend, make_tokenizer as server_tokenizer, run_server

    tc = random_clt()
    model = TransformersModel(tiny_model("llama"), tokenizer=server_tokenizer())
    saes = layer_saes(tc)
    blobs, local = [], None
    for backend in (None, CaptureBackend()):
        kw = {} if backend is None else {"backend": backend}
        with model.trace(IDS, **kw):
            splice_transcoders(model, saes, use_error_term=True,
                               edit={0: lambda f: f.index_fill_(-1, torch.arange(8), 0)})
            logits = model.output.logits.save()
        if backend is None:
            local = logits
        else:
            blobs.append(backend.blob)
    out = run_server({"clt": {"blob": blobs[0], "family": "llama", "wrapper": "transformers"}})["clt"]
    assert "error" not in out, out.get("traceback")
    assert torch.equal(out["values"]["logits"], local)
    assert (local - tiny_model("llama")(IDS).logits).abs().max() > 1e-4  # the edit matters
