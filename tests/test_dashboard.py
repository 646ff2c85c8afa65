"""Feature dashboards: numbers on the pages against a brute-force computation, token rendering, escaping, the JSON
schema, the CLI, and the pages as headless Chromium renders them.

One tiny Llama with a byte-level BPE tokenizer (trained here, offline) and two SAEs (a residual SAE and an
attn.hook_z SAE) go through ONE `dashboard()` call (module fixture); the brute force re-runs the plain HF model with
a torch forward hook and applies the SAE formula by hand.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import shutil
import subprocess
import tempfile
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from nnsae import SAE, SAEConfig
from nnsae.dashboards import SCHEMA, TokenRenderer, dashboard, display, logit_effects, parse_features, subschema
from nnsae.dashboards.cli import add_dashboard_command
from nnsae.dashboards.tokens import tokenizer_kind
from nnsae.data import Document, pack
from nnsae.neuronpedia import NoNeuronpediaIdError, neuronpedia_quick_list_url, neuronpedia_url
from tests.tiny_models import tiny_model

XSS = "</script><script>alert(1)</script>"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CONTEXT, N_TOKENS, WINDOW, N_TOP, N_Q, N_PER = 32, 32 * 40, 6, 8, 4, 3
CHROMIUM_INSTALL = "apt-get update && apt-get install -y chromium"


# ---- fixtures -----------------------------------------------------------------------------------------------------


def corpus() -> list[str]:
    words = ["alpha", "beta", "gamma", "café", "naïve", "日本語", "テキスト", "emoji 🙂", "x = 1 & y < 2", "tab\there"]
    docs = []
    for i in range(60):
        line = " ".join(words[(i * 7 + k) % len(words)] for k in range(6))
        docs.append(f"Doc {i}: {line}.\nSecond line with <img src=x onerror=alert(2)> and {XSS} inside, "
                    f"number {i * 37}.\n")
    return docs


def byte_level_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (Ġ for spaces, Ċ for newlines), trained on the corpus, plus the XSS string as
    one added (non-special) token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                              eos_token="<|endoftext|>")
    hf.add_tokens([XSS])
    return hf


def sentencepiece_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A Llama-2-style SentencePiece BPE (▁ for spaces, <0xHH> byte fallback)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", "a", "b", "▁a", "▁b"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁", "b")], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def tiny_llama(vocab: int) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def random_sae(seed: int, d_in: int, d_sae: int, **cfg) -> SAE:
    torch.manual_seed(seed)
    sae = SAE.from_config(SAEConfig(d_in=d_in, d_sae=d_sae, **cfg))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn_like(sae.W_enc) * 0.5)
        sae.W_dec.copy_(torch.randn_like(sae.W_dec) * 0.2)
        sae.b_enc.copy_(-0.4 - torch.rand_like(sae.b_enc))  # sparse-ish: densities spread over features
        sae.b_dec.copy_(torch.randn_like(sae.b_dec) * 0.1)
    return sae


class Site:
    """The module's one dashboard build, plus the brute-force ground truth."""

    def __init__(self, root: Path):
        self.tok = byte_level_tokenizer()
        self.model = tiny_llama(len(self.tok))
        self.resid = random_sae(1, 64, 24, metadata={"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny",
                                                     "neuronpedia_id": "tiny-llama/1-res-test"})
        self.xss_token = self.tok.convert_tokens_to_ids(XSS)
        with torch.no_grad():  # feature 0 writes the XSS token's unembedding: it is its top promoted token
            g = self.model.model.norm.weight
            self.resid.W_dec[0] = 3 * self.model.lm_head.weight[self.xss_token] / g
        self.hook_z = random_sae(2, 64, 16, reshape_activations="hook_z",
                                 metadata={"hook_name": "blocks.1.attn.hook_z", "model_name": "tiny"})
        self.inputs = self.hf_activations()
        for sae, x in ((self.resid, self.inputs["resid"]), (self.hook_z, self.inputs["hookz"])):
            with torch.no_grad():  # standardised pre-activations, thresholds giving densities from ~50% to ~5%
                pre = (x - sae.b_dec) @ sae.W_enc
                sae.W_enc.div_(pre.std(0))
                thresholds = torch.linspace(0, 1.6, sae.cfg.d_sae)[torch.randperm(sae.cfg.d_sae)]
                sae.b_enc.copy_(-pre.mean(0) / pre.std(0) - thresholds)
        self.out = root / "dash"
        self.index = dashboard(self.model, {"resid": self.resid, "hookz": self.hook_z}, corpus(), self.out,
                               features="all", n_tokens=N_TOKENS, tokenizer=self.tok, context_size=CONTEXT,
                               n_top_contexts=N_TOP, context_window=WINDOW, n_quantiles=N_Q, n_per_quantile=N_PER,
                               progress=False, exclude_special_tokens=False)  # the brute force counts every token
        self.brute_force()

    def hf_activations(self) -> dict[str, torch.Tensor]:
        """The SAE inputs for every token, from the plain HF model with torch hooks (packing as SAELens does)."""
        chunks = list(pack((Document(text=t) for t in corpus()), self.tok, CONTEXT, prepend_bos=True))
        tokens = torch.stack([c.tokens for c in chunks[: math.ceil(N_TOKENS / CONTEXT)]])
        captured = {}
        h1 = self.model.model.layers[1].register_forward_hook(lambda m, i, o: captured.__setitem__("resid", o))
        h2 = self.model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(
            lambda m, args: captured.__setitem__("hookz", args[0]))
        with torch.no_grad():
            self.model(tokens)
        h1.remove(), h2.remove()
        self.tokens = tokens.flatten()
        return {k: v.flatten(0, 1).float() for k, v in captured.items()}

    def brute_force(self) -> None:
        self.acts = {}
        for name, sae in (("resid", self.resid), ("hookz", self.hook_z)):
            with torch.no_grad():  # the standard SAE, by hand
                self.acts[name] = torch.relu((self.inputs[name] - sae.b_dec) @ sae.W_enc + sae.b_enc)

    def page(self, sae: str, i: int) -> str:
        return (self.out / sae / "features" / f"{i}.html").read_text()

    def record(self, sae: str, i: int) -> dict:
        return json.loads((self.out / sae / "features" / f"{i}.json").read_text())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    return Site(tmp_path_factory.mktemp("dashboard"))


