"""nnsae.attach against ground truth computed here with plain torch hooks on a raw (never wrapped) HF model.

The reference SAE math is written in this file from the SAELens spec (ReLU SAE / transcoder), not taken from
nnsae, and the reference splice is an ordinary torch forward (pre-)hook on a fresh copy of the same tiny model.
"""

from __future__ import annotations

import contextlib
import warnings

import nnsight
import pytest
import torch
import transformers
from nnsight.intervention.interleaver import OutOfOrderError
from nnsight.modeling.transformers import TransformersModel

import nnsae
from nnsae import SAE, SAEConfig
from nnsae.attachment import (
    SAEOrderError, attach, attached, detach, feature_attribution, run_with_cache_with_saes, run_with_saes, saes,
    steer,
)
from tests.tiny_models import D_MODEL, VOCAB, tiny_model, tiny_tokens

warnings.filterwarnings("ignore", message=".*LanguageModel is deprecated.*")

FAMILIES = ["gpt2", "llama", "gemma2"]
LAYERS = {"gpt2": "transformer.h", "llama": "model.layers", "gemma2": "model.layers"}
ATOL = 1e-5
PAD, BOS, EOS = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------------
# fixtures: models, tokenizer, SAEs
# ---------------------------------------------------------------------------------------------------------------


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def wrap(hf: torch.nn.Module, kind: str):
    if kind == "nnsight":
        return nnsight.NNsight(hf)
    if kind == "language":
        return nnsight.LanguageModel(hf, tokenizer=make_tokenizer())
    return TransformersModel(hf, tokenizer=make_tokenizer())


