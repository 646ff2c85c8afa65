"""Data packing and activation harvesting against plain HF forwards."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnsae.data import Document, iter_documents, offline_corpus, pack
from nnsae.harvest import ActivationStore, Harvester
from tests.tiny_models import tiny_model, tiny_tokenizer

_PANGRAMS = ["The quick brown fox jumps over the lazy dog. " * 3, "Pack my box with five dozen liquor jugs.",
             "How vexingly quick daft zebras jump! " * 4, "Sphinx of black quartz, judge my vow."]
TEXTS = [f"Doc {i}: {_PANGRAMS[i % 4]}" for i in range(24)]  # distinct, so every activation row is unique


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_pack_follows_saelens_layout(tok):
    chunks = list(pack([Document(text=t) for t in TEXTS[:3]], tok, context_size=16))
    stream = []
    for i, t in enumerate(TEXTS[:3]):
        if i:
            stream.append(tok.bos_token_id)  # the separator between documents is BOS
        stream += tok(t, add_special_tokens=False).input_ids
    assert all(c.tokens[0] == tok.bos_token_id and len(c.tokens) == 16 for c in chunks)
    assert torch.cat([c.tokens[1:] for c in chunks]).tolist() == stream[: 15 * len(chunks)]
    assert len(chunks) == len(stream) // 15
    first = chunks[0]
    assert first.doc_ids[0] == -1 and first.doc_ids[1:].eq(0).all() and first.positions[1:].tolist() == list(range(15))
    no_bos = list(pack([Document(text=t) for t in TEXTS[:3]], tok, context_size=16, prepend_bos=False, separator=None))
    assert torch.cat([c.tokens for c in no_bos]).tolist() == [x for x in stream if x != tok.bos_token_id][: 16 * len(no_bos)]


def test_pack_skip_and_shard(tok):
    docs = [Document(text=t) for t in TEXTS]
    full = list(pack(docs, tok, 16))
    assert [c.tokens.tolist() for c in pack(docs, tok, 16, skip_chunks=3)] == [c.tokens.tolist() for c in full[3:]]
    shards = [list(pack(docs, tok, 16, shard=(r, 2))) for r in range(2)]
    assert [c.tokens.tolist() for c in shards[1]] == [c.tokens.tolist() for c in full[1::2]]


def test_local_dataset_formats(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS[:2])))
    assert [d.text for d in iter_documents(str(tmp_path / "a.jsonl"))] == TEXTS[:2]
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "x.txt").write_text(TEXTS[0])
    assert [d.text for d in iter_documents(str(tmp_path / "txt"))] == [TEXTS[0]]
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]]})
    ds.to_parquet(str(tmp_path / "p.parquet"))
    assert [d.tokens for d in iter_documents(str(tmp_path / "p.parquet"))] == [[5, 6, 7], [8, 9]]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert [d.tokens for d in iter_documents(str(tmp_path / "saved"))] == [[5, 6, 7], [8, 9]]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match="no text column.*body"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))


def test_offline_corpus_is_real_prose_with_a_held_out_split():
    import itertools

    train = list(itertools.islice(offline_corpus("train"), 50))
    test = list(itertools.islice(offline_corpus("test"), 5))
    assert all(len(d) >= 200 for d in train) and not set(train) & set(test)
    assert sum(d.count(" the ") for d in train) > 100


def test_offline_corpus_docstrings_are_memoized_per_file_version(tmp_path, monkeypatch):
    import itertools

    from nnsae import data

    monkeypatch.setenv("NNSAE_CACHE", str(tmp_path / "cache"))
    parsed = list(itertools.islice(offline_corpus(), 120))  # empty cache: every file is parsed
    memos = sorted((tmp_path / "cache" / "docstrings").glob("*.json"))
    assert len(memos) > 3 and list(itertools.islice(offline_corpus(), 120)) == parsed
    monkeypatch.setattr(data, "_parse_docstrings", lambda path: pytest.fail(f"{path} parsed again"))
    assert list(itertools.islice(offline_corpus(), 120)) == parsed  # read back from the memos alone
    monkeypatch.undo()

    monkeypatch.setenv("NNSAE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "module.py"
    source.write_text('"""Module \u00e9t\u00e9."""\ndef f():\n    """F."""\n')
    assert data._docstrings(source) == ["Module \u00e9t\u00e9.", "F."]
    (memo,) = set((tmp_path / "cache" / "docstrings").glob("*.json")) - set(memos)
    memo.write_text('["from the memo"]')
    assert data._docstrings(source) == ["from the memo"]
    source.write_text('"""Changed."""\n')  # a new version of the file: parsed, not served from the old memo
    assert data._docstrings(source) == ["Changed."]
    for corrupt in ("[1, 2]", '["trunc'):
        for path in (tmp_path / "cache" / "docstrings").glob("*.json"):
            path.write_text(corrupt)
        assert data._docstrings(source) == ["Changed."]
    monkeypatch.setenv("NNSAE_CACHE", str(source))  # a cache that cannot be created: parsed every time
    assert data._docstrings(source) == ["Changed."]


def test_offline_corpus_finds_the_docstrings_ast_walk_finds_in_the_same_order():
    import ast
    import inspect

    from nnsae.data import _statement_nodes

    source = inspect.cleandoc('''
        """Module."""
        import os
        if os:
            def in_if():
                """In if."""
                lambda: 0
        else:
            class InElse:
                """In else."""
                async def method(self):
                    """Async method."""
        try:
            def in_try():
                """In try."""
        except Exception:
            def in_handler():
                """In handler."""
        else:
            pass
        finally:
            def in_finally():
                """In finally."""
        for _ in []:
            pass
        else:
            def in_for_else():
                """In for-else."""
        while False:
            with open(__file__) as f:
                def in_with():
                    """In with."""
        match 1:
            case 1:
                def in_case():
                    """In case."""
        def outer():
            """Outer."""
            class Inner:
                """Inner."""
                def deep(self):
                    """Deep."""
                    return [lambda: 1 for _ in ()]
        ''')
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    tree = ast.parse(source)
    expected = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds)]
    assert [ast.get_docstring(n) for n in _statement_nodes(tree) if isinstance(n, kinds)] == expected
    assert len(expected) == 13 and expected[:2] == ["Module.", "Outer."]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_one_pass_for_many_hooks_equals_hidden_states_and_separate_passes(family):
    model = tiny_model(family)
    layers = "transformer.h" if family == "gpt2" else "model.layers"
    hooks = ["blocks.2.hook_resid_pre", f"{layers}.0", "blocks.1.hook_resid_post", f"{layers}.1.input"]
    tokens = torch.randint(3, 128, (2, 9))
    acts = Harvester(model, hooks)(tokens)
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
    for act, layer in zip(acts, [2, 1, 2, 1]):  # hidden_states[L] is the input of layer L
        torch.testing.assert_close(act, hidden[layer], atol=1e-6, rtol=0)
    for hook, act in zip(hooks, acts):
        assert torch.equal(Harvester(model, [hook])(tokens)[0], act)


def test_forward_stops_after_the_deepest_hook():
    model = tiny_model("llama")
    harvester = Harvester(model, ["model.layers.1"])
    calls = []
    handle = model.model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    harvester(torch.randint(3, 128, (1, 5)))
    assert calls == []
    model(torch.randint(3, 128, (1, 5)))
    assert calls == [1]
    handle.remove()


# Prints the minor page faults per harvested batch, after a warm-up.
_FAULTS_PER_BATCH = """
import resource, torch, transformers
from nnsae.harvest import Harvester
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
harvester = Harvester(transformers.AutoModelForCausalLM.from_config(config).eval(), ["model.layers.1", "model.layers.2"])
tokens = torch.randint(3, 128, (8, 128))
for _ in range(5):
    harvester(tokens)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    harvester(tokens)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the heap setting is glibc's")