# ---- a tiny DOM for assertions ------------------------------------------------------------------------------------


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None):
        self.tag, self.attrs, self.parent, self.children, self.parts = tag, attrs, parent, [], []

    @property
    def text(self) -> str:
        return "".join(p if isinstance(p, str) else p.text for p in self.parts)

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find(self, css: str) -> list[Node]:
        """'#id', '.class', 'tag' or 'tag.class'."""
        if css.startswith("#"):
            return [n for n in self.iter() if n.attrs.get("id") == css[1:]]
        tag, _, cls = css.partition(".")
        return [n for n in self.iter() if (not tag or n.tag == tag) and (not cls or cls in n.classes())]

    def one(self, css: str) -> Node:
        found = self.find(css)
        assert len(found) == 1, f"{css}: {len(found)} matches"
        return found[0]


class _Parser(HTMLParser):
    VOID = {"meta", "link", "br", "img", "input", "hr", "line", "rect"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.cur)
        self.cur.children.append(node)
        self.cur.parts.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.cur)
        self.cur.children.append(node)
        self.cur.parts.append(node)

    def handle_endtag(self, tag):
        n = self.cur
        while n is not self.root and n.tag != tag:
            n = n.parent
        if n is not self.root:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.parts.append(data)


def dom(text: str) -> Node:
    p = _Parser()
    p.feed(text)
    p.close()
    return p.root


def fval(node: Node, attr: str = "data-value") -> float:
    return float(node.attrs[attr])


# ---- numbers against the brute force ------------------------------------------------------------------------------