def make_sae(d_in: int, d_sae: int = 96, seed: int = 1, hook_name: str | None = None, **cfg) -> SAE:
    cfg.setdefault("architecture", "standard")
    sae = SAE.from_config(SAEConfig(d_in=d_in, d_sae=d_sae, metadata={"hook_name": hook_name}, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return sae


def ref_encode(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    x = x.to(sae.W_enc.dtype)
    if sae.cfg.apply_b_dec_to_input:
        x = x - sae.b_dec
    return torch.relu(x @ sae.W_enc + sae.b_enc)


def ref_decode(sae: SAE, f: torch.Tensor) -> torch.Tensor:
    return f @ sae.W_dec + sae.b_dec


@contextlib.contextmanager
def torch_hook(module: torch.nn.Module, io: str, fn):
    """Reference splice: replace the module's output[0] / first input with fn(activation)."""
    if io == "output":
        def hook(mod, args, out):
            return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
        handle = module.register_forward_hook(hook)
    else:
        def hook(mod, args, kwargs):
            return (fn(args[0]), *args[1:]), kwargs
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def layer(hf: torch.nn.Module, family: str, i: int) -> torch.nn.Module:
    return hf.get_submodule(f"{LAYERS[family]}.{i}")


def envoy_layer(model, family: str, i: int):
    return model.get(f"{LAYERS[family]}.{i}")


def fingerprint(hf: torch.nn.Module) -> dict:
    """Everything nnsae could leave behind: module names, instance attributes, torch hooks."""
    out = {}
    for name, module in hf.named_modules():
        hooks = {attr: len(getattr(module, attr)) for attr in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
            "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")}
        out[name] = (type(module).__name__, sorted(module.__dict__), sorted(module._modules), hooks)
    return out


IDS = tiny_tokens(batch=2, seq=8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread when the machine is busy; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# splice, error term, ablation, observe
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nnsight", "language", "transformers"])
@pytest.mark.parametrize("family", FAMILIES)
def test_splice_matches_reference(family, kind):
    ref_hf = tiny_model(family)
    sae = make_sae(D_MODEL, hook_name=f"blocks.1.hook_resid_post")
    with torch.no_grad(), torch_hook(layer(ref_hf, family, 1), "output", lambda a: ref_decode(sae, ref_encode(sae, a))):
        want = ref_hf(IDS).logits
    with torch.no_grad():
        ref_act = ref_hf.get_submodule(f"{LAYERS[family]}.1")
        feats_want = []
        with torch_hook(ref_act, "output", lambda a: feats_want.append(ref_encode(sae, a)) or a):
            ref_hf(IDS)

    hf = tiny_model(family)
    model = wrap(hf, kind)
    with torch.no_grad(), model.trace(IDS):
        h = attach(model, sae)
        feats = h.hook_sae_acts_post.output.save()
        tree = envoy_layer(model, family, 1).sae.hook_sae_acts_post.output.save()  # reachable from the tree too
        recons = h.output.save()
        out = envoy_layer(model, family, 1).output  # after the SAE: the spliced value
        out = (out[0] if isinstance(out, tuple) else out).save()
        logits = model.output.logits.save()
    torch.testing.assert_close(feats, feats_want[0], atol=ATOL, rtol=0)
    assert tree is feats
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
    assert torch.equal(out, recons)
    assert (logits - hf(IDS).logits).abs().max() > 1e-2  # the splice really changed something
    assert attached(model) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_error_term_is_identity_and_ablation_matches(family):
    ref_hf = tiny_model(family)
    with torch.no_grad():
        clean = ref_hf(IDS).logits
    sae = make_sae(D_MODEL)
    feature = slice(0, 24)

    def ablated(a):  # SAELens: decode(edited features) + (a - clean reconstruction)
        f = ref_encode(sae, a)
        clean_recon = ref_decode(sae, f)
        f = f.clone()
        f[..., feature] = 0
        return ref_decode(sae, f) + (a - clean_recon)

    with torch.no_grad(), torch_hook(layer(ref_hf, family, 1), "output", ablated):
        want = ref_hf(IDS).logits

    model = nnsight.NNsight(tiny_model(family))
    h = attach(model, sae, hook=f"{LAYERS[family]}.1", use_error_term=True)
    assert h.scope == "persistent"
    with torch.no_grad(), model.trace(IDS):
        logits = model.output.logits.save()
    assert torch.equal(logits, clean)  # bit for bit while nothing is edited
    with torch.no_grad(), model.trace(IDS):
        h.hook_sae_acts_post.output[:, :, feature] = 0
        err = h.hook_sae_error.output.save()  # after acts_post: hook points are read in execution order
        logits_ablate = model.output.logits.save()
    torch.testing.assert_close(logits_ablate, want, atol=ATOL, rtol=0)
    assert (logits_ablate - clean).abs().max() > 1e-3
    assert err.shape == (2, 8, D_MODEL)
    h.detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_in_splice_mode(family):
    ref_hf = tiny_model(family)
    sae = make_sae(D_MODEL)

    def ablated(a):
        f = ref_encode(sae, a).clone()
        f[..., :10] = 0
        return ref_decode(sae, f)

    with torch.no_grad(), torch_hook(layer(ref_hf, family, 0), "output", ablated):
        want = ref_hf(IDS).logits
    model = nnsight.NNsight(tiny_model(family))
    with torch.no_grad(), model.trace(IDS):
        h = attach(model, sae, hook=f"{LAYERS[family]}.0")
        h.hook_sae_acts_post.output[:, :, :10] = 0
        logits = model.output.logits.save()
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)


def test_observe_mode_leaves_model_untouched():
    family = "llama"
    hf = tiny_model(family)
    clean = hf(IDS).logits
    sae = make_sae(D_MODEL)
    model = nnsight.NNsight(hf)
    with torch.no_grad(), model.trace(IDS):
        h = attach(model, sae, hook="model.layers.1", mode="observe")
        feats = h.hook_sae_acts_post.output.save()
        logits = model.output.logits.save()
    assert torch.equal(logits, clean)
    act = []
    ref = tiny_model(family)
    with torch.no_grad(), torch_hook(layer(ref, family, 1), "output", lambda a: act.append(a) or a):
        ref(IDS)
    torch.testing.assert_close(feats, ref_encode(sae, act[0]), atol=ATOL, rtol=0)


def test_input_hook_splices_before_the_module():
    family = "llama"
    ref_hf = tiny_model(family)
    sae = make_sae(D_MODEL, hook_name="blocks.2.hook_resid_pre")
    with torch.no_grad(), torch_hook(layer(ref_hf, family, 2), "input", lambda a: ref_decode(sae, ref_encode(sae, a))):
        want = ref_hf(IDS).logits
    model = nnsight.NNsight(tiny_model(family))
    with torch.no_grad(), model.trace(IDS):
        h = attach(model, sae)
        assert h.spec.write.io == "input"
        recons = h.output.save()
        seen = model.model.layers[2].input.save()  # the layer's input is the spliced value
        logits = model.output.logits.save()
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
    assert torch.equal(seen, recons)


def test_hook_z_and_centered_hook_points():
    family = "llama"
    zsae = make_sae(D_MODEL, reshape_activations="hook_z", hook_name="blocks.1.attn.hook_z")
    csae = make_sae(D_MODEL, seed=3)

    def centered(a):
        m = a.mean(-1, keepdim=True)
        return ref_decode(csae, ref_encode(csae, a - m)) + m

    ref_hf = tiny_model(family)
    with torch.no_grad(), torch_hook(ref_hf.model.layers[1].self_attn.o_proj, "input",
                                     lambda a: ref_decode(zsae, ref_encode(zsae, a))), \
            torch_hook(layer(ref_hf, family, 2), "output", centered):
        want = ref_hf(IDS).logits
    hf = tiny_model(family)
    model = nnsight.NNsight(hf)
    point = nnsae.hooks.HookPoint("model.layers.2", "output", center=True)
    with torch.no_grad(), model.trace(IDS):
        hz = attach(model, zsae)  # flat o_proj input; the SAE sees [.., n_heads, d_head]
        attach(model, csae, hook=point)
        z_in = hz.hook_sae_input.output.save()
        logits = model.output.logits.save()
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
    assert z_in.shape == (2, 8, D_MODEL)
    h = attach(model, csae, hook=point, use_error_term=True)
    with torch.no_grad():
        assert torch.equal(hf(IDS).logits, tiny_model(family)(IDS).logits)
    h.detach()


def test_stop_after_reading_features():
    hf = tiny_model("gpt2")
    model = nnsight.NNsight(hf)
    before = fingerprint(hf)
    with torch.no_grad(), model.trace(IDS) as tracer:
        h = attach(model, make_sae(D_MODEL), hook="transformer.h.0")
        feats = h.hook_sae_acts_post.output.save()
        tracer.stop()
    assert feats.shape == (2, 8, 96)
    assert fingerprint(hf) == before and attached(model) == []


# ---------------------------------------------------------------------------------------------------------------
# steering, several SAEs, transcoders
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_steering(family):
    ref_hf = tiny_model(family)
    sae = make_sae(D_MODEL)
    path = f"{LAYERS[family]}.1"
    vec = 4.0 * sae.W_dec[7] - 2.0 * sae.W_dec[9]
    with torch.no_grad():
        with torch_hook(layer(ref_hf, family, 1), "output", lambda a: a + vec):
            want_plain = ref_hf(IDS).logits
        with torch_hook(layer(ref_hf, family, 1), "output", lambda a: ref_decode(sae, ref_encode(sae, a)) + vec):
            want_spliced = ref_hf(IDS).logits
    hf = tiny_model(family)
    clean = hf(IDS).logits
    model = nnsight.NNsight(hf)
    with torch.no_grad(), model.trace(IDS):
        steer(model, sae, [7, 9], [4.0, -2.0], hook=path)
        logits = model.output.logits.save()
    torch.testing.assert_close(logits, want_plain, atol=ATOL, rtol=0)
    h = attach(model, sae, hook=path).steer(7, 4.0).steer(9, -2.0)
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, want_spliced, atol=ATOL, rtol=0)  # persistent: plain calls too
    h.detach()
    assert torch.equal(hf(IDS).logits, clean)


def test_two_saes_at_different_layers_and_chained_at_one_hook():
    family = "gpt2"
    ref_hf = tiny_model(family)
    a, b, c = make_sae(D_MODEL, seed=1), make_sae(D_MODEL, seed=2), make_sae(D_MODEL, seed=3)
    rec = lambda s: (lambda x: ref_decode(s, ref_encode(s, x)))  # noqa: E731
    with torch.no_grad(), torch_hook(layer(ref_hf, family, 0), "output", rec(a)), \
            torch_hook(layer(ref_hf, family, 2), "output", lambda x: rec(c)(rec(b)(x))):
        want = ref_hf(IDS).logits
    model = nnsight.NNsight(tiny_model(family))
    with torch.no_grad(), model.trace(IDS):
        ha = attach(model, a, hook="transformer.h.0")
        hb = attach(model, b, hook="transformer.h.2")
        hc = attach(model, c, hook="transformer.h.2", stack=True)  # same hook, asked to stack: chained after b
        names = nnsight.save((hb.name, hc.name))
        fa = ha.hook_sae_acts_post.output.save()
        fb = model.transformer.h[2].sae.hook_sae_acts_post.output.save()
        fc = model.transformer.h[2].sae_1.hook_sae_acts_post.output.save()
        logits = model.output.logits.save()
    assert names == ("sae", "sae_1")
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
    assert fa.shape == fb.shape == fc.shape == (2, 8, 96)


def test_a_second_sae_at_an_occupied_hook_replaces_the_first_as_in_saelens():
    """SAELens' add_sae overwrites the SAE at a hook; its saes()/run_with_saes restore the previous one after."""
    hf = tiny_model("gpt2")
    a = make_sae(D_MODEL, seed=1, hook_name="blocks.1.hook_resid_post")
    b = make_sae(D_MODEL, seed=2, hook_name="blocks.1.hook_resid_post")
    want = {}
    for name, s in (("a", a), ("b", b)):
        with torch.no_grad(), torch_hook(layer(hf, "gpt2", 1), "output", lambda x, s=s: ref_decode(s, ref_encode(s, x))):
            want[name] = hf(IDS).logits
    model = nnsight.NNsight(hf)
    with torch.no_grad():
        ha = attach(model, a)
        torch.testing.assert_close(nnsae.run_with_saes(model, IDS), want["a"], atol=ATOL, rtol=0)
        torch.testing.assert_close(nnsae.run_with_saes(model, IDS, saes=[b]), want["b"], atol=ATOL, rtol=0)
        assert nnsae.attached(model) == [ha]  # restored after the run
        torch.testing.assert_close(nnsae.run_with_saes(model, IDS), want["a"], atol=ATOL, rtol=0)
        hb = attach(model, b)  # persistent add at the same hook: replaces for good
        assert nnsae.attached(model) == [hb] and not ha.attached
        torch.testing.assert_close(nnsae.run_with_saes(model, IDS), want["b"], atol=ATOL, rtol=0)
        nnsae.detach(model, hooks=["blocks.1.hook_resid_post"])
        assert nnsae.attached(model) == []
        torch.testing.assert_close(nnsae.run_with_saes(model, IDS), tiny_model("gpt2")(IDS).logits, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
@pytest.mark.parametrize("use_error_term", [False, True])
def test_transcoder_reads_and_writes_at_different_hooks(family, use_error_term):
    d_sae = 80
    read = {"gpt2": "transformer.h.1.mlp.input", "gemma2": "model.layers.1.mlp.input"}[family]
    write = {"gpt2": "transformer.h.1.mlp", "gemma2": "model.layers.1.post_feedforward_layernorm"}[family]
    tc = make_sae(D_MODEL, d_sae=d_sae, architecture="transcoder", d_out=D_MODEL, apply_b_dec_to_input=False)
    spec = nnsae.hooks.HookSpec(read=nnsae.hooks.HookPoint(read.rsplit(".", 1)[0], "input"),
                                write=nnsae.hooks.HookPoint(write, "output"))
    ref_hf = tiny_model(family)
    with torch.no_grad():
        clean = ref_hf(IDS).logits
    captured = []

    def write_fn(out):
        recon = ref_decode(tc, ref_encode(tc, captured[-1]))
        if use_error_term:
            f = ref_encode(tc, captured[-1]).clone()
            f[..., 3] = 0
            return ref_decode(tc, f) + (out - recon)
        return recon

    with torch.no_grad(), torch_hook(ref_hf.get_submodule(spec.read.module), "input",
                                     lambda x: captured.append(x) or x), \
            torch_hook(ref_hf.get_submodule(write), "output", write_fn):
        want = ref_hf(IDS).logits
    model = nnsight.NNsight(tiny_model(family))
    h = attach(model, tc, hook=spec, use_error_term=use_error_term)
    with torch.no_grad(), model.trace(IDS):
        if use_error_term:
            h.hook_sae_acts_post.output[:, :, 3] = 0
        logits = model.output.logits.save()
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
    if use_error_term:
        with torch.no_grad(), model.trace(IDS):
            logits = model.output.logits.save()
        assert torch.equal(logits, clean)
    detach(model)
    assert attached(model) == []


# ---------------------------------------------------------------------------------------------------------------
# generation, gradients
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_runs_the_sae_every_step(family):
    prompt = IDS[:1]
    sae = make_sae(D_MODEL, seed=4)

    def ablate(a):
        f = ref_encode(sae, a).clone()
        f[..., :48] = 0
        return ref_decode(sae, f)

    ref_hf = tiny_model(family)
    kw = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4, pad_token_id=PAD)
    with torch.no_grad():
        plain = ref_hf.generate(prompt, **kw)
        with torch_hook(layer(ref_hf, family, 1), "output", ablate):
            want = ref_hf.generate(prompt, **kw)
    assert not torch.equal(plain, want)  # the ablation changes the greedy tokens

    model = wrap(tiny_model(family), "language")
    with torch.no_grad(), model.generate(prompt, **kw) as tracer:
        h = attach(model, sae, hook=f"{LAYERS[family]}.1")
        feats = nnsight.save([])
        for _ in tracer.iter[:4]:
            feats.append(h.hook_sae_acts_post.output)
            h.hook_sae_acts_post.output[:, :, :48] = 0
        tokens = tracer.result.save()
    assert torch.equal(tokens, want)
    assert [tuple(f.shape) for f in feats] == [(1, 8, 96), (1, 1, 96), (1, 1, 96), (1, 1, 96)]

    h = attach(model, sae, hook=f"{LAYERS[family]}.1", use_error_term=True)  # persistent: every step, no edits
    with torch.no_grad(), model.generate(prompt, **kw) as tracer:
        tokens = tracer.result.save()
    assert torch.equal(tokens, plain)
    h.detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_and_feature_attribution(family):
    sae = make_sae(D_MODEL, seed=5)
    target = 17

    def metric(logits):
        return logits[:, -1, target].sum()

    ref_hf = tiny_model(family)
    leaf = []

    def splice_leaf(a):
        f = ref_encode(sae, a).detach().requires_grad_(True)
        leaf.append(f)
        return ref_decode(sae, f) + (a - ref_decode(sae, ref_encode(sae, a))).detach()

    with torch_hook(layer(ref_hf, family, 1), "output", splice_leaf):
        m = metric(ref_hf(IDS[:1]).logits)
    (grad,) = torch.autograd.grad(m, leaf[0])
    want = (leaf[0] * grad).detach()[0]

    model = nnsight.NNsight(tiny_model(family))
    got = feature_attribution(model, sae, IDS[:1], metric_fn=metric, hook=f"{LAYERS[family]}.1")
    assert got.shape == (8, 96)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    assert all(p.grad is None for p in model._module.parameters()) and sae.W_enc.grad is None

    with model.trace(IDS[:1]):  # .grad on feature activations inside a trace
        h = attach(model, sae, hook=f"{LAYERS[family]}.1", use_error_term=True)
        acts = h.hook_sae_acts_post.output
        value = metric(model.output.logits)
        with value.backward():
            g = acts.grad.save()
        a = acts.save()
    torch.testing.assert_close((a * g).detach()[0], want, atol=ATOL, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# special tokens, dtype
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_error_term", [False, True])
def test_exclude_special_tokens(use_error_term):
    family = "llama"
    ids = IDS.clone()
    ids[:, 0] = BOS
    ids[1, :2] = PAD
    ids[0, 5] = EOS
    special = torch.isin(ids, torch.tensor([PAD, BOS, EOS]))[..., None]
    sae = make_sae(D_MODEL)

    def fn(a):
        f = ref_encode(sae, a).clone()
        clean = ref_decode(sae, f)
        f[..., 2] = 0
        out = ref_decode(sae, f) + ((a - clean) if use_error_term else 0)
        return torch.where(special, a, out)

    ref_hf = tiny_model(family)
    with torch.no_grad(), torch_hook(layer(ref_hf, family, 1), "output", fn):
        want = ref_hf(ids).logits
    model = wrap(tiny_model(family), "language")
    with torch.no_grad(), model.trace(ids):
        h = attach(model, sae, hook="model.layers.1", use_error_term=use_error_term, exclude_special_tokens=True)
        h.hook_sae_acts_post.output[:, :, 2] = 0
        if use_error_term:
            err = h.hook_sae_error.output.save()  # after acts_post: hook points in execution order
        out = model.model.layers[1].output.save()
        logits = model.output.logits.save()
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
    with torch.no_grad():
        act = []
        raw = tiny_model(family)
        with torch_hook(layer(raw, family, 1), "output", lambda a: act.append(a) or a):
            raw(ids)
    assert torch.equal(out[special.expand_as(out)], act[0][special.expand_as(out)])  # passed through exactly
    if use_error_term:
        assert torch.equal(err[special.expand_as(err)], torch.zeros_like(err)[special.expand_as(err)])
    model2 = nnsight.NNsight(tiny_model(family))  # explicit ids, no tokenizer
    with torch.no_grad(), model2.trace(ids):
        attach(model2, sae, hook="model.layers.1", use_error_term=use_error_term, exclude_special_tokens=[0, 1, 2])
        model2.model.layers[1].sae.hook_sae_acts_post.output[:, :, 2] = 0
        logits2 = model2.output.logits.save()
    torch.testing.assert_close(logits2, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bf16_model_with_fp32_sae(family):
    sae = make_sae(D_MODEL)
    ref_hf = tiny_model(family, dtype=torch.bfloat16)
    with torch.no_grad(), torch_hook(layer(ref_hf, family, 1), "output",
                                     lambda a: ref_decode(sae, ref_encode(sae, a.float())).to(a.dtype)):
        want = ref_hf(IDS).logits
    model = nnsight.NNsight(tiny_model(family, dtype=torch.bfloat16))
    with torch.no_grad(), model.trace(IDS):
        h = attach(model, sae, hook=f"{LAYERS[family]}.1")
        feats = h.hook_sae_acts_post.output.save()
        out = envoy_layer(model, family, 1).output
        out = (out[0] if isinstance(out, tuple) else out).save()
        logits = model.output.logits.save()
    assert feats.dtype == torch.float32 and out.dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), want.float(), atol=1e-2, rtol=0)
    sae16 = make_sae(D_MODEL).to(torch.bfloat16)
    h = attach(model, sae16, hook=f"{LAYERS[family]}.1", use_error_term=True)
    with torch.no_grad():
        assert torch.equal(model._module(IDS).logits, tiny_model(family, dtype=torch.bfloat16)(IDS).logits)
    h.detach()


# ---------------------------------------------------------------------------------------------------------------
# exact removal
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_removal_is_exact_after_trace_detach_and_exception(family):
    hf = tiny_model(family)
    model = wrap(hf, "language")
    with torch.no_grad():
        clean = hf(IDS).logits
    before = fingerprint(hf)
    names = [n for n, _ in hf.named_modules()]
    sae = make_sae(D_MODEL)
    tc = make_sae(D_MODEL, architecture="transcoder", d_out=D_MODEL, apply_b_dec_to_input=False)
    spec = nnsae.hooks.HookSpec(read=nnsae.hooks.HookPoint(f"{LAYERS[family]}.0.mlp", "input"),
                                write=nnsae.hooks.HookPoint(f"{LAYERS[family]}.2", "input"))

    def check():
        assert fingerprint(hf) == before
        assert [n for n, _ in hf.named_modules()] == names
        assert not hf._forward_hooks and not hf._forward_pre_hooks
        assert attached(model) == []
        assert "cancel" not in model.interleaver.__dict__
        assert "check_dangling_mediators" not in model.interleaver.__dict__
        with torch.no_grad(), model.trace(IDS):
            logits = model.output.logits.save()
        assert torch.equal(logits, clean)
        assert torch.equal(hf(IDS).logits, clean)

    with torch.no_grad(), model.trace(IDS):  # trace-scoped, every kind of site
        attach(model, sae, hook=f"{LAYERS[family]}.1", exclude_special_tokens=True)
        attach(model, sae, hook=f"{LAYERS[family]}.1", use_error_term=True)
        attach(model, tc, hook=spec)
        logits = model.output.logits.save()
    assert not torch.equal(logits, clean)
    check()

    with pytest.raises(RuntimeError, match="boom"):  # exception inside the trace body
        with torch.no_grad(), model.trace(IDS):
            h = attach(model, sae, hook=f"{LAYERS[family]}.1")
            h.hook_sae_acts_post.output.save()
            raise RuntimeError("boom")
    check()

    attn = f"{LAYERS[family]}.1.{'attn' if family == 'gpt2' else 'self_attn'}"
    wrong = make_sae(32)  # width only known at the first call for an attention output
    with pytest.raises(ValueError, match=r"d_in=32.*width 64"):  # raised by the SAE mid-forward
        with torch.no_grad(), model.trace(IDS):
            attach(model, wrong, hook=attn)
            model.output.logits.save()
    check()

    with pytest.raises(OutOfOrderError):
        with torch.no_grad(), model.trace(IDS):
            h = attach(model, sae, hook=f"{LAYERS[family]}.1")
            envoy_layer(model, family, 1).output.save()
            h.hook_sae_acts_post.output.save()
    check()

    handles = [attach(model, sae, hook=f"{LAYERS[family]}.{i}", use_error_term=i == 1) for i in range(3)]
    handles.append(attach(model, tc, hook=spec))
    assert len(attached(model)) == 4
    handles[1].detach()
    detach(model)
    check()

    with pytest.raises(RuntimeError, match="inside"):
        with saes(model, [sae], hook=f"{LAYERS[family]}.1") as hs:
            assert hs[0].attached
            raise RuntimeError("inside")
    check()


def test_invoke_mode_and_plain_torch_model():
    family = "llama"
    ref_hf = tiny_model(family)
    sae = make_sae(D_MODEL)
    with torch.no_grad(), torch_hook(layer(ref_hf, family, 1), "output", lambda a: ref_decode(sae, ref_encode(sae, a))):
        want = ref_hf(IDS).logits
    model = wrap(tiny_model(family), "language")
    with torch.no_grad(), model.trace() as tracer:
        h = nnsight.save(attach(model, sae, hook="model.layers.1"))  # invoke-mode outer body: still trace-scoped
        with tracer.invoke(IDS):
            logits = model.output.logits.save()
    assert h.scope == "trace" and not h.attached
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)

    raw = tiny_model(family)  # no nnsight at all: a torch forward hook does the splice
    before = fingerprint(raw)
    with torch.no_grad():
        h = attach(raw, sae, hook="model.layers.1")
        torch.testing.assert_close(raw(IDS).logits, want, atol=ATOL, rtol=0)
        assert "model.layers.1.sae.hook_sae_acts_post" in dict(raw.named_modules())
        h.detach()
    assert fingerprint(raw) == before


