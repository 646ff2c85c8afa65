"""nnsae.circuits against independent computations.

The adjacency is compared with a brute-force autograd Jacobian of a separately written frozen replacement model:
for GPT-2 and Llama a hand-written forward from the weights (float64), for Gemma 2/3 and GPT-NeoX the HF model
in float64 with plain torch hooks that replace norms by their recorded frozen-scale formulas, attention by the
recorded pattern times the values, and MLP outputs by explicit sums of source terms. Each source (feature, error,
token) is scaled by a coefficient c (1 in the clean run); A[target, source] = ∂target/∂c_source.
"""

from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from nnsae.circuits import (CrossLayerTranscoder, Graph, SingleLayerTranscoder, TranscoderSet, attribute,
                            compute_graph_scores, create_graph_files, intervene, load_transcoders, prune_graph,
                            save_transcoders)
from nnsae.circuits.graph import GraphConfig
from tests import random_transcoders
from tests.tiny_models import D_MODEL, N_LAYERS, tiny_model, tiny_tokenizer

D_TC = 16
TOKENS = torch.tensor([1, 17, 42, 9, 77, 5, 23])  # BOS first


# ---- random transcoders ----------------------------------------------------------------------------------------


def random_set(seed: int = 0, activation: str = "relu", skip: bool = False) -> TranscoderSet:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    layers = []
    for _ in range(N_LAYERS):
        threshold = r(D_TC, scale=0.1).abs() if activation == "jumprelu" else None
        layers.append(SingleLayerTranscoder(
            r(D_TC, D_MODEL, scale=0.4), r(D_TC, D_MODEL, scale=0.2), r(D_TC, scale=0.3) - 0.3, r(D_MODEL, scale=0.1),
            activation=activation, threshold=threshold, k=4 if activation == "topk" else None,
            W_skip=r(D_MODEL, D_MODEL, scale=0.05) if skip else None))
    return TranscoderSet(layers, "mlp.hook_in", "hook_mlp_out", scan="test-set")


def random_clt(seed: int = 1) -> CrossLayerTranscoder:
    return random_transcoders.random_clt(N_LAYERS, D_MODEL, D_TC, seed, b_enc_shift=-0.3, scan="test-clt")


class RefTranscoders:
    """The transcoders' math written out from their weights (float64)."""

    def __init__(self, tc):
        self.clt = isinstance(tc, CrossLayerTranscoder)
        if self.clt:
            self.W_enc = [w.double() for w in tc.W_enc]
            self.b_enc = [b.double() for b in tc.b_enc]
            self.b_dec = [b.double() for b in tc.b_dec]
            self.W_dec = [w.double() for w in tc.W_dec]  # [d_tc, n_layers - i, d]
            self.threshold = [t.double() for t in tc.threshold]
            self.kind, self.skip = "jumprelu", None
        else:
            self.W_enc = [t.W_enc.double() for t in tc]
            self.b_enc = [t.b_enc.double() for t in tc]
            self.b_dec = [t.b_dec.double() for t in tc]
            self.W_dec = [t.W_dec.double()[:, None] for t in tc]
            self.threshold = [None if t.threshold is None else t.threshold.double() for t in tc]
            self.kind = tc[0].activation
            self.skip = [t.W_skip.double() for t in tc] if tc.skip_connection else None
        self.n_layers = len(self.W_enc)

    def acts(self, layer, x):
        pre = x @ self.W_enc[layer].T + self.b_enc[layer]
        if self.kind == "relu":
            return pre.clamp(min=0)
        if self.kind == "jumprelu":
            return torch.where(pre > self.threshold[layer], pre, torch.zeros_like(pre))
        top = pre.topk(4, dim=-1).indices
        return torch.zeros_like(pre).scatter(-1, top, pre.gather(-1, top))

    def writes(self, src, out):  # does source layer `src` write to layer `out`?
        return out - src in range(self.W_dec[src].shape[1])


class Sources:
    """Active features (pos 0 excluded) and error vectors of a clean run, and the MLP output built from sources."""

    def __init__(self, ref: RefTranscoders, mlp_in, mlp_out):
        self.ref = ref
        feats = []  # (layer, pos, feature, activation)
        for layer in range(ref.n_layers):
            a = ref.acts(layer, mlp_in[layer])
            a[0] = 0
            for p, f in a.nonzero().tolist():
                feats.append((layer, p, f, a[p, f]))
        self.features = feats
        n_pos = mlp_in[0].shape[0]
        self.errors = []
        for layer in range(ref.n_layers):
            recon = ref.b_dec[layer].expand(n_pos, -1).clone()
            for (src, p, f, a) in feats:
                if ref.writes(src, layer):
                    recon[p] += a * ref.W_dec[src][f, layer - src]
            if ref.skip is not None:
                recon = recon + mlp_in[layer] @ ref.skip[layer].T
            err = mlp_out[layer] - recon
            err[0] = 0
            self.errors.append(err)
        self.n_pos = n_pos
        self.true_out = mlp_out

    def n_sources(self):
        return len(self.features) + (self.ref.n_layers + 1) * self.n_pos

    def split(self, c):
        nf, L, P = len(self.features), self.ref.n_layers, self.n_pos
        return c[:nf], c[nf:nf + L * P].view(L, P), c[nf + L * P:]

    def mlp_out(self, layer, c, mlp_in_live):
        """Replacement MLP output of `layer` as a function of the coefficients (constant true value at pos 0)."""
        c_feat, c_err, _ = self.split(c)
        out = self.ref.b_dec[layer].expand(self.n_pos, -1).clone()
        terms = [torch.zeros(self.n_pos, out.shape[-1], dtype=out.dtype)]
        for i, (src, p, f, a) in enumerate(self.features):
            if self.ref.writes(src, layer):
                row = torch.zeros(self.n_pos, out.shape[-1], dtype=out.dtype)
                row[p] = a * self.ref.W_dec[src][f, layer - src]
                terms.append(c_feat[i] * row)
        out = out + sum(terms) + c_err[layer][:, None] * self.errors[layer]
        # Position 0 keeps the true output as a constant (its features and error are not sources).
        out = torch.cat([self.true_out[layer][:1], out[1:]])
        if self.ref.skip is not None:  # the skip path stays live everywhere (circuit-tracer), position 0 included
            out = out + mlp_in_live @ self.ref.skip[layer].T
        return out

    def targets(self, mlp_in_live, final, unembed, logit_ids):
        """Feature pre-activations (no bias) and demeaned logits at the last position."""
        feats = [self.ref.W_enc[layer][f] @ mlp_in_live[layer][p] for (layer, p, f, _) in self.features]
        demeaned = unembed[logit_ids] - unembed.mean(0, keepdim=True)
        return torch.cat([torch.stack(feats) if feats else torch.zeros(0, dtype=final.dtype), demeaned @ final[-1]])