def test_stats_histogram_and_top_activations_match_brute_force(site):
    acts = site.acts["resid"]
    n = acts.shape[0]
    assert n == N_TOKENS
    fired_somewhere = 0
    for i in range(site.resid.cfg.d_sae):
        a = acts[:, i]
        doc = dom(site.page("resid", i))
        count = int((a > 0).sum())
        assert fval(doc.one("#density")) == pytest.approx(count / n, abs=1e-9)
        assert f"{count:,} of {n:,} tokens" in doc.one("#density").text
        if count == 0:
            continue
        fired_somewhere += 1
        assert fval(doc.one("#max-act")) == pytest.approx(float(a.max()), rel=1e-5)
        assert fval(doc.one("#mean-act")) == pytest.approx(float(a[a > 0].mean()), rel=1e-4)

        # histogram bars: every bar's count is the number of activations in [lo, hi)
        record = site.record("resid", i)
        bars = doc.one("#act-hist").find("rect.bar")
        assert [int(b.attrs["data-count"]) for b in bars] == record["freq_hist_data_bar_heights"]
        for b in bars:
            lo, hi = fval(b, "data-lo"), fval(b, "data-hi")
            assert int(b.attrs["data-count"]) == int(((a.double() >= lo) & (a.double() < hi)).sum())
        assert sum(record["freq_hist_data_bar_heights"]) + record["freq_hist_underflow"] + \
            record["freq_hist_overflow"] == count

        # top contexts: the n largest values, strongest first, each on the right token with the right neighbours
        ctxs = doc.one("#top").find("div.ctx")
        expected = a.topk(min(N_TOP, count))
        assert [fval(c) for c in ctxs] == pytest.approx(expected.values.tolist(), rel=1e-5)
        for c in ctxs:
            pos = int(c.attrs["data-chunk"]) * CONTEXT + int(c.attrs["data-position"])
            assert float(a[pos]) == pytest.approx(fval(c), rel=1e-5)
            spans = c.find("span.t")
            (q,) = [k for k, s in enumerate(spans) if "q" in s.classes()]
            assert int(spans[q].attrs["data-id"]) == int(site.tokens[pos])
            for k, s in enumerate(spans):  # per-token activations of this feature around it
                assert float(s.attrs["data-v"]) == pytest.approx(float(a[pos - q + k]), rel=1e-5, abs=1e-7)
                assert int(s.attrs["data-id"]) == int(site.tokens[pos - q + k])
    assert fired_somewhere == site.resid.cfg.d_sae