# ---------------------------------------------------------------------------------------------------------------
# HookedSAETransformer conveniences
# ---------------------------------------------------------------------------------------------------------------


def test_run_with_saes_cache_and_context_manager():
    family = "llama"
    a = make_sae(D_MODEL, seed=1, hook_name="blocks.0.hook_resid_post")
    b = make_sae(D_MODEL, seed=2, hook_name="blocks.2.hook_resid_pre")
    ref_hf = tiny_model(family)
    rec = lambda s: (lambda x: ref_decode(s, ref_encode(s, x)))  # noqa: E731
    acts = {}

    def record_then(key, fn):
        def hook(x):
            acts[key] = x
            return fn(x)
        return hook

    with torch.no_grad(), torch_hook(layer(ref_hf, family, 0), "output", record_then("a", rec(a))), \
            torch_hook(layer(ref_hf, family, 2), "input", record_then("b", rec(b))):
        want = ref_hf(IDS).logits
    hf = tiny_model(family)
    model = wrap(hf, "language")
    clean = hf(IDS).logits
    with torch.no_grad():
        logits = run_with_saes(model, IDS, saes=[a, b])
        torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
        assert attached(model) == []
        logits2, cache = run_with_cache_with_saes(model, IDS, saes=[a, b])
        torch.testing.assert_close(logits2, want, atol=ATOL, rtol=0)
        assert {k for k in cache if ".hook_sae_" in k} == {
            f"{n}.{h}" for n in ("blocks.0.hook_resid_post", "blocks.2.hook_resid_pre")
            for h in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output")}
        # model points too, but not those an SAE sits at (SAELens' wrapper takes their place)
        assert "blocks.1.hook_resid_post" in cache and "blocks.0.hook_resid_post" not in cache
        torch.testing.assert_close(cache["blocks.0.hook_resid_post.hook_sae_acts_post"], ref_encode(a, acts["a"]),
                                   atol=ATOL, rtol=0)
        _, cache = run_with_cache_with_saes(model, IDS, saes=[a], use_error_term=True,
                                            names_filter=lambda k: "error" in k)
        assert list(cache) == ["blocks.0.hook_resid_post.hook_sae_error"]
        assert torch.equal(run_with_saes(model, IDS, saes=[a, b], use_error_term=True), clean)
        with saes(model, [a, b]) as handles:
            assert [h.hook_name for h in handles] == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_pre"]
            torch.testing.assert_close(model.trace(IDS, trace=False).logits, want, atol=ATOL, rtol=0)
        assert attached(model) == [] and torch.equal(hf(IDS).logits, clean)
        assert torch.equal(run_with_saes(model, "w5 w6 w7", saes=[a], mode="observe"),
                           hf(torch.tensor([[5, 6, 7]])).logits)


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


def test_errors_are_clear():
    hf = tiny_model("gpt2")
    model = nnsight.NNsight(hf)
    before = fingerprint(hf)
    with pytest.raises(ValueError, match=r"d_in=32.*transformer\.h\.1\.output.*width 64"):
        attach(model, make_sae(32), hook="transformer.h.1")
    with pytest.raises(ValueError, match=r"d_in=64.*mlp\.c_proj\.input.*width 256"):
        attach(model, make_sae(64), hook="transformer.h.1.mlp.c_proj.input")
    with pytest.raises(ValueError, match=r"No module 'transformer\.h\.9'.*Closest"):
        attach(model, make_sae(64), hook="transformer.h.9")
    with pytest.raises(ValueError, match="mode"):
        attach(model, make_sae(64), hook="transformer.h.1", mode="nope")
    sae = make_sae(64)
    ids = IDS
    with pytest.raises(SAEOrderError, match=r"before `model\.transformer\.h\.1\.output`|before `transformer"):
        with model.trace(ids):
            h = attach(model, sae, hook="transformer.h.1")
            model.transformer.h[2].output.save()
            h.hook_sae_acts_post.output.save()
    with pytest.raises(ValueError, match="already ran past"):
        with model.trace(ids):
            model.transformer.h[2].output.save()
            attach(model, sae, hook="transformer.h.1")
    with pytest.raises(ValueError, match="already has an attribute 'mlp'"):
        attach(model, sae, hook="transformer.h.1", name="mlp")
    h = attach(model, make_sae(64, d_sae=32), hook="transformer.h.1.ln_2.input", use_error_term=True)
    with pytest.raises(ValueError, match="feature indices"):
        h.steer(40, 1.0)
    h.detach()
    assert attached(model) == []
    assert fingerprint(hf) == before  # failed attaches left nothing behind


def test_tuple_output_module():
    """GPT-2 attention returns (out, weights): the SAE replaces element 0 only."""
    sae = make_sae(D_MODEL, hook_name="blocks.1.hook_attn_out")
    ref_hf = tiny_model("gpt2")
    attn = ref_hf.transformer.h[1].attn
    with torch.no_grad(), torch_hook(attn, "output", lambda a: ref_decode(sae, ref_encode(sae, a))):
        want = ref_hf(IDS).logits
    model = nnsight.NNsight(tiny_model("gpt2"))
    with torch.no_grad(), model.trace(IDS):
        h = attach(model, sae)
        recons = h.output.save()  # the mount's output comes before the attention module's own .output
        first = model.transformer.h[1].attn.output[0].save()
        logits = model.output.logits.save()
    assert torch.equal(first, recons)
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# the real model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_topk_splice_generate_and_removal(smollm2):
    hf, tok = smollm2
    model = TransformersModel(hf, tokenizer=tok)
    sae = make_sae(576, d_sae=1024, architecture="topk", k=32, hook_name="blocks.6.hook_resid_post")
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        clean = hf(ids).logits

        def topk_ref(a):
            z = (a - sae.b_dec) @ sae.W_enc + sae.b_enc
            v, i = z.topk(32, dim=-1)
            f = torch.zeros_like(z).scatter(-1, i, torch.relu(v))
            return f @ sae.W_dec + sae.b_dec

        with torch_hook(hf.model.layers[6], "output", topk_ref):
            want = hf(ids).logits
        with model.trace(prompt):
            h = attach(model, sae)
            feats = h.hook_sae_acts_post.output.save()
            logits = model.output.logits.save()
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
        assert ((feats != 0).sum(-1) <= 32).all()
        h = attach(model, sae, use_error_term=True)
        with model.generate(prompt, max_new_tokens=3, do_sample=False) as tracer:
            tokens = tracer.result.save()
        h.detach()
        plain = hf.generate(ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(tokens, plain)
        assert torch.equal(hf(ids).logits, clean)
        assert not any("sae" in n for n, _ in hf.named_modules())