def test_harvest_batches_reuse_the_heap_instead_of_faulting_pages_in_again():
    # In fresh processes, as the setting is process-wide: with it (NNSAE_KEEP_FREED_HEAP=1, what nnsae's own processes
    # set) and without (0, the library default), which leaves glibc's trimming: every batch faults thousands of pages.
    faults = {}
    for setting in ("1", "0"):
        run = subprocess.run([sys.executable, "-c", _FAULTS_PER_BATCH], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parents[1], env={**os.environ, "NNSAE_KEEP_FREED_HEAP": setting})
        faults[setting] = float(run.stdout.split()[-1])
    assert faults["1"] < 1000, faults  # measured 1-600 with the setting
    # without it, measured 900-5,000 per batch: how many glibc hands back varies from run to run (its dynamic mmap
    # threshold), so only the direction is asserted, with a margin
    assert faults["0"] > 2 * max(faults["1"], 200), faults


def test_keep_freed_heap_setting_is_checked(monkeypatch):
    monkeypatch.setenv("NNSAE_KEEP_FREED_HEAP", "maybe")
    with pytest.raises(ValueError, match="NNSAE_KEEP_FREED_HEAP='maybe' is not understood: use 1 .* or 0"):
        Harvester(tiny_model("gpt2"), ["transformer.h.0"])