def test_quantile_samples_and_token_counts_match_brute_force(site):
    acts = site.acts["resid"]
    for i in range(site.resid.cfg.d_sae):
        a = acts[:, i]
        firing = a[a > 0]
        m = firing.numel()
        doc = dom(site.page("resid", i))
        groups = doc.find("div.quantile")
        if m == 0:
            assert not groups
            continue
        ordered = firing.sort().values
        bounds = [(k * m // N_Q, (k + 1) * m // N_Q) for k in reversed(range(N_Q)) if (k + 1) * m // N_Q > k * m // N_Q]
        assert len(groups) == len(bounds)
        for g, (start, end) in zip(groups, bounds):
            lo, hi = float(ordered[start]), float(ordered[end - 1])
            assert fval(g, "data-bin-min") == pytest.approx(lo, rel=1e-6)
            assert fval(g, "data-bin-max") == pytest.approx(hi, rel=1e-6)
            assert fval(g, "data-bin-contains") == pytest.approx((end - start) / m)
            samples = [fval(c) for c in g.find("div.ctx")]
            assert len(samples) == min(N_PER, end - start)
            assert samples == sorted(samples, reverse=True)
            for c in g.find("div.ctx"):
                pos = int(c.attrs["data-chunk"]) * CONTEXT + int(c.attrs["data-position"])
                assert float(a[pos]) == pytest.approx(fval(c), rel=1e-6) and lo <= fval(c) * (1 + 1e-6)
                assert fval(c) <= hi * (1 + 1e-6)
        # the "tokens it fires on most" table
        ids, counts = site.tokens[a > 0].unique(return_counts=True)
        truth = dict(zip(ids.tolist(), counts.tolist()))
        record = site.record("resid", i)
        for row in record["top_tokens"]:
            assert row["count"] == truth[row["token_id"]]
            sel = a[(site.tokens == row["token_id"]) & (a > 0)]
            assert row["mean_act"] == pytest.approx(float(sel.mean()), rel=1e-5)
        assert record["top_tokens"][0]["count"] == max(truth.values())
        assert record["firings_in_shards"] == record["firing_count"] == m


def test_logit_effects_match_w_dec_through_final_norm_and_unembedding(site):
    model = site.model
    W_U, g = model.lm_head.weight.detach(), model.model.norm.weight.detach()
    W_O = model.model.layers[1].self_attn.o_proj.weight.detach()
    for name, sae, direction in (("resid", site.resid, site.resid.W_dec.detach()),
                                 ("hookz", site.hook_z, site.hook_z.W_dec.detach() @ W_O.T)):
        eff = (direction * g) @ W_U.T
        eff = eff - eff.mean(-1, keepdim=True)
        for i in range(sae.cfg.d_sae):
            doc = dom(site.page(name, i))
            pos = doc.one("#logits-pos").find("tr")
            neg = doc.one("#logits-neg").find("tr")
            top = eff[i].topk(10)
            bottom = (-eff[i]).topk(10)
            assert [int(r.attrs["data-token-id"]) for r in pos] == top.indices.tolist()
            assert [fval(r) for r in pos] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-6)
            assert [int(r.attrs["data-token-id"]) for r in neg] == bottom.indices.tolist()
            assert [fval(r) for r in neg] == pytest.approx((-bottom.values).tolist(), rel=1e-4, abs=1e-6)
            assert sum(site.record(name, i)["logits_hist_data_bar_heights"]) == W_U.shape[0]
        method = doc.one("#logit-method").text
        assert "model.norm" in method and "lm_head" in method and "centred over the vocabulary" in method
        if name == "hookz":
            assert "W_dec[i] @ W_O" in method and "o_proj" in method
    assert site.record("resid", 0)["pos_token_ids"][0] == site.xss_token


@pytest.mark.parametrize("family", ["gpt2", "gemma", "gpt_neox"])
def test_logit_effects_other_families(family):
    """LayerNorm models: the direction's mean is removed; Gemma: the gain is 1 + weight (measured, not assumed)."""
    model = tiny_model(family)
    hook = "blocks.1.hook_mlp_out" if family == "gpt_neox" else "blocks.1.hook_resid_post"
    sae = random_sae(3, 64, 8, metadata={"hook_name": hook})
    W = sae.W_dec.detach()
    if family == "gpt2":
        W, g = W - W.mean(-1, keepdim=True), model.transformer.ln_f.weight
    elif family == "gpt_neox":
        W, g = W - W.mean(-1, keepdim=True), model.gpt_neox.final_layer_norm.weight
    else:
        g = 1 + model.model.norm.weight
    ref = (W * g.detach()) @ model.get_output_embeddings().weight.detach().T
    ref = ref - ref.mean(-1, keepdim=True)
    got = logit_effects(model, sae, [0, 3, 7])
    assert torch.allclose(got, ref[[0, 3, 7]], atol=1e-5)


# ---- tokens and escaping ------------------------------------------------------------------------------------------


def test_token_rendering_byte_level_and_sentencepiece():
    bl = byte_level_tokenizer()
    text = "café 日本語\nnew <b> tab\there 🙂 €中文"  # € 中 文: unseen, split into byte tokens
    ids = bl(text, add_special_tokens=False)["input_ids"]
    assert any("Ġ" in p for p in bl.convert_ids_to_tokens(ids)) and "Ċ" in "".join(bl.convert_ids_to_tokens(ids))
    r = TokenRenderer(bl)
    assert r.kind == "bytelevel" == tokenizer_kind(bl)
    toks = r.render(ids)
    assert "".join(t.text for t in toks) == text  # lossless, characters on the token that completes them
    assert any(t.partial for t in toks)  # the small vocabulary splits CJK characters over tokens
    assert all(t.text == "" for t in toks if t.partial)
    assert any(t.text == "\n" for t in toks) and display("\n") == "↵" and display("\t") == "⇥"
    bos = r.render([bl.bos_token_id] + ids[:2])
    assert bos[0].special and bos[0].text == "<|endoftext|>"

    sp = sentencepiece_tokenizer()
    ids = sp("a\nb é", add_special_tokens=False)["input_ids"]
    assert sp.convert_ids_to_tokens(ids) == ["▁a", "<0x0A>", "b", "▁", "<0xC3>", "<0xA9>"]
    r = TokenRenderer(sp)
    assert r.kind == "sentencepiece"
    assert [t.text for t in r.render([1] + ids)] == ["<s>", " a", "\n", "b", " ", "", "é"]
    assert r.render(ids)[4].partial and r.text(ids[4]) == "\ufffd" and r.label(ids[4]) == "<0xC3>"


def test_dataset_html_is_escaped_never_executed(site):
    # the XSS token is feature 0's top promoted token, so it is in that page, its JSON and the index blob
    page = site.page("resid", 0)
    assert XSS not in page and "<script" not in page.lower()  # feature pages have no script at all
    assert html.escape(XSS) in page
    doc = dom(page)
    assert doc.one("#logits-pos").find("span.tok")[0].text == XSS  # shown as text
    assert not doc.find("script")
    index = (site.out / "resid" / "index.html").read_text()
    assert index.lower().count("<script") == 2  # the JSON blob and the page's own script
    assert XSS not in index and "\\u003c/script\\u003e\\u003cscript\\u003ealert(1)" in index
    blob = dom(index).one("#feature-data").text
    assert XSS in json.loads(blob)["features"][0]["pos_str"]
    # the dataset's own markup in the contexts: "<img ... onerror=...>" is text, never an element
    shown = ""
    for i in range(site.resid.cfg.d_sae):
        text = site.page("resid", i)
        assert "<img" not in text and "alert(1)</script>" not in text and not dom(text).find("img")
        shown += "".join(s.text for s in dom(text).find("span.t"))
    assert "<img src=x onerror=alert(2)>" in shown
    csp = dom(page).find("meta")[1].attrs["content"]
    assert "default-src 'none'" in csp and "script-src 'none'" in csp


# ---- JSON export --------------------------------------------------------------------------------------------------


def test_json_export_validates_against_the_documented_schema(site):
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert json.loads((site.out / "schema.json").read_text()) == SCHEMA
    feature_schema = jsonschema.Draft202012Validator(subschema("feature"))
    whole = jsonschema.Draft202012Validator(SCHEMA)
    for name, sae in (("resid", site.resid), ("hookz", site.hook_z)):
        index = json.loads((site.out / name / "features.json").read_text())
        jsonschema.Draft202012Validator(subschema("index")).validate(index)
        whole.validate(index)
        assert [r["index"] for r in index["features"]] == list(range(sae.cfg.d_sae))
        assert index["extraction"]["n_tokens"] == N_TOKENS
        for i in range(sae.cfg.d_sae):
            record = site.record(name, i)
            feature_schema.validate(record)
            whole.validate(record)
            assert record["frac_nonzero"] == pytest.approx(float((site.acts[name][:, i] > 0).float().mean()))
            for ex in record["activations"]:
                assert len(ex["tokens"]) == len(ex["token_ids"]) == len(ex["values"])
    record = site.record("resid", 5)
    assert record["modelId"] == "tiny-llama" and record["layer"] == "1-res-test"
    assert record["neuronpedia_url"] == "https://neuronpedia.org/tiny-llama/1-res-test/5"
    assert site.record("hookz", 0)["neuronpedia_id"] is None
    with pytest.raises(jsonschema.ValidationError):
        feature_schema.validate(dict(record, frac_nonzero=2.0))


# ---- reuse of an extraction, layout, CLI, Neuronpedia -------------------------------------------------------------


def test_from_extraction_single_sae_layout_without_model(site, tmp_path):
    out = tmp_path / "one"
    index = dashboard(None, {"resid": site.resid}, out=out, features="3-5,9", from_extraction=site.out / "extraction",
                      tokenizer=site.tok, n_quantiles=N_Q, n_per_quantile=N_PER, progress=False)
    assert index == out / "index.html" and index.is_file()
    assert sorted(p.name for p in (out / "features").iterdir()) == sorted(
        f"{i}.{ext}" for i in (3, 4, 5, 9) for ext in ("html", "json"))
    assert not (out / "extraction").exists()  # no model pass
    a = dom((out / "features" / "4.html").read_text())
    b = dom(site.page("resid", 4))
    assert fval(a.one("#density")) == fval(b.one("#density"))
    assert [fval(c) for c in a.find("div.ctx")] == [fval(c) for c in b.find("div.ctx")]  # same seeded samples
    assert "Not computed: no model given" in a.one("#logit-method").text
    assert a.one("#prev").attrs["href"] == "3.html" and a.one("#next").attrs["href"] == "5.html"
    assert a.one("#neuronpedia").attrs["href"] == "https://neuronpedia.org/tiny-llama/1-res-test/4"
    root = dom((site.out / "index.html").read_text())
    assert [x.attrs["href"] for x in root.one("#saes").find("a")] == ["resid/index.html", "hookz/index.html"]
    with pytest.raises(ValueError, match="not in the extraction"):
        dashboard(None, random_sae(9, 64, 24), out=tmp_path / "x", from_extraction=site.out / "extraction",
                  tokenizer=site.tok, progress=False)


def test_a_hostile_extraction_manifest_writes_nothing_outside_out(site, tmp_path):
    """SAE names come from the extraction's manifest: a name that is a path is refused before any page is written."""
    copy = tmp_path / "copy"
    shutil.copytree(site.out / "extraction", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["saes"][0]["name"] = "../escaped"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="'../escaped' cannot be used as a file name"):
        dashboard(None, None, out=tmp_path / "site" / "out", from_extraction=copy, tokenizer=site.tok, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_parse_features_and_cli_arguments():
    assert parse_features("0-3,7", 10) == [0, 1, 2, 3, 7]
    assert parse_features(range(3), 10) == [0, 1, 2] and parse_features("all", 4) == [0, 1, 2, 3]
    assert parse_features(3, 10) == [0, 1, 2]
    with pytest.raises(ValueError, match="out of range"):
        parse_features("5-12", 10)
    with pytest.raises(ValueError, match="Bad feature spec"):
        parse_features("a-b", 10)
    parser = argparse.ArgumentParser(prog="nnsae")
    add_dashboard_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dashboard", "--model", "smollm2", "--sae", "x/y", "--sae", "rel:id", "--dataset",
                              "offline", "--tokens", "2e5", "--features", "0-99", "--out", "dash/",
                              "--from-extraction", "ex/"])
    assert (args.sae, args.tokens, args.features, args.out, args.from_extraction) == (["x/y", "rel:id"], 200_000,
                                                                                      "0-99", "dash/", "ex/")
    assert args.func.__name__ == "cmd_dashboard"