# ---- hand-written frozen forwards ------------------------------------------------------------------------------


def _ln(x, w, b, eps, scale=None):
    centred = x - x.mean(-1, keepdim=True)
    s = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) if scale is None else scale
    return centred * s * w + b, s


def _rms(x, gain, eps, scale=None):
    s = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) if scale is None else scale
    return x * s * gain, s


def _causal_softmax(scores):
    n = scores.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def gpt2_forward(model, tokens, frozen=None, sources=None, c=None, normalized_read=False):
    """GPT-2 by hand. frozen=None: the true model, returning (logits, record); else the frozen replacement model
    as a function of the source coefficients c, returning (transcoder inputs, final norm output). The transcoders
    read the MLP input, or with `normalized_read` ln_2's normalized input (TL's ln2.hook_normalized)."""
    tr = model.transformer
    cfg = model.config
    P = (lambda t: t.double())
    n, d, H = len(tokens), cfg.n_embd, cfg.n_head
    hd = d // H
    eps = cfg.layer_norm_epsilon
    record = {"scales": [], "patterns": [], "mlp_in": [], "mlp_out": []}
    tok = P(tr.wte.weight)[tokens]
    if c is not None:
        tok = tok * sources.split(c)[2][:, None]
    h = tok + P(tr.wpe.weight)[:n]
    k_scale = 0
    mlp_ins = []
    for layer, block in enumerate(tr.h):
        fs = None if frozen is None else frozen["scales"]
        x, s1 = _ln(h, P(block.ln_1.weight), P(block.ln_1.bias), eps, None if fs is None else fs[k_scale])
        qkv = x @ P(block.attn.c_attn.weight) + P(block.attn.c_attn.bias)
        q, k, v = (t.view(n, H, hd).transpose(0, 1) for t in qkv.split(d, dim=-1))
        if frozen is None:
            pattern = _causal_softmax(q @ k.transpose(-1, -2) / math.sqrt(hd))
        else:
            pattern = frozen["patterns"][layer]
        z = (pattern @ v).transpose(0, 1).reshape(n, d)
        h = h + z @ P(block.attn.c_proj.weight) + P(block.attn.c_proj.bias)
        x2, s2 = _ln(h, P(block.ln_2.weight), P(block.ln_2.bias), eps, None if fs is None else fs[k_scale + 1])
        tc_in = (h - h.mean(-1, keepdim=True)) * s2 if normalized_read else x2
        k_scale += 2
        if frozen is None:
            pre = x2 @ P(block.mlp.c_fc.weight) + P(block.mlp.c_fc.bias)
            act = 0.5 * pre * (1 + torch.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre.pow(3))))
            out = act @ P(block.mlp.c_proj.weight) + P(block.mlp.c_proj.bias)
            record["scales"] += [s1, s2]
            record["patterns"].append(pattern)
            record["mlp_in"].append(tc_in)
            record["mlp_out"].append(out)
        else:
            out = sources.mlp_out(layer, c, tc_in)
        mlp_ins.append(tc_in)
        h = h + out
    final, sf = _ln(h, P(tr.ln_f.weight), P(tr.ln_f.bias), eps, None if frozen is None else frozen["scales"][k_scale])
    if frozen is None:
        record["scales"].append(sf)
        return final @ P(model.lm_head.weight).T, record
    return mlp_ins, final


