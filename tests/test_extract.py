"""Batch feature extraction against ground truth computed here: plain HF forwards with torch hooks, `sae.encode`, and
brute-force statistics over all tokens; plus SIGKILL/resume, injected write errors and refused settings."""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import shutil
import signal
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from nnsae import SAE, SAEConfig, native
from nnsae.data import Document, pack
from nnsae.extract import Extraction, extract, histogram_edges, load_feature_stats, load_features, sae_names
from nnsae.rundir import RunLocked
from tests.tiny_models import tiny_model, tiny_tokenizer

ext = importlib.import_module("nnsae.extract")  # the module (`nnsae.extract` may name the function)

_PANGRAMS = ["The quick brown fox jumps over the lazy dog. " * 2, "Pack my box with five dozen liquor jugs.",
             "How vexingly quick daft zebras jump! " * 3, "Sphinx of black quartz, judge my vow."]
TEXTS = [f"Doc {i}: {_PANGRAMS[i % 4]}" for i in range(24)]
CTX, BATCH, SHARD = 32, 3, 128  # 4 chunks per shard: batches of 3 + 1, so shards and batches do not align
# Statistics over every token (the brute-force references count them all); the default leaves special tokens out.
SETTINGS = dict(context_size=CTX, batch_size_prompts=BATCH, shard_tokens=SHARD, top_k=5, n_top_contexts=3,
                context_window=4, histogram_bins=12, progress=False, exclude_special_tokens=False)
# (hook name for the SAE, HF module whose output it reads)
HOOKS = [("blocks.1.hook_resid_post", "model.layers.1"), ("blocks.0.hook_mlp_out", "model.layers.0.mlp"),
         ("blocks.1.hook_resid_post", "model.layers.1")]


def make_saes() -> list[SAE]:
    """A TopK SAE, a ReLU SAE (about half its features fire: top_k truncates) and a second TopK SAE on the first
    SAE's hook (same read point: one harvest, a de-duplicated name)."""
    torch.manual_seed(0)
    specs = [dict(architecture="topk", d_sae=48, k=8), dict(architecture="standard", d_sae=40),
             dict(architecture="topk", d_sae=32, k=4)]
    saes = []
    for (hook, _), spec in zip(HOOKS, specs):
        sae = SAE.from_config(SAEConfig(d_in=64, **spec, metadata={"hook_name": hook, "model_name": "tiny-llama"}))
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.2)
        saes.append(sae)
    return saes


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One reduction order everywhere (the ground truth, the runs here, the subprocess), so results compare bit
    for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    return tiny_model("llama"), tiny_tokenizer(), make_saes()


def run(setup, out: Path, **overrides) -> Path:
    model, tok, saes = setup
    return extract(model, saes, TEXTS, out, tokenizer=tok, **(SETTINGS | overrides))


def file_hashes(out: Path) -> dict[str, str]:
    files = sorted(p for sub in ("shards", "stats") for p in (out / sub).glob("*") if p.is_file())
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """An uninterrupted run."""
    out = run(setup, tmp_path_factory.mktemp("ref") / "feats")
    return out, file_hashes(out)


# ---- ground truth ------------------------------------------------------------------------------------------------


def ground_truth(setup, context_size=CTX, batch=BATCH, shard=SHARD):
    """Tokens [n_chunks, T] and, per SAE, dense `sae.encode` of every token [n_chunks*T, d_sae], from a plain HF
    forward with torch forward hooks, batched exactly as extract() batches (so results agree bit for bit)."""
    model, tok, saes = setup
    chunks = list(pack([Document(text=t) for t in TEXTS], tok, context_size))
    per_shard = shard // context_size
    batches = [chunks[s:s + per_shard][b:b + batch] for s in range(0, len(chunks), per_shard)
               for b in range(0, min(per_shard, len(chunks) - s), batch)]
    captured: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(module).register_forward_hook(
        lambda m, i, o, key=module: captured.__setitem__(key, o[0] if isinstance(o, tuple) else o))
        for module in {m for _, m in HOOKS}]
    dense = [[] for _ in saes]
    try:
        with torch.no_grad():
            for b in batches:
                model(torch.stack([c.tokens for c in b]))
                for i, (sae, (_, module)) in enumerate(zip(saes, HOOKS)):
                    dense[i].append(sae.encode(captured[module].flatten(0, 1)))
    finally:
        for h in handles:
            h.remove()
    return torch.stack([c.tokens for c in chunks]), [torch.cat(d) for d in dense]