def test_cli_command_end_to_end_from_an_extraction(site, tmp_path, capsys):
    model_dir, sae_dir, out = tmp_path / "model", tmp_path / "sae", tmp_path / "cli-dash"
    site.model.save_pretrained(model_dir)
    site.tok.save_pretrained(model_dir)
    site.resid.save_model(sae_dir)
    parser = argparse.ArgumentParser(prog="nnsae")
    add_dashboard_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dashboard", "--model", str(model_dir), "--sae", str(sae_dir), "--features", "0-2",
                              "--out", str(out), "--from-extraction", str(site.out / "extraction"), "--quiet"])
    args.func(args)
    assert f"Dashboard: {(out / 'index.html').resolve()}" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "features").glob("*.html")) == ["0.html", "1.html", "2.html"]
    page = dom((out / "features" / "1.html").read_text())
    assert fval(page.one("#density")) == fval(dom(site.page("resid", 1)).one("#density"))
    assert page.one("#logits-pos").find("tr")  # the model was loaded, so the logit effects are there


def test_neuronpedia_urls(site):
    assert neuronpedia_url(site.resid, 7) == "https://neuronpedia.org/tiny-llama/1-res-test/7"
    url = neuronpedia_quick_list_url(site.resid, [1, 2], name="my list")
    assert url.startswith("https://neuronpedia.org/quick-list/?name=my%20list&features=")
    items = json.loads(urllib.parse.unquote(url.split("features=")[1]))
    assert items == [{"modelId": "tiny-llama", "layer": "1-res-test", "index": "1"},
                     {"modelId": "tiny-llama", "layer": "1-res-test", "index": "2"}]
    with pytest.raises(NoNeuronpediaIdError, match="no Neuronpedia id"):
        neuronpedia_url(site.hook_z, 0)
    with pytest.raises(ValueError, match="out of range"):
        neuronpedia_url(site.resid, 24)


