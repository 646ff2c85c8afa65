"""The pretrained registry, Hub downloads and `SAE.from_pretrained`, against a loopback Hugging Face Hub.

No network: `FakeHub` serves repos from memory on 127.0.0.1 the way the Hub's resolve endpoint does, and
`huggingface_hub` is pointed at it; the download cache lives in tmp_path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants as hf_constants
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save as safetensors_bytes

from nnsae import SAE, SAEConfig
from nnsae.io import hub, registry
from nnsae.io.formats import FORMAT_NAMES, get_format
from nnsae.io.pretrained import apply_overrides

LFS_SUFFIXES = (".safetensors", ".npz", ".pt", ".bin")


# ---- a loopback Hugging Face Hub ---------------------------------------------------------------------------------


class FakeHub:
    """Serves in-memory repos like huggingface.co does for `hf_hub_download`.

    Hub server: `HEAD|GET /{repo_id}/resolve/{revision}/{path}`.
      - small files: 200 with `ETag` (git blob sha1), `X-Repo-Commit`, `Content-Length` (and the body on GET);
      - LFS files (*.safetensors, *.npz, ...): 302 with `Location` on a second "CDN" server (another origin, so the
        client does not follow it for metadata), `X-Linked-Etag` (sha256), `X-Linked-Size`, `X-Repo-Commit`;
      - errors carry `X-Error-Code`: 401 RepoNotFound, 404 RevisionNotFound, 404 EntryNotFound (+ X-Repo-Commit).
    CDN server: `HEAD|GET /lfs/{sha256}` → 200 with the bytes.
    Every request is logged as (server, method, path).
    """

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self.hub = self._start(self._handle_hub)
        self.cdn = self._start(self._handle_cdn)
        self.endpoint = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_endpoint = f"http://127.0.0.1:{self.cdn.server_address[1]}"
        self.running = True

    # -- content --

    def add_commit(self, repo_id: str, files: dict[str, bytes], *, refs: tuple[str, ...] = ("main",)) -> str:
        """Add a commit holding `files` (the whole tree) and point `refs` at it; return its sha."""
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        digest = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode())
        sha = digest.hexdigest()
        repo["commits"][sha] = dict(files)
        for ref in refs:
            repo["refs"][ref] = sha
        for content in files.values():
            self.blobs[hashlib.sha256(content).hexdigest()] = content
        return sha

    def requested(self, server: str = "hub", method: str | None = None) -> list[str]:
        """Paths requested: resolve URLs on the hub, blob URLs on the CDN.

        huggingface_hub's own housekeeping call (`/api/agent-harnesses`, fetched at most daily to label its
        user agent) is left out; any other non-resolve hub request is kept so tests see it.
        """
        with self._lock:
            return [p for s, m, p in self.log if s == server and (method is None or m == method)
                    and p != "/api/agent-harnesses"]

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def stop(self) -> None:
        if self.running:
            for server in (self.hub, self.cdn):
                server.shutdown()
                server.server_close()
            self.running = False

    # -- HTTP --

    def _start(self, handle) -> ThreadingHTTPServer:
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802
                handle(self, head=True)

            def do_GET(self) -> None:  # noqa: N802
                handle(self, head=False)

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        server.hub_ = hub_  # type: ignore[attr-defined]
        return server

    @staticmethod
    def _reply(req: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        req.send_response(status)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)

    def _error(self, req, status: int, code: str, message: str, head: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._reply(req, status, headers, json.dumps({"error": message}).encode(), head)

    def _handle_hub(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = urlsplit(req.path).path
        with self._lock:
            self.log.append(("hub", req.command, path))
        parts = path.lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(req, 404, "NotFound", "unknown endpoint", head)
        repo_id, revision, filename = f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:]))
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(req, 401, "RepoNotFound", "Repository not found", head)
        commit = repo["refs"].get(revision) or (revision if revision in repo["commits"] else None)
        if commit is None:
            return self._error(req, 404, "RevisionNotFound", "Invalid rev id: " + revision, head)
        content = repo["commits"][commit].get(filename)
        if content is None:
            return self._error(req, 404, "EntryNotFound", "Entry not found", head, commit=commit)
        if filename.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(content).hexdigest()
            headers = {"Location": f"{self.cdn_endpoint}/lfs/{sha256}", "X-Repo-Commit": commit,
                       "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(content)),
                       "ETag": f'"{_git_sha1(sha256.encode())}"'}
            return self._reply(req, 302, headers, b"", head)
        headers = {"ETag": f'"{_git_sha1(content)}"', "X-Repo-Commit": commit,
                   "Content-Type": "application/octet-stream"}
        return self._reply(req, 200, headers, content, head)

    def _handle_cdn(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = urlsplit(req.path).path
        with self._lock:
            self.log.append(("cdn", req.command, path))
        content = self.blobs.get(path.rsplit("/", 1)[-1])
        if not path.startswith("/lfs/") or content is None:
            return self._reply(req, 404, {}, b"not found", head)
        sha256 = path.rsplit("/", 1)[-1]
        self._reply(req, 200, {"ETag": f'"{sha256}"', "Content-Type": "application/octet-stream"}, content, head)


def _git_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A running FakeHub; huggingface_hub talks to it and caches into tmp_path/hf-cache."""
    server = FakeHub()
    monkeypatch.setattr(hf_constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    if hasattr(hf_constants, "AGENT_HARNESSES_PATH"):  # keep huggingface_hub's own cache files out of ~/.cache
        monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield server
    server.stop()


@pytest.fixture
def offline(monkeypatch):
    def go_offline() -> None:
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return go_offline


@pytest.fixture
def test_release():
    """Register releases for the test and remove them afterwards."""
    names = []

    def add(name: str, spec: dict) -> registry.Release:
        names.append(name)
        return registry.register_release(name, spec, overwrite=True)

    yield add
    for name in names:
        registry.unregister_release(name)


# ---- SAE files in the formats' layouts ----------------------------------------------------------------------------


def make_sae(seed: int, d_in: int = 8, d_sae: int = 16, **cfg) -> SAE:
    torch.manual_seed(seed)
    sae = SAE.from_config(SAEConfig(d_in=d_in, d_sae=d_sae, **cfg))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return sae


def saelens_files(sae: SAE, folder: str, tmp_path: Path, sparsity: bool = True) -> dict[str, bytes]:
    out = tmp_path / f"build-{folder.replace('/', '_')}-{id(sae)}"
    log_sparsity = torch.linspace(-6, -1, sae.cfg.d_sae) if sparsity else None
    sae.save_model(out, log_sparsity)
    prefix = f"{folder}/" if folder else ""
    return {prefix + p.name: p.read_bytes() for p in out.iterdir()}


def gemma_scope_npz(seed: int, d_in: int = 6, d_sae: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    arrays = {"w_enc": rng.normal(size=(d_in, d_sae)), "w_dec": rng.normal(size=(d_sae, d_in)),
              "b_enc": rng.normal(size=d_sae), "b_dec": rng.normal(size=d_in), "threshold": rng.uniform(size=d_sae)}
    buffer = io.BytesIO()
    np.savez(buffer, **{k: v.astype(np.float32) for k, v in arrays.items()})
    return buffer.getvalue()


def x_batch(d_in: int = 8, n: int = 5) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(0))


# ---- the registry data --------------------------------------------------------------------------------------------


def test_registry_covers_public_releases_with_their_formats():
    rows = {row.release: row for row in registry.list_pretrained()}
    expected = {  # release: (format, number of SAEs)
        "gpt2-small-res-jb": ("saelens", 13),
        "gpt2-small-res-jb-feature-splitting": ("saelens", 8),
        "mistral-7b-res-wg": ("saelens", 3),
        "pythia-70m-deduped-res-sm": ("saelens", 7),
        "gemma-scope-2b-pt-res": ("gemma_scope", 316),
        "gemma-scope-2b-pt-res-canonical": ("gemma_scope", 58),
        "gemma-scope-2b-pt-mlp-canonical": ("gemma_scope", 52),
        "gemma-scope-2b-pt-att-canonical": ("gemma_scope", 52),
        "gemma-scope-9b-pt-res-canonical": ("gemma_scope", 90),
        "gemma-scope-2-270m-pt-res": ("gemma_scope_2", 52),
        "gemma-scope-2-4b-pt-res-all": ("gemma_scope_2", 136),
        "gemma-scope-2-27b-pt-transcoders-all": ("gemma_scope_2", 491),
        "llama_scope_lxr_8x": ("llama_scope", 32),
        "llama_scope_lxm_32x": ("llama_scope", 32),
        "sae_bench_pythia70m_sweep_topk_ctx128_0730": ("dictionary_learning", 48),
        "sae_bench_gemma-2-2b_topk_width-2pow12_date-1109": ("dictionary_learning", 144),
        "sae-llama-3-8b-32x": ("sparsify", 31),
        "sae-pythia-70m-deduped-32k": ("sparsify", 18),
    }
    for release, (fmt, n) in expected.items():
        assert (rows[release].format, rows[release].n_saes) == (fmt, n), release
    assert len(rows) >= 140 and sum(r.n_saes for r in rows.values()) > 12_000
    for row in rows.values():
        assert row.format in FORMAT_NAMES and row.n_saes > 0 and "/" in row.repo_id
        assert len(set(registry.list_sae_ids(row.release))) == row.n_saes


def test_registry_entries_keep_the_public_facts():
    e = registry.lookup("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    assert (e.repo_id, e.path, e.l0, e.neuronpedia) == (
        "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre", 60.0, "gpt2-small/8-res-jb")
    assert e.config_overrides == {"model_from_pretrained_kwargs": {"center_writing_weights": True}}
    assert registry.lookup("gpt2-small-res-jb", "blocks.11.hook_resid_post").neuronpedia == "gpt2-small/12-res-jb"

    e = registry.lookup("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")
    assert (e.repo_id, e.path, e.neuronpedia, e.l0) == (
        "google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82", "gemma-2-2b/12-gemmascope-res-16k", None)
    e = registry.lookup("gemma-scope-2b-pt-res", "layer_5/width_16k/average_l0_143")
    assert (e.l0, e.neuronpedia) == (143, "gemma-2-2b/5-gemmascope-res-16k__l0-143")
    assert registry.lookup("gemma-scope-2b-pt-res", "embedding/width_4k/average_l0_6").l0 is None
    e = registry.lookup("gemma-scope-9b-pt-res-canonical", "layer_20/width_524k/canonical")
    assert (e.path, e.l0) == ("layer_20/width_524k/average_l0_48", 78)  # as published, l0 and folder disagree

    e = registry.lookup("gemma-scope-2-4b-pt-res", "layer_17_width_16k_l0_medium")
    assert (e.repo_id, e.path, e.l0, e.neuronpedia) == ("google/gemma-scope-2-4b-pt",
                                                        "resid_post/layer_17_width_16k_l0_medium", 60,
                                                        "gemma-3-4b/17-gemmascope-2-res-16k")
    assert registry.lookup("gemma-scope-2-4b-pt-res", "layer_9_width_262k_l0_medium_seed_1").l0 == 53
    ids = registry.list_sae_ids("gemma-scope-2-27b-pt-transcoders-all")
    assert "layer_4_width_16k_l0_big" not in ids and "layer_4_width_16k_l0_big_affine" in ids

    e = registry.lookup("llama_scope_lxr_8x", "l0r_8x")
    assert (e.repo_id, e.path, e.norm_scaling_factor, e.neuronpedia) == (
        "fnlp/Llama3_1-8B-Base-LXR-8x", "Llama3_1-8B-Base-L0R-8x", 58.935251798561154,
        "llama3.1-8b/0-llamascope-res-32k")
    e = registry.lookup("pythia-70m-deduped-res-sm", "blocks.0.hook_resid_pre")
    assert (e.repo_id, e.path) == ("ctigges/pythia-70m-deduped__res-sm_processed", "e-res-sm")
    e = registry.lookup("sae_bench_pythia70m_sweep_standard_ctx128_0712", "blocks.4.hook_resid_post__trainer_3")
    assert (e.repo_id, e.format) == ("canrager/lm_sae", "dictionary_learning")
    assert e.path == "pythia70m_sweep_standard_ctx128_0712/resid_post_layer_4/trainer_3"
    assert registry.lookup("mistral-7b-res-wg", "blocks.8.hook_resid_pre").config_overrides == {
        "normalize_activations": "constant_norm_rescale"}
    e = registry.lookup("sae-llama-3-8b-32x", "layers.10")
    assert (e.repo_id, e.path, e.format, e.l0) == ("EleutherAI/sae-llama-3-8b-32x", "layers.10", "sparsify", 192)


def test_registry_matches_saelens_release_data():
    """Every release we share with SAELens names the same repo, model, overrides and SAEs (ids, folders, l0,
    Neuronpedia ids, norm factors). Reads sae-lens' data file; sae_lens itself is not imported."""
    spec = importlib.util.find_spec("sae_lens")
    assert spec is not None and spec.origin, "this test reads sae-lens' pretrained_saes.yaml (install sae-lens)"
    with open(Path(spec.origin).parent / "pretrained_saes.yaml") as f:
        theirs = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    formats = {None: "saelens", "gemma_2": "gemma_scope", "gemma_3": "gemma_scope_2", "llama_scope": "llama_scope",
               "dictionary_learning_1": "dictionary_learning", "sparsify": "sparsify"}
    ours = registry.releases()
    shared = [name for name in ours if name in theirs]
    assert len(shared) >= 140
    assert not [n for n, r in theirs.items() if formats.get(r.get("conversion_func"), "-") in FORMAT_NAMES
                and n not in ours], "a SAELens release in a supported format is missing"
    for name in shared:
        rel, ref = ours[name], theirs[name]
        assert (rel.repo_id, rel.model, rel.format) == (ref["repo_id"], ref["model"],
                                                        formats[ref.get("conversion_func")]), name
        assert rel.config_overrides == (ref.get("config_overrides") or {}), name
        assert set(rel.saes) == {s["id"] for s in ref["saes"]} and len(rel.saes) == len(ref["saes"]), name
        for s in ref["saes"]:
            mine = rel.saes[s["id"]]
            for key in ("path", "l0", "neuronpedia", "norm_scaling_factor", "variance_explained"):
                assert mine.get(key) == s.get(key), (name, s["id"], key)


def test_list_pretrained_filters():
    assert {r.release for r in registry.list_pretrained("llama_scope")} == {
        f"llama_scope_lx{p}_{x}" for p in "ram" for x in ("8x", "32x")}
    assert {r.release for r in registry.list_pretrained("gemma-scope-2-270m-pt-*")} == {
        f"gemma-scope-2-270m-pt-{k}{a}" for k in ("res", "mlp", "att", "transcoders") for a in ("", "-all")}
    assert all("pythia" in (r.model + r.repo_id + r.release).lower() for r in registry.list_pretrained("PYTHIA"))
    assert registry.list_pretrained("no-such-thing") == []


def test_unknown_release_and_sae_id_suggest_close_matches():
    with pytest.raises(registry.PretrainedLookupError, match="Did you mean 'gpt2-small-res-jb'"):
        registry.lookup("gpt2-small-res-jbb", "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="'blocks.8.hook_resid_pre'"):  # also a ValueError, as in SAELens
        SAE.from_pretrained_with_cfg_and_sparsity("gpt2-small-res-jb", "blocks.8.hook_resid_pr")
    with pytest.raises(KeyError, match="is the folder of SAE id 'layer_3/width_16k/canonical'"):
        registry.lookup("gemma-scope-2b-pt-res-canonical", "layer_3/width_16k/average_l0_59")
    with pytest.raises(registry.PretrainedLookupError, match="Hugging Face repo id"):
        registry.lookup("nonsense", "x")
    raw = registry.lookup("someone/some-repo", "/a/b/")
    assert (raw.repo_id, raw.path, raw.format, raw.in_registry) == ("someone/some-repo", "a/b", None, False)


def test_expand_rules(test_release):
    rel = test_release("t-rules", {
        "repo_id": "t/rules", "model": "m", "format": "saelens",
        "expand": [{"for": [[{"size": "big", "layer": "0..2", "l0": [60, 70, 80]},
                             {"size": "small", "layer": "0..2", "l0": [10, 15, 20]}],
                            {"width": ["16k", "1m"]}],
                    "sae": {"id": "layer_{layer}_width_{width}_l0_{size}", "path": "res/{id}", "l0": "{l0}",
                            "neuronpedia": "m/{layer}-res-{width}"},
                    "except": ["layer_2_width_1m_l0_small"]}],
        "saes": ["plain/id", {"id": "layer_0_width_16k_l0_big", "neuronpedia": None, "l0": 61.5},
                 {"id": "other", "path": "elsewhere", "norm_scaling_factor": 2.0}],
    })
    assert rel.n_saes == 11 + 2
    assert rel.saes["layer_1_width_1m_l0_small"] == {"id": "layer_1_width_1m_l0_small",
                                                     "path": "res/layer_1_width_1m_l0_small", "l0": 15,
                                                     "neuronpedia": "m/1-res-1m"}
    assert rel.saes["layer_0_width_16k_l0_big"] == {"id": "layer_0_width_16k_l0_big",
                                                    "path": "res/layer_0_width_16k_l0_big", "l0": 61.5}
    assert rel.saes["plain/id"] == {"id": "plain/id", "path": "plain/id"}
    assert registry.lookup("t-rules", "other").norm_scaling_factor == 2.0
    bad = {"repo_id": "t/x", "format": "saelens"}
    with pytest.raises(ValueError, match="different lengths"):
        registry.expand_release("bad", {**bad, "expand": [{"for": [{"a": [1, 2], "b": [1]}], "sae": {"id": "{a}"}}]})
    with pytest.raises(ValueError, match="unknown format"):
        registry.expand_release("bad", {**bad, "format": "nope"})
    with pytest.raises(ValueError, match="unknown SAE entry field"):
        registry.expand_release("bad", {**bad, "saes": [{"id": "a", "l1": 3}]})
    with pytest.raises(ValueError, match="does not generate"):
        registry.expand_release("bad", {**bad, "expand": [{"for": {"a": "1..3"}, "sae": {"id": "x{a}"},
                                                           "except": ["x4"]}]})
    with pytest.raises(ValueError, match="already exists"):
        registry.register_release("gpt2-small-res-jb", bad)


def test_apply_overrides_puts_non_config_keys_in_metadata():
    cfg = {"d_in": 4, "d_sae": 8, "normalize_activations": "none", "metadata": {"hook_name": "h", "x": 1}}
    out = apply_overrides(cfg, {"normalize_activations": "constant_norm_rescale", "neuronpedia_id": "m/0-res",
                                "model_from_pretrained_kwargs": {"center_writing_weights": True}, "device": "cpu"})
    assert out["normalize_activations"] == "constant_norm_rescale" and out["device"] == "cpu"
    assert out["metadata"] == {"hook_name": "h", "x": 1, "neuronpedia_id": "m/0-res",
                               "model_from_pretrained_kwargs": {"center_writing_weights": True}}
    assert cfg["metadata"] == {"hook_name": "h", "x": 1}  # input untouched


# ---- loading through the (loopback) Hub ---------------------------------------------------------------------------


GPT2_REPO = "jbloom/GPT2-Small-SAEs-Reformatted"


def test_load_by_release_name_fetches_only_that_sae(fake_hub, tmp_path):
    sae8 = make_sae(8, metadata={"model_name": "gpt2-small", "hook_name": "blocks.8.hook_resid_pre"})
    files = {**saelens_files(sae8, "blocks.8.hook_resid_pre", tmp_path),
             **saelens_files(make_sae(9), "blocks.9.hook_resid_pre", tmp_path), "README.md": b"# SAEs"}
    fake_hub.add_commit(GPT2_REPO, files)

    sae, cfg, sparsity = SAE.from_pretrained_with_cfg_and_sparsity("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    x = x_batch()
    torch.testing.assert_close(sae(x), sae8(x))
    for name, p in sae8.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[name], p)
    torch.testing.assert_close(sparsity, torch.linspace(-6, -1, 16))
    assert sae.log_feature_sparsity is sparsity
    md = sae.cfg.metadata
    assert md.neuronpedia_id == "gpt2-small/8-res-jb"
    assert md.model_from_pretrained_kwargs == {"center_writing_weights": True}
    assert md.hook_name == "blocks.8.hook_resid_pre"
    assert cfg == sae.cfg.to_dict() and cfg["metadata"]["neuronpedia_id"] == "gpt2-small/8-res-jb"

    wanted = {f"/{GPT2_REPO}/resolve/main/blocks.8.hook_resid_pre/{f}"
              for f in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")}
    assert set(fake_hub.requested("hub")) == wanted  # nothing from blocks.9, no README, no API listing
    assert len(fake_hub.requested("cdn", "GET")) == 2  # the two LFS files, once each


def test_load_by_raw_repo_id_detects_the_layout(fake_hub, tmp_path):
    sae = make_sae(1)
    fake_hub.add_commit("someone/my-saes", saelens_files(sae, "run1/blocks.0.hook_resid_pre", tmp_path,
                                                         sparsity=False))
    loaded, _, sparsity = SAE.from_pretrained_with_cfg_and_sparsity("someone/my-saes", "run1/blocks.0.hook_resid_pre")
    assert sparsity is None
    torch.testing.assert_close(loaded(x_batch()), sae(x_batch()))

    # a sparsify folder: cfg.json exists but not sae_weights.safetensors, so the SAELens layout is rejected
    torch.manual_seed(0)
    weights = {"encoder.weight": torch.randn(32, 8), "encoder.bias": torch.randn(32), "W_dec": torch.randn(32, 8),
               "b_dec": torch.randn(8)}
    fake_hub.add_commit("someone/sparsify-saes", {
        "layers.3/cfg.json": json.dumps({"d_in": 8, "num_latents": 32, "k": 4}).encode(),
        "layers.3/sae.safetensors": safetensors_bytes(weights),
        "config.json": json.dumps({"model": "EleutherAI/pythia-70m"}).encode(),
    })
    topk, _, _ = SAE.from_pretrained_with_cfg_and_sparsity("someone/sparsify-saes", "layers.3")
    assert (topk.cfg.architecture, topk.cfg.k, topk.cfg.metadata.hf_hook_name) == ("topk", 4, "gpt_neox.layers.3")
    torch.testing.assert_close(topk.W_enc, weights["encoder.weight"].T)

    fake_hub.add_commit(GPT2_REPO, saelens_files(make_sae(2), "blocks.0.hook_resid_pre", tmp_path))
    with pytest.warns(UserWarning, match="registered as release"):
        SAE.from_pretrained_with_cfg_and_sparsity(GPT2_REPO, "blocks.0.hook_resid_pre")

    fake_hub.add_commit("someone/empty", {"README.md": b"nothing"})
    with pytest.raises(hub.SAEFileNotFoundError, match="No SAE found under 'x' in Hugging Face repo 'someone/empty'"):
        SAE.from_pretrained_with_cfg_and_sparsity("someone/empty", "x")


def test_gemma_scope_params_npz_by_release_name(fake_hub):
    npz = gemma_scope_npz(0)
    fake_hub.add_commit("google/gemma-scope-2b-pt-res", {"layer_12/width_16k/average_l0_82/params.npz": npz})
    sae, cfg, sparsity = SAE.from_pretrained_with_cfg_and_sparsity("gemma-scope-2b-pt-res-canonical",
                                                                   "layer_12/width_16k/canonical")
    assert sparsity is None and sae.cfg.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input
    assert sae.cfg.metadata.hook_name == "blocks.12.hook_resid_post"
    assert sae.cfg.metadata.model_name == "gemma-2-2b"
    assert sae.cfg.metadata.neuronpedia_id == "gemma-2-2b/12-gemmascope-res-16k"
    with np.load(io.BytesIO(npz)) as arrays:
        torch.testing.assert_close(sae.W_enc, torch.from_numpy(arrays["w_enc"]))
        torch.testing.assert_close(sae.threshold, torch.from_numpy(arrays["threshold"]))
    assert set(fake_hub.requested("hub")) == {
        "/google/gemma-scope-2b-pt-res/resolve/main/layer_12/width_16k/average_l0_82/params.npz"}


def test_revision_is_honoured(fake_hub, tmp_path, test_release):
    test_release("t-rev", {"repo_id": "t/rev", "model": "m", "format": "saelens", "saes": ["sae"]})
    old, new = make_sae(1), make_sae(2)
    old_sha = fake_hub.add_commit("t/rev", saelens_files(old, "sae", tmp_path), refs=("main", "v1"))
    fake_hub.add_commit("t/rev", saelens_files(new, "sae", tmp_path), refs=("main",))
    x = x_batch()
    for revision, expected in ((None, new), ("main", new), ("v1", old), (old_sha, old)):
        sae, _, _ = SAE.from_pretrained_with_cfg_and_sparsity("t-rev", "sae", revision=revision)
        torch.testing.assert_close(sae(x), expected(x), msg=f"revision={revision}")
    assert any("/resolve/v1/" in p for p in fake_hub.requested("hub"))
    with pytest.raises(hub.RevisionNotFoundError, match="Revision 'v9' not found in Hugging Face repo 't/rev'"):
        SAE.from_pretrained_with_cfg_and_sparsity("t-rev", "sae", revision="v9")


def test_cache_reuse_and_force_download(fake_hub, tmp_path, test_release):
    test_release("t-force", {"repo_id": "t/force", "model": "m", "format": "saelens", "saes": ["sae"]})
    fake_hub.add_commit("t/force", saelens_files(make_sae(3), "sae", tmp_path))
    SAE.from_pretrained_with_cfg_and_sparsity("t-force", "sae")
    assert len(fake_hub.requested("cdn", "GET")) == 2
    fake_hub.clear_log()
    SAE.from_pretrained_with_cfg_and_sparsity("t-force", "sae")  # cached: metadata checks only, no download
    assert fake_hub.requested("cdn") == [] and fake_hub.requested("hub", "GET") == []
    SAE.from_pretrained_with_cfg_and_sparsity("t-force", "sae", force_download=True)
    assert len(fake_hub.requested("cdn", "GET")) == 2 and fake_hub.requested("hub", "GET") == [
        "/t/force/resolve/main/sae/cfg.json"]

    custom = tmp_path / "custom-cache"
    SAE.from_pretrained_with_cfg_and_sparsity("t-force", "sae", cache_dir=custom)
    assert (custom / "models--t--force").is_dir()


def test_offline_uses_the_cache_and_fails_fast_without_it(fake_hub, tmp_path, test_release, offline):
    test_release("t-off", {"repo_id": "t/off", "model": "m", "format": "saelens", "saes": ["sae"]})
    main_sae, v1_sae = make_sae(4), make_sae(5)
    fake_hub.add_commit("t/off", saelens_files(v1_sae, "sae", tmp_path), refs=("v1",))
    fake_hub.add_commit("t/off", saelens_files(main_sae, "sae", tmp_path, sparsity=False), refs=("main",))
    fake_hub.add_commit("someone/raw", saelens_files(main_sae, "f", tmp_path))
    SAE.from_pretrained_with_cfg_and_sparsity("t-off", "sae")
    SAE.from_pretrained_with_cfg_and_sparsity("t-off", "sae", revision="v1")
    SAE.from_pretrained_with_cfg_and_sparsity("someone/raw", "f")
    fake_hub.stop()
    offline()

    x = x_batch()
    sae, _, sparsity = SAE.from_pretrained_with_cfg_and_sparsity("t-off", "sae")
    torch.testing.assert_close(sae(x), main_sae(x))
    assert sparsity is None
    sae, _, sparsity = SAE.from_pretrained_with_cfg_and_sparsity("t-off", "sae", revision="v1")
    torch.testing.assert_close(sae(x), v1_sae(x))
    assert sparsity is not None
    sae, _, _ = SAE.from_pretrained_with_cfg_and_sparsity("someone/raw", "f")
    torch.testing.assert_close(sae(x), main_sae(x))

    empty = tmp_path / "empty-cache"
    start = time.monotonic()
    with pytest.raises(hub.OfflineCacheMissError, match="Offline mode is on") as info:
        SAE.from_pretrained_with_cfg_and_sparsity("t-off", "sae", cache_dir=empty)
    assert time.monotonic() - start < 5
    assert str(empty) in str(info.value) and "'t/off'" in str(info.value) and "sae/cfg.json" in str(info.value)
    with pytest.raises(hub.OfflineCacheMissError, match="Offline mode is on.*'someone/raw'"):
        SAE.from_pretrained_with_cfg_and_sparsity("someone/raw", "f", cache_dir=empty)
    with pytest.raises(hub.OfflineCacheMissError, match="force_download=True needs the Hugging Face Hub"):
        SAE.from_pretrained_with_cfg_and_sparsity("t-off", "sae", force_download=True)


def test_missing_file_and_missing_repo_errors(fake_hub, tmp_path, test_release):
    test_release("t-miss", {"repo_id": "t/miss", "model": "m", "format": "saelens", "saes": ["half", "gone"]})
    files = saelens_files(make_sae(6), "half", tmp_path)
    del files["half/sae_weights.safetensors"]
    fake_hub.add_commit("t/miss", files, refs=("main", "dev"))
    with pytest.raises(hub.SAEFileNotFoundError) as info:
        SAE.from_pretrained_with_cfg_and_sparsity("t-miss", "half", revision="dev")
    assert str(info.value) == ("File 'half/sae_weights.safetensors' not found in Hugging Face repo 't/miss' at "
                               "revision 'dev'.")
    with pytest.raises(FileNotFoundError, match="'gone/cfg.json' not found in Hugging Face repo 't/miss' at "
                                                "revision 'main'"):
        SAE.from_pretrained_with_cfg_and_sparsity("t-miss", "gone")
    test_release("t-norepo", {"repo_id": "t/does-not-exist", "format": "saelens", "saes": ["a"]})
    with pytest.raises(hub.RepoNotFoundError, match="repo 't/does-not-exist' not found"):
        SAE.from_pretrained_with_cfg_and_sparsity("t-norepo", "a")
    with pytest.raises(hub.RepoNotFoundError, match="repo 'nobody/nothing' not found"):
        SAE.from_pretrained_with_cfg_and_sparsity("nobody/nothing", "a")


def test_norm_scaling_factor_folding_equals_scaling_the_input_by_hand(fake_hub):
    """llama_scope_lxr_8x/l0r_8x: expected_average_only_in, folded with the registry's factor."""
    d_model, d_sae = 8, 32
    s = registry.lookup("llama_scope_lxr_8x", "l0r_8x").norm_scaling_factor
    torch.manual_seed(0)
    weights = {"encoder.weight": torch.randn(d_sae, d_model) * 0.02, "encoder.bias": torch.randn(d_sae) * 0.1,
               "decoder.weight": torch.randn(d_model, d_sae), "decoder.bias": torch.randn(d_model) * 0.1}
    hyperparams = {"d_model": d_model, "d_sae": d_sae, "hook_point_in": "blocks.0.hook_resid_post",
                   "hook_point_out": "blocks.0.hook_resid_post", "jump_relu_threshold": 0.02, "act_fn": "jumprelu",
                   "norm_activation": "dataset-wise",
                   "dataset_average_activation_norm": {"in": math.sqrt(d_model) / s, "out": math.sqrt(d_model) / s}}
    folder = "Llama3_1-8B-Base-L0R-8x"
    fake_hub.add_commit("fnlp/Llama3_1-8B-Base-LXR-8x", {
        f"{folder}/hyperparams.json": json.dumps(hyperparams).encode(),
        f"{folder}/checkpoints/final.safetensors": safetensors_bytes(weights)})

    folded, cfg, _ = SAE.from_pretrained_with_cfg_and_sparsity("llama_scope_lxr_8x", "l0r_8x", dtype="float64")
    assert folded.cfg.normalize_activations == "none" and cfg["normalize_activations"] == "none"
    assert folded.cfg.metadata.neuronpedia_id == "llama3.1-8b/0-llamascope-res-32k"

    # the same files without folding: the SAE expects x·s and reconstructs x·s
    local, _ = hub.download_sae("fnlp/Llama3_1-8B-Base-LXR-8x", folder, format="llama_scope")
    cfg_dict, state_dict, _ = get_format("llama_scope").load(local)
    raw = SAE.from_dict(cfg_dict, state_dict, dtype="float64")
    assert raw.cfg.normalize_activations == "expected_average_only_in"

    x = torch.randn(16, d_model, dtype=torch.float64) * 3
    assert (raw.encode(x * s) > 0).any()
    torch.testing.assert_close(folded.encode(x), raw.encode(x * s))
    torch.testing.assert_close(folded(x), raw(x * s) / s)
    torch.testing.assert_close(folded.decode(folded.encode(x)) * s, raw.decode(raw.encode(x * s)))


def test_missing_norm_scaling_factor_warns_and_keeps_the_sae_unfolded(fake_hub, tmp_path, test_release):
    test_release("t-norm", {"repo_id": "t/norm", "format": "saelens", "saes": [
        "with-factor", "without-factor", {"id": "w", "path": "with-factor", "norm_scaling_factor": 4.0}]})
    sae = make_sae(7, normalize_activations="expected_average_only_in")
    fake_hub.add_commit("t/norm", {**saelens_files(sae, "with-factor", tmp_path),
                                   **saelens_files(sae, "without-factor", tmp_path)})
    with pytest.warns(UserWarning, match="no norm_scaling_factor"):
        unfolded, _, _ = SAE.from_pretrained_with_cfg_and_sparsity("t-norm", "without-factor")
    assert unfolded.cfg.normalize_activations == "expected_average_only_in"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded, _, _ = SAE.from_pretrained_with_cfg_and_sparsity("t-norm", "w")
    x = x_batch()
    torch.testing.assert_close(folded.encode(x), unfolded.encode(4.0 * x))


def test_dtype_device_overrides_and_fold_W_dec_norm(fake_hub, tmp_path, test_release):
    test_release("t-opts", {"repo_id": "t/opts", "model": "m", "format": "saelens", "saes": ["sae"],
                            "config_overrides": {"normalize_activations": "layer_norm", "dataset_path": "d/p"}})
    sae = make_sae(8)
    fake_hub.add_commit("t/opts", saelens_files(sae, "sae", tmp_path))
    half, cfg, _ = SAE.from_pretrained_with_cfg_and_sparsity("t-opts", "sae", dtype="bfloat16", device="cpu")
    assert half.W_enc.dtype == torch.bfloat16 and cfg["dtype"] == "bfloat16" and cfg["device"] == "cpu"
    assert half.cfg.normalize_activations == "layer_norm" and half.cfg.metadata.dataset_path == "d/p"
    unit, cfg, _ = SAE.from_pretrained_with_cfg_and_sparsity("t-opts", "sae", fold_W_dec_norm=True)
    torch.testing.assert_close(unit.W_dec.norm(dim=-1), torch.ones(16))
    plain, _, _ = SAE.from_pretrained_with_cfg_and_sparsity("t-opts", "sae")
    torch.testing.assert_close(unit(x_batch()), plain(x_batch()))