def expected_lists(acts: torch.Tensor, top_k: int | None, threshold: float) -> list[tuple[list[int], list[float]]]:
    rows = []
    for row in acts:
        feats = [f for f in range(row.numel()) if abs(row[f].item()) > threshold]
        feats.sort(key=lambda f: (-row[f].item(), f))
        feats = feats[:top_k] if top_k is not None else feats
        rows.append((feats, [row[f].item() for f in feats]))
    return rows


# ---- tests -------------------------------------------------------------------------------------------------------


def test_features_equal_sae_encode_on_a_plain_forward(setup, reference, tmp_path):
    out, _ = reference
    tokens, dense = ground_truth(setup)
    names = sae_names(setup[2])
    assert names == ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post_2"]
    table = load_features(out, format="table")
    assert table.num_rows == tokens.numel()
    assert table.column("token_id").to_pylist() == tokens.flatten().tolist()
    assert table.column("chunk_index").to_pylist() == np.repeat(np.arange(len(tokens)), CTX).tolist()
    assert table.column("chunk_position").to_pylist() == np.tile(np.arange(CTX), len(tokens)).tolist()
    assert table.column("is_special").to_pylist() == (tokens.flatten() == 1).tolist()
    positions = table.column("position").to_pylist()
    assert positions[:3] == [-1, 0, 1] and table.column("doc_id").to_pylist()[:2] == [-1, 0]
    for name, acts in zip(names, dense):
        want = expected_lists(acts, top_k=5, threshold=0.0)
        assert table.column(f"{name}.indices").to_pylist() == [w[0] for w in want]
        assert table.column(f"{name}.values").to_pylist() == [w[1] for w in want]  # bit-identical floats
    assert max(len(v) for v in table.column(f"{names[1]}.indices").to_pylist()) == 5  # the ReLU SAE is truncated
    # The same shards through HF datasets.
    ds = load_features(out, cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == tokens.numel() and ds[CTX + 3] == table.slice(CTX + 3, 1).to_pylist()[0]

    # All features above a threshold instead of the top k; n_tokens rounds up to whole chunks.
    out2 = run(setup, tmp_path / "thr", top_k=None, threshold=0.05, n_tokens=7 * CTX + 1)
    table2 = load_features(out2, format="table")
    assert table2.num_rows == 8 * CTX
    want = expected_lists(dense[1][:8 * CTX], top_k=None, threshold=0.05)
    assert table2.column(f"{names[1]}.indices").to_pylist() == [w[0] for w in want]
    assert table2.column(f"{names[1]}.values").to_pylist() == [w[1] for w in want]


def brute_force_stats(acts: torch.Tensor, tokens: torch.Tensor, n_top: int, w: int, edges: torch.Tensor,
                      threshold: float = 0.0, counted: torch.Tensor | None = None) -> dict[str, object]:
    T = tokens.shape[1]
    counted = torch.ones(acts.shape[0], dtype=torch.bool) if counted is None else counted
    a = acts.double()
    fire = (a.abs() > threshold) & counted[:, None]
    masked = torch.where(fire, a, torch.zeros(()))
    hist = torch.zeros(acts.shape[1], edges.numel() + 1, dtype=torch.int64)
    pos = fire & (a > 0)
    hist[:, 0] = (pos & (a < edges[0])).sum(0)
    for i in range(1, edges.numel()):
        hist[:, i] = (pos & (a >= edges[i - 1]) & (a < edges[i])).sum(0)
    hist[:, -1] = (pos & (a >= edges[-1])).sum(0)
    top_index, top_values, top_tokens, top_acts = [], [], [], []
    flat_tokens = tokens.flatten()
    for f in range(acts.shape[1]):
        v = acts[:, f].numpy()
        idx = np.nonzero((v > threshold) & counted.numpy())[0]
        order = idx[np.lexsort((idx, -v[idx]))][:n_top]  # value desc, then earliest token
        top_index.append(order.tolist())
        top_values.append(v[order].tolist())
        wins_t, wins_a = [], []
        for g in order:
            c, p = divmod(int(g), T)
            qs = range(p - w, p + w + 1)
            wins_t.append([int(flat_tokens[c * T + q]) if 0 <= q < T else -1 for q in qs])
            wins_a.append([float(acts[c * T + q, f]) if 0 <= q < T else 0.0 for q in qs])
        top_tokens.append(wins_t)
        top_acts.append(wins_a)
    return {"firing_count": fire.sum(0), "activation_sum": masked.sum(0),
            "max_activation": torch.where(fire, a, torch.full((), -torch.inf)).max(0).values.float(),
            "histogram": hist, "top_index": top_index, "top_values": top_values, "top_tokens": top_tokens,
            "top_acts": top_acts}


def check_stats(stats: dict, want: dict, n_top: int) -> None:
    assert torch.equal(stats["firing_count"], want["firing_count"])
    torch.testing.assert_close(stats["activation_sum"], want["activation_sum"], rtol=1e-12, atol=1e-12)
    fired = want["firing_count"] > 0
    assert torch.equal(stats["max_activation"][fired], want["max_activation"][fired])
    assert torch.equal(stats["histogram"], want["histogram"])
    assert stats["histogram"].sum() > 0
    mean = want["activation_sum"] / want["firing_count"].clamp(min=1)
    torch.testing.assert_close(stats["mean_activation"], mean, rtol=1e-12, atol=1e-12)
    for f in range(len(want["top_index"])):
        n = len(want["top_index"][f])
        assert stats["top_index"][f, :n].tolist() == want["top_index"][f]
        assert stats["top_index"][f, n:].eq(-1).all() and stats["top_values"][f, n:].eq(-torch.inf).all()
        assert stats["top_values"][f, :n].tolist() == want["top_values"][f]
        assert stats["top_tokens"][f, :n].tolist() == want["top_tokens"][f]
        assert stats["top_acts"][f, :n].tolist() == want["top_acts"][f]


def test_streaming_stats_and_top_contexts_equal_brute_force(setup, reference):
    out, _ = reference
    tokens, dense = ground_truth(setup)
    edges = histogram_edges(12)
    for name, acts in zip(sae_names(setup[2]), dense):
        stats = load_feature_stats(out, name)
        assert stats["complete"] and stats["n_tokens"] == tokens.numel()
        want = brute_force_stats(acts, tokens, n_top=3, w=4, edges=edges)
        check_stats(stats, want, 3)
        ties = [f for f in range(acts.shape[1]) if len(set(want["top_values"][f])) < len(want["top_values"][f])]
        assert ties  # the BOS token repeats, so equal values must be broken by token order (and were)
        index = stats["top_index"]
        assert torch.equal(stats["top_chunk_index"], torch.where(index >= 0, index // CTX, -1))
    summary = json.loads((out / "stats" / f"{name}.json").read_text())
    assert summary["n_tokens"] == tokens.numel() and len(summary["histogram_edges"]) == 13


@pytest.mark.parametrize("n_top", [0, 3])
# ~15, ~90 and ~2 entries per token; in the last most windows find none of their feature's entries
@pytest.mark.parametrize("d, cut", [(40, 0.9), (240, 0.9), (4096, 3.5)])
def test_native_and_torch_statistics_reach_the_same_state(monkeypatch, n_top, d, cut):
    """`FeatureStats.update` by the native kernel and by torch ops: the same state bit for bit, on batches with
    ties, negative values, entries under the threshold and tokens left out."""
    B, T = 3, 16
    states = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("NNSAE_NATIVE", mode)
        assert (native.library() is not None) == (mode == "1") or shutil.which("c++") is None
        g = torch.Generator().manual_seed(0)
        stats = ext.FeatureStats(d, histogram_edges(12), n_top, 4, 0.05)
        for batch in range(8):
            acts = torch.randn(B * T, d, generator=g).round(decimals=1)  # rounding makes ties
            acts[acts.abs() < cut] = 0
            acts[::5] = acts[::5].abs() * 0.04  # under the threshold
            rows, feats = (acts != 0).nonzero(as_tuple=True)
            vals = acts[rows, feats]
            order = ext._grouped_desc(rows, vals)  # extraction's order: row, value desc, feature
            tokens = torch.randint(0, 50, (B, T), generator=g)
            counted = tokens.flatten() % 7 != 0 if batch % 2 else None
            stats.update(rows[order], feats[order], vals[order], tokens, counted, batch * B * T)
        states[mode] = stats.state_dict()
    assert states["1"]["n_tokens_counted"] < states["1"]["n_tokens"]
    for key, value in states["1"].items():
        assert torch.equal(value, states["0"][key]), key


@pytest.mark.parametrize("mode", ["1", "0"])
def test_histogram_puts_a_value_on_an_edge_in_the_bin_above(monkeypatch, mode):
    monkeypatch.setenv("NNSAE_NATIVE", mode)
    edges = histogram_edges([0.5, 1.0, 2.0, 4.0])
    values = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0, -1.0, 0.0]
    stats = ext.FeatureStats(1, edges, 0, 0, 0.0)
    vals = torch.tensor(values)
    n = vals.numel()
    stats.update(torch.arange(n), torch.zeros(n, dtype=torch.long), vals, torch.zeros(1, n, dtype=torch.long),
                 None, 0)
    # [0]: below 0.5; [i]: edges[i-1] <= v < edges[i]; [-1]: 4 and above; zero and negative values are not counted
    assert stats.state_dict()["histogram"][0].tolist() == [1, 2, 2, 2, 2]


def test_stats_can_leave_special_tokens_out(setup, tmp_path):
    out = run(setup, tmp_path / "nospecial", exclude_special_tokens=True, n_tokens=12 * CTX, top_k=3)
    tokens, dense = ground_truth(setup)
    tokens, acts = tokens[:12], dense[0][:12 * CTX]
    counted = tokens.flatten() != 1
    stats = load_feature_stats(out, "blocks.1.hook_resid_post")
    assert stats["n_tokens_counted"] == int(counted.sum()) and stats["n_tokens"] == 12 * CTX
    check_stats(stats, brute_force_stats(acts, tokens, 3, 4, histogram_edges(12), counted=counted), 3)
    is_special = load_features(out, format="table").column("is_special").to_pylist()
    assert is_special.count(True) == int((~counted).sum()) > 12  # BOS and separators: still written


def _killable_run(setup, out: Path) -> int:
    """Fork a child that extracts into `out` and stalls inside the commit of shard 2: after its parquet file and
    the first SAE's new statistics state are written, before the manifest names them. (A fork shares the loaded
    modules and model, so no second interpreter start-up; the module runs single-threaded, which forking needs.)"""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            write_state = ext.write_safetensors

            def stalling_write_state(path, tensors):
                write_state(path, tensors)
                if path.name.endswith(".000003.safetensors"):
                    time.sleep(60)

            ext.write_safetensors = stalling_write_state
            run(setup, out)
            code = 0
        finally:
            os._exit(code)
    return pid


def test_sigkill_mid_commit_then_resume_is_byte_identical(setup, reference, tmp_path):
    ref_out, ref_hashes = reference
    out = tmp_path / "killed"
    pid = _killable_run(setup, out)
    marker = out / "stats" / "state" / "blocks.1.hook_resid_post.000003.safetensors"
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
        time.sleep(0.01)
    assert marker.exists(), "the child did not reach the kill point"
    with pytest.raises(RunLocked, match=rf"{out} is in use: an nnsae extraction \(pid {pid} on .*\) holds"):
        run(setup, out)  # a second extraction into the same directory, while the first one runs
    os.kill(pid, signal.SIGKILL)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == -signal.SIGKILL
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    assert (out / "shards" / "shard-000002.parquet").exists()  # written but never committed
    # The killed directory is readable as it is: the committed shards and statistics.
    assert load_features(out, format="table").num_rows == 2 * SHARD
    assert load_feature_stats(out, "blocks.1.hook_resid_post")["n_tokens"] == 2 * SHARD

    run(setup, out)  # the same call again
    assert file_hashes(out) == ref_hashes
    manifest = json.loads((out / "manifest.json").read_text())
    ref_manifest = json.loads((ref_out / "manifest.json").read_text())
    assert manifest["shards"] == ref_manifest["shards"] and manifest["complete"]
    chunk_index = load_features(out, format="table").column("chunk_index").to_numpy()
    assert np.array_equal(np.unique(chunk_index), np.arange(manifest["total_chunks"]))  # every token exactly once
    assert len(chunk_index) == manifest["total_tokens"]
    assert sorted(p.name for p in (out / "stats" / "state").iterdir()) == sorted(
        f"{n}.{len(manifest['shards']):06d}.safetensors" for n in sae_names(setup[2]))
    assert not [p for p in out.rglob(".tmp-*")]
    run(setup, out)  # a finished run called again: nothing changes
    assert file_hashes(out) == ref_hashes


@pytest.mark.parametrize("dense_copy", [True, False])
def test_torch_statistics_give_the_same_bytes(setup, reference, tmp_path, monkeypatch, dense_copy):
    """The statistics' torch path (where no compiler is), with its window lookup by a dense copy of the batch or, for
    very wide SAEs / big batches, by binary search: the same files as the reference run (native statistics where a
    compiler is). Only the statistics switch path: the SAEs encode as in the reference run."""
    monkeypatch.setattr(ext, "native", types.SimpleNamespace(library=lambda: None))
    if not dense_copy:
        monkeypatch.setattr(ext, "DENSE_LOOKUP_LIMIT", 0)
    assert file_hashes(run(setup, tmp_path / "torch-stats")) == reference[1]


@pytest.mark.parametrize("writer", ["_write_parquet", "write_safetensors", "write_json"])
def test_write_error_leaves_a_valid_resumable_directory(setup, reference, tmp_path, monkeypatch, writer):
    _, ref_hashes = reference
    real = getattr(ext, writer)
    calls = {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(ext, writer, failing)
    out = tmp_path / "full"
    with pytest.raises(OSError, match="No space left on device.*resumable") as info:
        run(setup, out)
    assert info.value.errno == errno.ENOSPC
    manifest = json.loads((out / "manifest.json").read_text())
    committed = len(manifest["shards"])
    assert 0 < committed < 5 and load_features(out, format="table").num_rows == committed * SHARD
    monkeypatch.setattr(ext, writer, real)
    run(setup, out)
    assert file_hashes(out) == ref_hashes


def test_resume_keeps_user_files_and_refuses_a_corrupted_shard(setup, reference, tmp_path):
    out = run(setup, tmp_path / "feats")
    notes = out / "shards" / "notes.txt"
    notes.write_text("mine")
    run(setup, out)  # called again: strays of extract() are cleaned, nothing else
    assert notes.read_text() == "mine" and file_hashes(out) == reference[1] | {"shards/notes.txt": hashlib.sha256(
        b"mine").hexdigest()}
    shard = out / "shards" / "shard-000001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-000001\.parquet is listed in .* does not match its recorded size "
                                         r"and sha256.*overwrite=True"):
        run(setup, out)
    run(setup, out, overwrite=True)  # the same run, started again
    assert file_hashes(out) == reference[1] | {"shards/notes.txt": hashlib.sha256(b"mine").hexdigest()}
    run(setup, out, overwrite=True, context_window=5)  # a different run replaces it
    assert Extraction(out).settings["context_window"] == 5 and notes.read_text() == "mine"


def test_reader_refuses_a_hostile_manifest(setup, reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    extraction = Extraction(out)
    assert extraction.sae_names == sae_names(setup[2]) and extraction.complete
    assert extraction.shard_files == sorted((out / "shards").glob("shard-*.parquet"))
    manifest = json.loads((out / "manifest.json").read_text())
    for field, value, error in [("saes", [dict(manifest["saes"][0], name="../escaped")], "'../escaped' cannot be"),
                                ("shards", [dict(manifest["shards"][0], file="../../etc/passwd")], "'..' cannot be")]:
        (out / "manifest.json").write_text(json.dumps(dict(manifest, **{field: value})))
        with pytest.raises(ValueError, match=error):
            load_features(out, format="table")


def test_refuses_different_settings_models_and_missing_data(setup, tmp_path):
    model, tok, saes = setup
    out = run(setup, tmp_path / "a", n_tokens=4 * CTX)
    with pytest.raises(ValueError, match=r"different settings:\n  settings\.context_window: 4 → 5\n"
                                         r"  settings\.top_k: 5 → 6\n.*overwrite=True"):
        run(setup, out, n_tokens=4 * CTX, top_k=6, context_window=5)
    other = make_saes()
    with torch.no_grad():
        other[1].W_enc.add_(1.0)
    with pytest.raises(ValueError, match=r"saes\.blocks\.0\.hook_mlp_out\.fingerprint"):
        extract(model, other, TEXTS, out, tokenizer=tok, **(SETTINGS | {"n_tokens": 4 * CTX}))
    with pytest.raises(ValueError, match=r"saes\.blocks\.1\.hook_resid_post_2 \(only in the existing run\)"):
        extract(model, saes[:2], TEXTS, out, tokenizer=tok, **(SETTINGS | {"n_tokens": 4 * CTX}))
    with pytest.raises(ValueError, match=r"dataset"):
        extract(model, saes, TEXTS[1:], out, tokenizer=tok, **(SETTINGS | {"n_tokens": 4 * CTX}))

    mixed = make_saes()[:2]
    mixed[1].cfg.metadata.model_name = "gpt2"
    with pytest.raises(ValueError, match="same model.*tiny-llama.*'gpt2'"):
        extract(model, mixed, TEXTS, tmp_path / "b", tokenizer=tok)
    assert not (tmp_path / "b").exists()

    with pytest.raises(ValueError, match="gave no tokens"):
        extract(model, saes, ["too short"], tmp_path / "c", tokenizer=tok, context_size=CTX, progress=False)
    with pytest.raises(ValueError, match="gave no tokens"):
        extract(model, saes, [], tmp_path / "c", tokenizer=tok, progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extract(model, saes, str(tmp_path / "missing.jsonl"), tmp_path / "d", tokenizer=tok, progress=False)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        run(setup, tmp_path / "e")
    assert os.listdir(tmp_path / "e") == ["notes.txt"]  # nothing written into a directory that is not ours


def test_other_architectures_hook_z_and_no_contexts(tmp_path):
    """JumpReLU and a hook_z TopK SAE (fed [.., n_heads, d_head] as SAELens does), without top contexts."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    torch.manual_seed(1)
    jump = SAE.from_config(SAEConfig(d_in=64, d_sae=24, architecture="jumprelu",
                                     metadata={"hook_name": "blocks.1.hook_mlp_out"}))
    hook_z = SAE.from_config(SAEConfig(d_in=64, d_sae=20, architecture="topk", k=3, reshape_activations="hook_z",
                                       metadata={"hook_name": "blocks.0.attn.hook_z"}))
    with torch.no_grad():
        jump.threshold.uniform_(0.0, 0.05)
        jump.b_enc.normal_(0, 0.2)
    out = extract(model, {"jump": jump, "z": hook_z}, TEXTS[:6], tmp_path / "f", tokenizer=tok, context_size=CTX,
                  n_top_contexts=0, top_k=None, progress=False, exclude_special_tokens=False)
    chunks = list(pack([Document(text=t) for t in TEXTS[:6]], tok, CTX))
    tokens = torch.stack([c.tokens for c in chunks])
    seen = {}
    handles = [model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", o)),
               model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(
                   lambda m, args: seen.__setitem__("z", args[0]))]
    with torch.no_grad():
        for i in range(0, len(chunks), 8):
            model(tokens[i:i + 8])
            seen.setdefault("all", []).append((jump.encode(seen["mlp"].flatten(0, 1)),
                                               hook_z.encode(seen["z"].flatten(0, 1).unflatten(-1, (4, 16)))))
    for h in handles:
        h.remove()
    table = load_features(out, format="table")
    for j, name in enumerate(["jump", "z"]):
        acts = torch.cat([a[j] for a in seen["all"]])
        want = expected_lists(acts, top_k=None, threshold=0.0)
        assert table.column(f"{name}.indices").to_pylist() == [w[0] for w in want]
        assert table.column(f"{name}.values").to_pylist() == [w[1] for w in want]
        stats = load_feature_stats(out, name)
        assert stats["top_index"].shape == (acts.shape[1], 0)
        assert torch.equal(stats["firing_count"], (acts != 0).sum(0))