def make_store(tok, model=None, **kw):
    model = model if model is not None else tiny_model("gpt2")
    args = dict(tokenizer=tok, context_size=16, batch_size_tokens=32, n_batches_in_buffer=4,
                store_batch_size_prompts=3, seed=1)
    return ActivationStore(model, ["blocks.1.hook_resid_post", "transformer.h.0"], TEXTS, **(args | kw))


def test_store_serves_every_kept_token_once_per_pass(tok):
    model = tiny_model("gpt2")
    store = make_store(tok, model)
    batches = list(store)
    served = torch.cat([b["transformer.h.0"] for b in batches])
    assert all(b["transformer.h.0"].shape == (32, 64) for b in batches)
    chunks = list(store.chunks())
    tokens = torch.stack([c.tokens for c in chunks])
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
    keep = tokens != tok.bos_token_id  # special tokens are excluded by default
    expected = hidden[1][keep]
    assert served.shape[0] == (expected.shape[0] // 32) * 32
    # Shuffled but complete up to the last partial batch: the served rows are a sub-multiset of the expected
    # rows (repeated text gives identical rows, so compare multiplicities of canonical row ids).
    dist = lambda a, b: torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")  # noqa: E731
    canonical = (dist(expected, expected) < 1e-5).float().argmax(dim=1)
    nearest = dist(served, expected).min(dim=1)
    assert nearest.values.max() < 1e-5
    have = torch.bincount(canonical[nearest.indices], minlength=len(expected))
    assert (have <= torch.bincount(canonical, minlength=len(expected))).all()
    assert not torch.equal(served, expected[: served.shape[0]])  # it really is shuffled


def test_store_resume_gives_the_same_batches(tok):
    model = tiny_model("gpt2")
    reference = [b["blocks.1.hook_resid_post"] for b in make_store(tok, model)]
    store = make_store(tok, model)
    it = iter(store)
    first = [next(it)["blocks.1.hook_resid_post"] for _ in range(5)]
    state = store.state_dict()
    resumed = make_store(tok, model)
    resumed.load_state_dict(state)
    rest = [b["blocks.1.hook_resid_post"] for b in resumed]
    assert len(first) + len(rest) == len(reference)
    for a, b in zip(first + rest, reference):
        assert torch.equal(a, b)
    del state["order"]
    with pytest.raises(ValueError, match="no serving order"):
        make_store(tok, model).load_state_dict(state)


def test_store_metadata_and_errors(tok):
    store = make_store(tok)
    meta = store.metadata("blocks.1.hook_resid_post")
    assert meta["hook_name"] == "blocks.1.hook_resid_post" and meta["hf_hook_name"] == "transformer.h.1.output"
    assert meta["context_size"] == 16 and meta["exclude_special_tokens"] is True
    assert "model_class_name" not in meta  # a TransformerLens name: SAELens' default HookedTransformer reading
    by_path = store.metadata("transformer.h.0")
    assert by_path["hook_name"] == "transformer.h.0" and by_path["model_class_name"] == "AutoModelForCausalLM"
    assert store.d_in("transformer.h.0") == 64
    with pytest.raises(ValueError, match="No module"):
        ActivationStore(tiny_model("gpt2"), ["transformer.h.9"], TEXTS, tokenizer=tok)
    with pytest.raises(ValueError, match="context_size=4096"):
        make_store(tok, context_size=4096)


def test_activation_cache_is_reused_resumed_and_checked(tok, tmp_path):
    model = tiny_model("gpt2")
    reference = [b["transformer.h.0"] for b in make_store(tok, model)]
    # A first run stops part-way (like a killed job): the cache holds its complete shards only.
    partial = make_store(tok, model, cache_dir=tmp_path / "cache")
    it = iter(partial)
    for _ in range(3):
        next(it)
    n_cached = len(list((tmp_path / "cache").glob("*.safetensors")))
    assert 0 < n_cached
    # The next run continues the cache and serves exactly the uncached batches.
    full = [b["transformer.h.0"] for b in make_store(tok, model, cache_dir=tmp_path / "cache")]
    assert len(full) == len(reference) and all(torch.equal(a, b) for a, b in zip(full, reference))
    # A complete cache needs no model forward at all.
    store = make_store(tok, model, cache_dir=tmp_path / "cache")
    store.harvester._trace = lambda tokens: (_ for _ in ()).throw(AssertionError("model was run"))
    again = [b["transformer.h.0"] for b in store]
    assert all(torch.equal(a, b) for a, b in zip(again, reference))
    with pytest.raises(ValueError, match=r"cache holds an activation cache with different settings:\n"
                                         r"  context_size: 16 → 8\nUse another cache_dir"):
        make_store(tok, model, cache_dir=tmp_path / "cache", context_size=8)
    # Another checkpoint under the same name, or other texts: refused, not served the first run's activations.
    other = tiny_model("gpt2")
    with torch.no_grad():
        other.transformer.h[1].mlp.c_fc.bias[-1] += 1.0
    with pytest.raises(ValueError, match=r"\n  model: [0-9a-f]{12}… → [0-9a-f]{12}…\n"):
        make_store(tok, other, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"\n  dataset\.n_documents: \d+ → \d+\n  dataset\.sha256: "):
        ActivationStore(model, ["blocks.1.hook_resid_post", "transformer.h.0"], TEXTS[1:], tokenizer=tok,
                        context_size=16, store_batch_size_prompts=3, cache_dir=tmp_path / "cache")


def test_store_mixing_is_saelens_cat_then_shuffle_then_serve_half(tok):
    # The store fills the served slots of one preallocated buffer instead of concatenating; what it serves must be
    # exactly the plain scheme: cat(kept half, new harvests), permute with the store's generator, serve half.
    model = tiny_model("gpt2")
    store = make_store(tok, model)
    served = [b["transformer.h.0"] for b in store]
    hook = store.hooks.index("transformer.h.0")
    chunks = list(store.chunks())
    harvests = [store.harvest(chunks[i:i + 3])[hook] for i in range(0, len(chunks), 3)]
    g = torch.Generator().manual_seed(1)
    expected, kept, exhausted = [], torch.empty(0, 64), False
    while not exhausted:
        parts = [kept]
        while sum(p.shape[0] for p in parts) < 4 * 32 and not exhausted:
            if harvests:
                parts.append(harvests.pop(0))
            else:
                exhausted = True
        buf = torch.cat(parts)
        buf = buf[torch.randperm(buf.shape[0], generator=g)]
        n_serve = (buf.shape[0] if exhausted else buf.shape[0] // 2) // 32 * 32
        expected += list(buf[:n_serve].split(32))
        kept = buf[n_serve:]
    assert len(served) == len(expected) > 4
    assert all(torch.equal(a, b) for a, b in zip(served, expected))