def _rope(x, positions, theta):
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = positions[:, None].double() * inv[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def llama_forward(model, tokens, frozen=None, sources=None, c=None):
    """Llama by hand (RMSNorm, rotary, grouped-query attention, SwiGLU); same contract as gpt2_forward."""
    m = model.model
    cfg = model.config
    P = (lambda t: t.double())
    n, d, H, KV = len(tokens), cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = d // H
    eps = cfg.rms_norm_eps
    theta = cfg.rope_parameters["rope_theta"]
    record = {"scales": [], "patterns": [], "mlp_in": [], "mlp_out": []}
    h = P(m.embed_tokens.weight)[tokens]
    if c is not None:
        h = h * sources.split(c)[2][:, None]
    pos = torch.arange(n)
    k_scale = 0
    mlp_ins = []
    for layer, block in enumerate(m.layers):
        fs = None if frozen is None else frozen["scales"]
        x, s1 = _rms(h, P(block.input_layernorm.weight), eps, None if fs is None else fs[k_scale])
        at = block.self_attn
        q = (x @ P(at.q_proj.weight).T).view(n, H, hd).transpose(0, 1)
        k = (x @ P(at.k_proj.weight).T).view(n, KV, hd).transpose(0, 1)
        v = (x @ P(at.v_proj.weight).T).view(n, KV, hd).transpose(0, 1)
        k, v = k.repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
        if frozen is None:
            pattern = _causal_softmax(_rope(q, pos, theta) @ _rope(k, pos, theta).transpose(-1, -2) / math.sqrt(hd))
        else:
            pattern = frozen["patterns"][layer]
        h = h + (pattern @ v).transpose(0, 1).reshape(n, d) @ P(at.o_proj.weight).T
        x2, s2 = _rms(h, P(block.post_attention_layernorm.weight), eps, None if fs is None else fs[k_scale + 1])
        k_scale += 2
        if frozen is None:
            mlp = block.mlp
            gate = x2 @ P(mlp.gate_proj.weight).T
            out = (gate * torch.sigmoid(gate) * (x2 @ P(mlp.up_proj.weight).T)) @ P(mlp.down_proj.weight).T
            record["scales"] += [s1, s2]
            record["patterns"].append(pattern)
            record["mlp_in"].append(x2)
            record["mlp_out"].append(out)
        else:
            out = sources.mlp_out(layer, c, x2)
        mlp_ins.append(x2)
        h = h + out
    final, sf = _rms(h, P(m.norm.weight), eps, None if frozen is None else frozen["scales"][k_scale])
    if frozen is None:
        record["scales"].append(sf)
        return final @ P(model.lm_head.weight).T, record
    return mlp_ins, final


# ---- the hook-based frozen reference (Gemma 2/3, GPT-NeoX) -------------------------------------------------------


_HOOKED = {  # family: (layers, attention, mlp in module, mlp out module, embedding, norm gain is 1 + w, norm)
    "gemma2": ("model.layers", "self_attn", "mlp", "post_feedforward_layernorm", "model.embed_tokens", True, "rms"),
    "gemma3": ("model.layers", "self_attn", "mlp", "post_feedforward_layernorm", "model.embed_tokens", True, "rms"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp", "mlp", "gpt_neox.embed_in", False, "ln"),
    "llama": ("model.layers", "self_attn", "mlp", "mlp", "model.embed_tokens", False, "rms"),
}


def _values(family, attn, x):
    """[heads, n, hd] value vectors of attention module `attn` for input x [n, d]."""
    n = x.shape[0]
    if family == "gpt_neox":
        qkv = attn.query_key_value(x).view(n, -1, 3 * attn.head_size).transpose(0, 1)
        return qkv.chunk(3, dim=-1)[2]
    v = attn.v_proj(x).view(n, -1, attn.head_dim).transpose(0, 1)
    return v.repeat_interleave(attn.config.num_attention_heads // v.shape[0], 0)


def _out_proj(family, attn, z):
    return attn.dense(z) if family == "gpt_neox" else attn.o_proj(z)


def hooked_reference(family, model, tokens, ref, logit_ids):
    """(sources, Jacobian [targets, sources]) through the float64 HF model with plain hooks."""
    model = copy.deepcopy(model).double()
    layers_path, attn_name, in_name, out_name, embed_path, gemma_gain, norm = _HOOKED[family]
    layers = model.get_submodule(layers_path)
    norms = [(name, m) for name, m in model.named_modules()
             if type(m).__name__.endswith(("RMSNorm", "LayerNorm")) and ".q_norm" not in name and ".k_norm" not in name]
    record = {"scale": {}, "pattern": {}, "in": {}, "out": {}}
    handles = []

    def eps_of(m):
        return getattr(m, "eps", getattr(m, "variance_epsilon", 1e-5))

    for name, m in norms:
        def rec(mod, args, out, name=name):
            x = args[0]
            if norm == "ln":
                x = x - x.mean(-1, keepdim=True)
            record["scale"][name] = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps_of(mod))
        handles.append(m.register_forward_hook(rec))
    for i, layer in enumerate(layers):
        handles.append(getattr(layer, attn_name).register_forward_hook(
            lambda mod, args, out, i=i: record["pattern"].__setitem__(i, out[1][0])))
        handles.append(layer.get_submodule(in_name).register_forward_pre_hook(
            lambda mod, args, i=i: record["in"].__setitem__(i, args[0][0])))
        handles.append(layer.get_submodule(out_name).register_forward_hook(
            lambda mod, args, out, i=i: record["out"].__setitem__(i, out[0])))
    with torch.no_grad():
        logits = model(input_ids=tokens[None]).logits[0, -1]
    for h in handles:
        h.remove()
    n_layers = len(layers)
    sources = Sources(ref, [record["in"][i] for i in range(n_layers)], [record["out"][i] for i in range(n_layers)])

    def frozen(c):
        handles, live_in = [], {}
        for name, m in norms:
            def fz(mod, args, out, name=name):
                x = args[0]
                if norm == "ln":
                    return (x - x.mean(-1, keepdim=True)) * record["scale"][name] * mod.weight + mod.bias
                return x * record["scale"][name] * ((1 + mod.weight) if gemma_gain else mod.weight)
            handles.append(m.register_forward_hook(fz))
        handles.append(model.get_submodule(embed_path).register_forward_hook(
            lambda mod, args, out: out * sources.split(c)[2][None, :, None]))
        for i, layer in enumerate(layers):
            attn = getattr(layer, attn_name)

            def attention(mod, args, kwargs, out, i=i):
                x = kwargs["hidden_states"][0] if "hidden_states" in kwargs else args[0][0]
                z = (record["pattern"][i] @ _values(family, mod, x)).transpose(0, 1).reshape(x.shape[0], -1)
                return (_out_proj(family, mod, z)[None], None)
            handles.append(attn.register_forward_hook(attention, with_kwargs=True))
            handles.append(layer.get_submodule(in_name).register_forward_pre_hook(
                lambda mod, args, i=i: live_in.__setitem__(i, args[0][0])))
            handles.append(layer.get_submodule(out_name).register_forward_hook(
                lambda mod, args, out, i=i: sources.mlp_out(i, c, live_in[i])[None]))
        try:
            final = model.base_model(input_ids=tokens[None]).last_hidden_state[0]
        finally:
            for h in handles:
                h.remove()
        unembed = model.get_output_embeddings().weight
        return sources.targets([live_in[i] for i in range(len(layers))], final, unembed, logit_ids)

    c = torch.ones(sources.n_sources(), dtype=torch.float64)
    return sources, torch.autograd.functional.jacobian(frozen, c), logits


def hand_reference(family, model, tokens, ref, logit_ids, **options):
    forward = functools.partial(gpt2_forward if family == "gpt2" else llama_forward, **options)
    with torch.no_grad():
        logits, record = forward(model, tokens)
    hf_logits = model(input_ids=tokens[None]).logits[0].double()
    torch.testing.assert_close(logits, hf_logits, rtol=1e-4, atol=1e-4)  # the hand-written model is the model
    sources = Sources(ref, record["mlp_in"], record["mlp_out"])
    unembed = model.lm_head.weight.double()

    def frozen(c):
        mlp_ins, final = forward(model, tokens, frozen=record, sources=sources, c=c)
        return sources.targets(mlp_ins, final, unembed, logit_ids)

    c = torch.ones(sources.n_sources(), dtype=torch.float64)
    return sources, torch.autograd.functional.jacobian(frozen, c), logits[-1]


def reference(family, model, tokens, tc, logit_ids):
    ref = RefTranscoders(tc)
    if family in ("gpt2", "llama"):
        return hand_reference(family, model, tokens, ref, logit_ids)
    return hooked_reference(family, model, tokens, ref, logit_ids)


def check_graph(graph, sources, jac, logits, n_logits):
    """Node order and counts, activations, logit probabilities, and the adjacency against the Jacobian."""
    n_active = len(sources.features)
    expected_active = torch.tensor([[la, p, f] for (la, p, f, _) in sources.features]).reshape(-1, 3)
    assert torch.equal(graph.active_features, expected_active)
    torch.testing.assert_close(graph.activation_values.double(),
                               torch.stack([a for *_, a in sources.features]), rtol=1e-4, atol=1e-5)
    assert torch.equal(graph.selected_features, torch.arange(n_active))
    n_pos = sources.n_pos
    total = n_active + (N_LAYERS + 1) * n_pos + n_logits
    assert graph.adjacency_matrix.shape == (total, total)
    probs = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(graph.logit_probabilities.double(), probs[graph.logit_tokens], rtol=1e-4, atol=1e-6)
    expected = torch.zeros(total, total, dtype=torch.float64)
    expected[:n_active, : total - n_logits] = jac[:n_active]
    expected[total - n_logits:, : total - n_logits] = jac[n_active:]
    scale = expected.abs().max()
    torch.testing.assert_close(graph.adjacency_matrix.double(), expected, rtol=1e-4, atol=2e-5 * scale)
    return expected


def salient(logits, max_n=10, p=0.95):
    probs = torch.softmax(logits.double(), -1)
    top_p, top_i = probs.topk(max_n)
    keep = next((i + 1 for i in range(max_n) if top_p[: i + 1].sum() >= p), max_n)
    return top_i[:keep]


# ---- the adjacency against the reference -------------------------------------------------------------------------


@pytest.mark.parametrize("family,make", [
    ("gpt2", lambda: random_set(0, "relu")),
    ("gpt2", lambda: random_set(3, "jumprelu", skip=True)),
    ("gpt2", random_clt),
    ("llama", lambda: random_set(0, "jumprelu")),
    ("llama", random_clt),
    ("llama", lambda: random_set(5, "topk")),
    ("gemma2", lambda: random_set(0, "relu")),
    ("gemma2", random_clt),
    ("gemma3", lambda: random_set(2, "jumprelu")),
    ("gpt_neox", lambda: random_set(0, "relu", skip=True)),
])
def test_adjacency_equals_frozen_jacobian(family, make):
    model, tc = tiny_model(family), make()
    graph = attribute(model, TOKENS, tc, batch_size=32, max_n_logits=6, desired_logit_prob=0.3)
    assert len(graph.logit_targets) == len(salient(model(input_ids=TOKENS[None]).logits[0, -1], 6, 0.3))
    sources, jac, logits = reference(family, model, TOKENS, tc, graph.logit_tokens)
    assert torch.equal(graph.logit_tokens, salient(logits, 6, 0.3))
    assert len(sources.features) > 10  # a graph with real feature-to-feature edges
    expected = check_graph(graph, sources, jac, logits, len(graph.logit_targets))
    n_active = len(sources.features)
    assert expected[:n_active, :n_active].abs().sum() > 0


def test_transcoders_reading_tl_hook_normalized():
    """A set reading ln2.hook_normalized (the MLP input before the norm's gain): its scale is frozen too."""
    model, tc = tiny_model("gpt2"), random_set(4, "relu", skip=True)
    tc.feature_input_hook = "ln2.hook_normalized"
    graph = attribute(model, TOKENS, tc, batch_size=32, max_n_logits=3)
    sources, jac, logits = hand_reference("gpt2", model, TOKENS, RefTranscoders(tc), graph.logit_tokens,
                                          normalized_read=True)
    check_graph(graph, sources, jac, logits, len(graph.logit_targets))


def test_sdpa_and_nnsight_wrapper_give_the_same_graph():
    from nnsight import NNsight

    model, tc = tiny_model("llama"), random_set(0, "jumprelu")
    eager = attribute(model, TOKENS, tc, batch_size=64)
    model.config._attn_implementation = "sdpa"
    sdpa = attribute(NNsight(model), TOKENS, tc, batch_size=64)
    scale = eager.adjacency_matrix.abs().max()
    torch.testing.assert_close(sdpa.adjacency_matrix, eager.adjacency_matrix, rtol=1e-4, atol=1e-5 * scale)
    assert torch.equal(sdpa.logit_tokens, eager.logit_tokens)


def _reference_selection(jac, logit_probs, n_active, n_logits, n_sources, max_nodes, batch_size, interval):
    """circuit-tracer's feature selection, replayed on the reference rows (dense matrices, no chunking)."""
    rows = {n_sources + i: jac[n_active + i, :n_sources] for i in range(n_logits)}
    visited = []
    while len(visited) < max_nodes:
        order = list(rows)
        E = torch.stack([rows[k] for k in order]).abs()
        N = E / E.sum(1, keepdim=True).clamp(min=1e-8)
        prod = torch.zeros(n_sources + n_logits, dtype=torch.float64)
        prod[n_sources:] = logit_probs.double()
        influence = torch.zeros(n_sources, dtype=torch.float64)
        idx = torch.tensor(order)
        while True:
            nxt = prod[idx] @ N
            if not nxt.any():
                break
            influence += nxt
            prod = torch.cat([nxt, torch.zeros(n_logits, dtype=torch.float64)])
        ranking = torch.argsort(influence[:n_active], descending=True, stable=True).tolist()
        pending = [i for i in ranking if i not in visited][: min(interval * batch_size, max_nodes - len(visited))]
        for i in pending:
            rows[i] = jac[i, :n_sources]
        visited += pending
    return sorted(visited)


def test_max_feature_nodes_selects_by_logit_influence():
    model, tc = tiny_model("gpt2"), random_set(0, "relu")
    graph = attribute(model, TOKENS, tc, max_feature_nodes=12, batch_size=4, update_interval=2, max_n_logits=4,
                      desired_logit_prob=0.5)
    sources, jac, logits = reference("gpt2", model, TOKENS, tc, graph.logit_tokens)
    n_active, n_logits = len(sources.features), len(graph.logit_targets)
    n_sources = n_active + (N_LAYERS + 1) * sources.n_pos
    chosen = _reference_selection(jac, graph.logit_probabilities, n_active, n_logits, n_sources, 12, 4, 2)
    assert graph.selected_features.tolist() == chosen
    total = 12 + (N_LAYERS + 1) * sources.n_pos + n_logits
    assert graph.adjacency_matrix.shape == (total, total)
    keep = torch.cat([torch.tensor(chosen), torch.arange(n_active, n_sources)])
    expected = torch.zeros(total, total, dtype=torch.float64)
    expected[:12, : total - n_logits] = jac[torch.tensor(chosen)][:, keep]
    expected[total - n_logits:, : total - n_logits] = jac[n_active:][:, keep]
    torch.testing.assert_close(graph.adjacency_matrix.double(), expected, rtol=1e-4, atol=2e-5 * expected.abs().max())


def test_string_prompt_gets_bos_and_targets_by_id():
    model, tc = tiny_model("gpt2"), random_set(0, "relu")
    tokenizer = tiny_tokenizer()
    graph = attribute(model, "hello", tc, tokenizer=tokenizer, attribution_targets=torch.tensor([7, 9]),
                      batch_size=64)
    assert graph.input_tokens.tolist() == [1] + tokenizer("hello", add_special_tokens=False).input_ids
    assert graph.logit_tokens.tolist() == [7, 9]
    assert graph.input_string == tokenizer.decode(graph.input_tokens.tolist())
    logits = model(input_ids=graph.input_tokens[None]).logits[0, -1]
    torch.testing.assert_close(graph.logit_probabilities, torch.softmax(logits, -1)[[7, 9]])


def test_token_ids_follow_circuit_tracers_rule_with_a_tokenizer():
    """circuit-tracer's ensure_tokenized treats strings, lists and tensors alike: a special token is prepended unless
    the ids start with one. Without any tokenizer the ids are used as given."""
    model, tc = tiny_model("gpt2"), random_set(0, "relu")
    tokenizer = tiny_tokenizer()
    ids = tokenizer("hello", add_special_tokens=False).input_ids
    assert ids[0] not in tokenizer.all_special_ids
    kw = dict(attribution_targets=torch.tensor([7]), batch_size=64)
    from_string = attribute(model, "hello", tc, tokenizer=tokenizer, **kw)
    for given in (ids, torch.tensor(ids), torch.tensor([ids])):
        graph = attribute(model, given, tc, tokenizer=tokenizer, **kw)
        assert graph.input_tokens.tolist() == from_string.input_tokens.tolist() == [1] + ids
        torch.testing.assert_close(graph.adjacency_matrix, from_string.adjacency_matrix)
    assert attribute(model, [1] + ids, tc, tokenizer=tokenizer, **kw).input_tokens.tolist() == [1] + ids
    assert attribute(model, ids, tc, **kw).input_tokens.tolist() == ids
    with pytest.raises(ValueError, match="prompt is empty"):
        attribute(model, [], tc, **kw)


# ---- pruning and scores on a hand-made graph ---------------------------------------------------------------------


def hand_graph() -> Graph:
    # Nodes: f0 (layer 0, pos 1), f1 (layer 1, pos 1), errors e(L, p) at 2..5, tokens t0 = 6, t1 = 7, logit = 8.
    A = torch.zeros(9, 9)
    A[8, 1], A[8, 5] = 3.0, 1.0  # logit <- f1, e(1, 1)
    A[1, 0], A[1, 7] = 1.0, -1.0  # f1 <- f0, t1
    A[0, 7], A[0, 3] = 2.0, 2.0  # f0 <- t1, e(0, 1)
    cfg = GraphConfig(n_layers=2, d_model=4, d_vocab=10, tokenizer_name="t", model_name="m", original_architecture="a")
    return Graph("ab", torch.tensor([1, 5]), torch.tensor([[0, 1, 3], [1, 1, 4]]), A, cfg, torch.tensor([0, 1]),
                 torch.tensor([0.5, 2.0]), [("x", 3)], torch.tensor([0.9]), scan="s")


def test_prune_graph_matches_hand_computation():
    # Influence (w = 0.9 on the logit): f1 .675, e(1,1) .225, f0 .3375, t1 .3375 + .16875, e(0,1) .16875; total 1.9125.
    node_mask, edge_mask, cumulative = prune_graph(hand_graph(), 0.8, 0.98)
    # Sorted: f1, t1, f0, e(1,1), e(0,1) with cumulative shares .353, .618, .794, .912, 1: 0.8 keeps down to e(1,1).
    assert node_mask.tolist() == [True, True, False, False, False, True, True, True, True]
    total = 1.9125
    expected_cum = torch.ones(9)
    for node, cum in ((1, 0.675), (7, 1.18125), (0, 1.51875), (5, 1.74375), (3, 1.9125)):
        expected_cum[node] = cum / total
    torch.testing.assert_close(cumulative, expected_cum)
    # Edge scores after pruning e(0,1): (L,f1) .675, (f1,f0) .3375, (f1,t1) .3375, (f0,t1) .3375, (L,e11) .225.
    expected_edges = torch.zeros(9, 9, dtype=torch.bool)
    for t, s in ((8, 1), (8, 5), (1, 0), (1, 7), (0, 7)):
        expected_edges[t, s] = True
    assert torch.equal(edge_mask, expected_edges)
    node_mask, edge_mask, _ = prune_graph(hand_graph(), 0.8, 0.8)  # 0.8 of edge influence drops (L, e(1,1))
    expected_edges[8, 5] = False
    assert torch.equal(edge_mask, expected_edges)
    assert node_mask.tolist() == [True, True, False, False, False, False, True, True, True]
    with pytest.raises(ValueError, match="node_threshold"):
        prune_graph(hand_graph(), 1.5)


def test_graph_scores_match_hand_computation():
    replacement, completeness = compute_graph_scores(hand_graph())
    assert replacement == pytest.approx(0.50625 / (0.50625 + 0.39375))
    # Non-error share of normalised inputs: logit .75, f0 .5, other rows 1; weights = influence + logit weight.
    weighted = 0.5 * 0.3375 + 0.675 + 0.16875 + 0.225 + 0.50625 + 0.75 * 0.9
    assert completeness == pytest.approx(weighted / (1.9125 + 0.9))


def test_graph_pt_round_trip(tmp_path):
    graph = hand_graph()
    graph.to_pt(tmp_path / "g.pt")
    loaded = Graph.from_pt(tmp_path / "g.pt")
    for field in ("input_tokens", "active_features", "adjacency_matrix", "selected_features", "activation_values",
                  "logit_probabilities"):
        assert torch.equal(getattr(loaded, field), getattr(graph, field))
    assert (loaded.input_string, loaded.scan, loaded.cfg, loaded.logit_targets) == (
        graph.input_string, graph.scan, graph.cfg, graph.logit_targets)
    assert loaded.logit_tokens.tolist() == [3]


# ---- files -------------------------------------------------------------------------------------------------------


def test_transcoder_set_save_load_round_trip(tmp_path):
    tc = random_set(3, "jumprelu", skip=True)
    save_transcoders(tc, tmp_path / "set")
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert (config["feature_input_hook"], config["feature_output_hook"], config["scan"]) == (
        "mlp.hook_in", "hook_mlp_out", "test-set")
    for i, t in enumerate(tc):
        with safe_open(str(tmp_path / "set" / f"layer_{i}.safetensors"), "pt") as f:
            assert set(f.keys()) == {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip"}
            assert f.get_tensor("W_enc").shape == (D_TC, D_MODEL)  # [d_transcoder, d_model]
            for name in ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip"):
                assert torch.equal(f.get_tensor(name), getattr(t, name))
            assert torch.equal(f.get_tensor("activation_function.threshold"), t.threshold)
    loaded = load_transcoders(tmp_path / "set")
    assert isinstance(loaded, TranscoderSet) and loaded.skip_connection and loaded.scan == "test-set"
    x = torch.randn(5, D_MODEL)
    for i in range(N_LAYERS):
        assert loaded[i].activation == "jumprelu"
        torch.testing.assert_close(loaded[i](x), tc[i](x))


def test_clt_save_load_round_trip(tmp_path):
    tc = random_clt()
    save_transcoders(tc, tmp_path / "clt")
    config = yaml.safe_load((tmp_path / "clt" / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder"
    for i in range(N_LAYERS):
        with safe_open(str(tmp_path / "clt" / f"W_enc_{i}.safetensors"), "pt") as f:
            assert set(f.keys()) == {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", f"threshold_{i}"}
            assert torch.equal(f.get_tensor(f"W_enc_{i}"), tc.W_enc[i])
            assert torch.equal(f.get_tensor(f"b_dec_{i}"), tc.b_dec[i])
        with safe_open(str(tmp_path / "clt" / f"W_dec_{i}.safetensors"), "pt") as f:
            assert f.get_tensor(f"W_dec_{i}").shape == (D_TC, N_LAYERS - i, D_MODEL)
            assert torch.equal(f.get_tensor(f"W_dec_{i}"), tc.W_dec[i])
    loaded = load_transcoders(tmp_path / "clt")
    assert isinstance(loaded, CrossLayerTranscoder)
    x = torch.randn(N_LAYERS, 5, D_MODEL)
    torch.testing.assert_close(loaded(x), tc(x))


def test_load_hand_written_circuit_tracer_files(tmp_path):
    """Files written here from the format description (TopK set, ReLU CLT); the loaded math checked by hand."""
    g = torch.Generator().manual_seed(0)
    d, n = 8, 6
    tensors = [{"W_enc": torch.randn(n, d, generator=g), "W_dec": torch.randn(n, d, generator=g),
                "b_enc": torch.randn(n, generator=g), "b_dec": torch.randn(d, generator=g)} for _ in range(2)]
    (tmp_path / "set").mkdir()
    for i, t in enumerate(tensors):
        save_file(t, str(tmp_path / "set" / f"layer_{i}.safetensors"))
    (tmp_path / "set" / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out",
        "activation": "topk", "k": 2}))
    loaded = load_transcoders(tmp_path / "set")
    x = torch.randn(3, d, generator=g)
    pre = x @ tensors[1]["W_enc"].T + tensors[1]["b_enc"]
    kept = pre.topk(2, -1).indices
    acts = torch.zeros_like(pre).scatter(-1, kept, pre.gather(-1, kept))  # circuit-tracer's TopK: no ReLU
    torch.testing.assert_close(loaded[1](x), acts @ tensors[1]["W_dec"] + tensors[1]["b_dec"])

    (tmp_path / "clt").mkdir()
    W_enc = [torch.randn(n, d, generator=g) for _ in range(2)]
    W_dec = [torch.randn(n, 2 - i, d, generator=g) for i in range(2)]
    b_dec = [torch.randn(d, generator=g) for _ in range(2)]
    for i in range(2):
        save_file({f"W_enc_{i}": W_enc[i], f"b_enc_{i}": torch.zeros(n), f"b_dec_{i}": b_dec[i]},
                  str(tmp_path / "clt" / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": W_dec[i]}, str(tmp_path / "clt" / f"W_dec_{i}.safetensors"))
    (tmp_path / "clt" / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "cross_layer_transcoder", "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out"}))
    clt = load_transcoders(tmp_path / "clt")
    assert clt.feature_input_hook == "hook_resid_mid" and clt.activation == "relu"
    xs = torch.randn(2, 3, d, generator=g)
    a = [torch.relu(xs[i] @ W_enc[i].T) for i in range(2)]
    expected_1 = a[0] @ W_dec[0][:, 1] + a[1] @ W_dec[1][:, 0] + b_dec[1]
    torch.testing.assert_close(clt(xs)[1], expected_1)


def test_load_rejects_escaping_names_and_missing_hub(tmp_path):
    (tmp_path / "set").mkdir()
    save_file({"W_enc": torch.zeros(2, 2)}, str(tmp_path / "outside.safetensors"))
    (tmp_path / "set" / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out",
        "transcoders": ["../outside.safetensors"]}))
    with pytest.raises(ValueError, match="outside"):
        load_transcoders(tmp_path / "set")
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        load_transcoders(str(tmp_path / "no-such-dir"))


def test_saelens_transcoder_folders_load_as_a_set(tmp_path):
    saes = random_transcoders.saelens_transcoder_saes("jumprelu_skip_transcoder", N_LAYERS, D_MODEL, D_TC, scale=0.2)
    for layer, sae in enumerate(saes):
        sae.save_model(tmp_path / f"layer{layer}")
    loaded = load_transcoders(tmp_path)
    assert isinstance(loaded, TranscoderSet) and loaded.skip_connection
    assert (loaded.feature_input_hook, loaded.feature_output_hook) == ("mlp.hook_in", "hook_mlp_out")
    x = torch.randn(4, D_MODEL)
    for layer, sae in enumerate(saes):
        torch.testing.assert_close(loaded[layer].encode(x), sae.encode(x))
        torch.testing.assert_close(loaded[layer](x), sae.reconstruct(x))
    # Exported to circuit-tracer's layout, the set reads back with the same math.
    save_transcoders(loaded, tmp_path / "exported")
    again = load_transcoders(tmp_path / "exported")
    torch.testing.assert_close(again[1](x), saes[1].reconstruct(x))


# Fields and types of circuit-tracer's frontend/graph_models.py (pydantic models), written out.
SCHEMA = {
    "Metadata": {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str,
                 "node_threshold": (float, type(None)), "schema_version": (int, type(None))},
    "QParams": {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str},
    "Node": {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "token_prob": float,
             "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int, "jsNodeId": str, "clerp": str,
             "influence": (float, type(None)), "activation": (float, type(None))},
    "Link": {"source": str, "target": str, "weight": float},
    "Model": {"metadata": dict, "qParams": dict, "nodes": list, "links": list},
}


def _check(obj, schema):
    assert set(obj) == set(schema), (sorted(obj), sorted(schema))
    for key, kind in schema.items():
        assert isinstance(obj[key], kind) and not (kind is int and isinstance(obj[key], bool)), (key, obj[key])


def test_neuronpedia_files_follow_circuit_tracer_schema(tmp_path):
    model, tc = tiny_model("gpt2"), random_set(0, "relu")
    tokenizer = tiny_tokenizer()
    graph = attribute(model, TOKENS, tc, batch_size=64, tokenizer=tokenizer)
    path = create_graph_files(graph, "../my graph", tmp_path / "out", node_threshold=0.8, edge_threshold=0.98,
                              tokenizer=tokenizer)
    assert path == tmp_path / "out" / "-my-graph.json" and path.is_file()
    data = json.loads(path.read_text())
    _check(data, SCHEMA["Model"])
    _check(data["metadata"], SCHEMA["Metadata"])
    _check(data["qParams"], SCHEMA["QParams"])
    assert data["metadata"]["prompt_tokens"] == [tokenizer.decode(int(t)) for t in TOKENS]
    for node in data["nodes"]:
        _check(node, SCHEMA["Node"])
    for link in data["links"]:
        _check(link, SCHEMA["Link"])
    node_mask, edge_mask, _ = prune_graph(graph, 0.8, 0.98)
    n_sel, n_pos = len(graph.selected_features), len(TOKENS)
    ids = {}
    for i in node_mask.nonzero().flatten().tolist():
        if i < n_sel:
            layer, pos, feat = graph.active_features[graph.selected_features[i]].tolist()
            ids[i] = f"{layer}_{feat}_{pos}"
        elif i < n_sel + N_LAYERS * n_pos:
            ids[i] = "0_{}_{}".format(*divmod(i - n_sel, n_pos))
        elif i < n_sel + (N_LAYERS + 1) * n_pos:
            pos = i - n_sel - N_LAYERS * n_pos
            ids[i] = f"E_{int(TOKENS[pos])}_{pos}"
        else:
            ids[i] = f"{N_LAYERS + 1}_{graph.logit_targets[i - n_sel - (N_LAYERS + 1) * n_pos].vocab_idx}_{n_pos - 1}"
    expected_links = [(ids[s], ids[t], graph.adjacency_matrix[t, s].item())
                      for t, s in edge_mask.nonzero().tolist() if s in ids and t in ids]
    assert [(lk["source"], lk["target"], lk["weight"]) for lk in data["links"]] == expected_links
    by_id = {node["node_id"]: node for node in data["nodes"]}
    feature_nodes = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert feature_nodes
    for node in feature_nodes:
        layer, feat, pos = map(int, node["node_id"].split("_"))
        assert node["feature"] == (layer + feat) * (layer + feat + 1) // 2 + feat
        assert node["jsNodeId"] == f"{layer}_{feat}-0" and node["layer"] == str(layer) and node["ctx_idx"] == pos
    logit_nodes = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert len(logit_nodes) == len(graph.logit_targets) and logit_nodes[0]["is_target_logit"]
    assert all(f"E_{int(t)}_{p}" in by_id for p, t in enumerate(TOKENS))
    index = json.loads((tmp_path / "out" / "graph-metadata.json").read_text())
    assert index == {"graphs": [data["metadata"]]}


# ---- interventions -----------------------------------------------------------------------------------------------


def intervened_reference(family, model, tokens, tc, interventions, freeze_attention):
    """Logits with features set, through the float64 HF model and plain hooks: the MLP output gets
    (value - current activation)·W_dec added; attention is replaced by the clean pattern times the values."""
    model = copy.deepcopy(model).double()
    ref = RefTranscoders(tc)
    layers_path, attn_name, in_name, out_name, *_ = _HOOKED[family]
    layers = model.get_submodule(layers_path)
    patterns, handles = {}, []
    for i, layer in enumerate(layers):
        handles.append(getattr(layer, attn_name).register_forward_hook(
            lambda mod, args, out, i=i: patterns.__setitem__(i, out[1][0])))
    with torch.no_grad():
        model(input_ids=tokens[None])
    for h in handles:
        h.remove()
    handles, pending = [], {}

    def on_in(mod, args, i):
        acts = ref.acts(i, args[0][0])
        for (layer, pos, feature, value) in interventions:
            if layer != i:
                continue
            change = value - acts[pos, feature]
            for out in range(i, ref.n_layers):
                if ref.writes(i, out):
                    row = torch.zeros_like(args[0][0])
                    row[pos] = change[..., None] * ref.W_dec[i][feature, out - i]
                    pending[out] = pending.get(out, 0) + row

    for i, layer in enumerate(layers):
        handles.append(layer.get_submodule(in_name).register_forward_pre_hook(
            lambda mod, args, i=i: on_in(mod, args, i)))
        handles.append(layer.get_submodule(out_name).register_forward_hook(
            lambda mod, args, out, i=i: out + pending.pop(i, 0)))
        if freeze_attention:
            def attention(mod, args, kwargs, out, i=i):
                x = kwargs["hidden_states"][0] if "hidden_states" in kwargs else args[0][0]
                z = (patterns[i] @ _values(family, mod, x)).transpose(0, 1).reshape(x.shape[0], -1)
                return (_out_proj(family, mod, z)[None], None)
            handles.append(getattr(layer, attn_name).register_forward_hook(attention, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(input_ids=tokens[None]).logits[0]
    finally:
        for h in handles:
            h.remove()


def test_intervene_keeps_error_and_matches_manual_hooks():
    model, tc = tiny_model("llama"), random_set(0, "jumprelu")
    plain = model(input_ids=TOKENS[None]).logits[0]
    torch.testing.assert_close(intervene(model, tc, TOKENS, []), plain)
    graph = attribute(model, TOKENS, tc, batch_size=64)
    layer, pos, feature = graph.active_features[0].tolist()  # set to its own value: nothing changes
    same = intervene(model, tc, TOKENS, [(layer, pos, feature, float(graph.activation_values[0]))])
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-5)
    interventions = [(0, 3, 2, 4.0), (1, slice(4, 7), 5, 0.0), (2, 6, 1, -2.0)]
    for freeze in (True, False):
        got = intervene(model, tc, TOKENS, interventions, freeze_attention=freeze)
        expected = intervened_reference("llama", model, TOKENS, tc, interventions, freeze)
        assert not torch.allclose(got.double(), plain.double(), atol=1e-3)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_intervene_with_a_clt_on_gemma2():
    model, tc = tiny_model("gemma2"), random_clt()
    interventions = [(0, 2, 3, 3.0), (1, 5, 7, 1.5)]
    got = intervene(model, tc, TOKENS, interventions)
    expected = intervened_reference("gemma2", model, TOKENS, tc, interventions, True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