# ---- the pages in a real browser ----------------------------------------------------------------------------------


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"Headless Chromium is needed for the browser test; install it with: {CHROMIUM_INSTALL}")


def browse(url: str, *, screenshot: Path | None = None, size: str = "1280,1600") -> str:
    with tempfile.TemporaryDirectory(prefix="nnsae-chromium-") as profile:
        flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--virtual-time-budget=5000", f"--window-size={size}"]
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.unlink(missing_ok=True)
            flags.append(f"--screenshot={screenshot}")
        result = subprocess.run(flags + ["--dump-dom", url], capture_output=True, timeout=90, check=True, text=True)
    if screenshot is not None:
        assert screenshot.stat().st_size > 10_000
    return result.stdout


def test_pages_render_in_headless_chromium(site):
    index = site.out / "resid" / "index.html"
    doc = dom(browse(index.as_uri(), screenshot=ARTIFACTS / "dashboard-index.png"))
    rows = doc.one("#features").find("tr")[1:]
    assert [int(r.attrs["data-feature"]) for r in rows] == list(range(site.resid.cfg.d_sae))
    assert rows[0].find("a")[0].attrs["href"] == "features/0.html"
    assert XSS in [s.text for s in rows[0].find("span.tok")]  # rendered as text by the script, not as markup
    assert len(doc.find("script")) == 2
    assert doc.one("#count").text == f"Features 1–{site.resid.cfg.d_sae} of {site.resid.cfg.d_sae}"

    # sort by density (descending) from the URL hash
    density = (site.acts["resid"] > 0).float().mean(0)
    doc = dom(browse(index.as_uri() + "#sort=-density"))
    got = [int(r.attrs["data-feature"]) for r in doc.one("#features").find("tr")[1:]]
    assert got == sorted(range(len(density)), key=lambda i: (-float(density[i]), i))
    assert "sorted" in doc.find("th")[1].classes()

    # search: the same substring rule the script documents (index or token text, case-insensitive)
    rows_json = json.loads((site.out / "resid" / "features.json").read_text())["features"]
    needle = next(t.strip() for r in rows_json for t in r["max_act_tokens"] if len(t.strip()) >= 2)
    haystack = {r["index"]: " ".join([str(r["index"])] + r["max_act_tokens"] + r["pos_str"] + r["neg_str"]).lower()
                for r in rows_json}
    expect = [i for i, text in haystack.items() if needle.lower() in text]
    doc = dom(browse(index.as_uri() + "#q=" + urllib.parse.quote(needle)))
    assert [int(r.attrs["data-feature"]) for r in doc.one("#features").find("tr")[1:]] == expect
    assert expect and doc.one("#count").text.startswith(f"Features 1–{min(len(expect), 100)} of {len(expect)}")

    # a feature page: numbers, contexts, tooltips and SVG as the browser sees them
    page = site.out / "resid" / "features" / "0.html"
    doc = dom(browse(page.as_uri(), screenshot=ARTIFACTS / "dashboard-feature.png", size="1280,2400"))
    assert doc.one("#title").text == "Feature 0"
    assert fval(doc.one("#density")) == pytest.approx(float(density[0]))
    assert len(doc.one("#top").find("div.ctx")) == min(N_TOP, int((site.acts["resid"][:, 0] > 0).sum()))
    span = doc.one("#top").find("span.t")[0]
    assert "activation" in span.attrs["title"] and "id " in span.attrs["title"]
    assert len(doc.one("#act-hist").find("rect")) >= 1 and doc.one("#logits-pos").find("span.tok")[0].text == XSS
    assert not doc.find("script")
