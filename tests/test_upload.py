"""`upload_saes_to_huggingface` against a loopback Hugging Face Hub, then `SAE.from_pretrained` back from it.

`UploadHub` implements exactly the endpoints huggingface_hub uses for this (read from its `hf_api.py`,
`_commit_api.py` and `lfs.py`):

- `POST /api/repos/create` {name, organization} → 200 {url}, 409 when the repo exists;
- `POST /api/models/{repo}/branch/{branch}` → 200, 409 when it exists;
- `POST /api/validate-yaml` {content, repoType} → {errors, warnings} (README front matter parsed with PyYAML);
- `POST /api/models/{repo}/preupload/{rev}` {files:[{path, sample, size}]} → {files:[{path, uploadMode, shouldIgnore,
  oid}]}: *.safetensors as "lfs" (or everything "regular" in the other mode), oid of the file already there;
- `POST /{repo}.git/info/lfs/objects/batch` (LFS batch API, basic transfer) → upload + verify actions per object;
  `PUT /lfs-upload/{oid}` stores the bytes (sha256 checked), `POST /lfs-verify` {oid, size};
- `POST /api/models/{repo}/commit/{rev}` (ndjson: header, file (base64), lfsFile (sha256 oid), deletedFile) →
  {commitUrl, commitOid, pullRequestUrl};
- `GET /api/models/{repo}[/revision/{rev}]` → repo info (huggingface_hub asks for it after an empty commit);
- `HEAD|GET /{repo}/resolve/{rev}/{path}` → the file, with ETag / X-Repo-Commit (downloads and `file_exists`).
Errors carry `X-Error-Code` like the Hub's. Xet transfer is turned off (HF_HUB_DISABLE_XET) so LFS files take the
LFS protocol; in "regular" mode no LFS is involved at all.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants as hf_constants
import pytest
import torch
import yaml

from nnsae import SAE, SAEConfig
from nnsae.upload import default_readme, upload_saes_to_huggingface


def _git_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class UploadHub:
    """An in-memory Hub serving the commit API, the LFS batch API and the resolve endpoint on 127.0.0.1."""

    def __init__(self, lfs: bool = True):
        self.lfs_mode = lfs
        self.repos: dict[str, dict] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.commits_posted: list[dict] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _dispatch(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with hub._lock:
                    hub.log.append((self.command, urlsplit(self.path).path, self.headers.get("Authorization")))
                    hub.handle(self, body)

            do_GET = do_HEAD = do_POST = do_PUT = _dispatch  # noqa: N815

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- state ----

    def _new_commit(self, repo: dict, files: dict[str, bytes], parent: str | None, message: str) -> str:
        sha = hashlib.sha1(f"{parent}:{message}:{len(repo['commits'])}".encode()
                           + repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
                           ).hexdigest()
        repo["commits"][sha] = {"files": files, "parent": parent, "message": message}
        return sha

    def create_repo(self, repo_id: str, files: dict[str, bytes] | None = None) -> None:
        repo = {"refs": {}, "commits": {}}
        initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"} | (files or {})
        repo["refs"]["main"] = self._new_commit(repo, initial, None, "initial commit")
        self.repos[repo_id] = repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["commits"][repo["refs"][revision]]["files"]

    def requests(self, method: str | None = None, prefix: str = "") -> list[str]:
        return [p for m, p, _ in self.log if (method is None or m == method) and p.startswith(prefix)
                and p != "/api/agent-harnesses"]

    # ---- HTTP ----

    @staticmethod
    def _send(req, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        req.send_response(status)
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(body)

    def _json(self, req, status: int, data, headers: dict[str, str] | None = None) -> None:
        self._send(req, status, json.dumps(data).encode(), {"Content-Type": "application/json"} | (headers or {}))

    def _error(self, req, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        headers = {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {})
        if commit:
            headers["X-Repo-Commit"] = commit
        self._json(req, status, {"error": message}, headers)

    def _ref(self, req, repo_id: str, revision: str) -> tuple[dict, str] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(req, 404, "RepoNotFound", "Repository not found")
            return None
        commit = repo["refs"].get(revision) or (revision if revision in repo["commits"] else None)
        if commit is None:
            self._error(req, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, commit

    def handle(self, req, body: bytes) -> None:  # noqa: C901 - one branch per endpoint
        path = urlsplit(req.path).path
        parts = path.strip("/").split("/")
        method = req.command
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if repo_id in self.repos:  # the Hub still names the repo's URL
                return self._json(req, 409, {"error": "You already created this model repo",
                                             "url": f"{self.endpoint}/{repo_id}"},
                                  {"X-Error-Message": "You already created this model repo"})
            self.create_repo(repo_id)
            return self._json(req, 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            errors = []
            if content.startswith("---"):
                try:
                    meta = yaml.safe_load(content.split("---")[1])
                    if not isinstance(meta, dict):
                        errors.append({"message": "metadata must be a mapping"})
                except yaml.YAMLError as e:
                    errors.append({"message": str(e)})
            return self._json(req, 400 if errors else 200, {"errors": errors, "warnings": []})
        if method == "PUT" and parts[0] == "lfs-upload":
            oid = parts[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(req, 400, None, "sha256 mismatch")
            self.lfs[oid] = body
            return self._send(req, 200)
        if method == "POST" and path == "/lfs-verify":
            payload = json.loads(body)
            ok = payload["oid"] in self.lfs and len(self.lfs[payload["oid"]]) == payload["size"]
            return self._json(req, 200 if ok else 404, {"ok": ok})
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            payload = json.loads(body)
            assert payload["operation"] == "upload" and "basic" in payload["transfers"]
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in self.lfs:
                    entry["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}", "header": {}},
                                        "verify": {"href": f"{self.endpoint}/lfs-verify", "header": {}}}
                objects.append(entry)
            return self._json(req, 200, {"transfer": "basic", "objects": objects})
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if method == "GET" and (not rest or rest[0] == "revision"):
                found = self._ref(req, repo_id, unquote(rest[1]) if rest else "main")
                if found is None:
                    return
                repo, commit = found
                siblings = [{"rfilename": f} for f in sorted(repo["commits"][commit]["files"])]
                return self._json(req, 200, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                                             "siblings": siblings, "tags": []})
            if method == "POST" and rest[:1] == ["branch"]:
                repo = self.repos.get(repo_id)
                if repo is None:
                    return self._error(req, 404, "RepoNotFound", "Repository not found")
                branch = unquote("/".join(rest[1:]))
                if branch in repo["refs"]:
                    return self._error(req, 409, None, "Branch already exists")
                start = (json.loads(body) if body else {}).get("startingPoint") or "main"
                repo["refs"][branch] = repo["refs"].get(start, start)
                return self._send(req, 200, b"{}")
            if method == "POST" and rest[:1] == ["preupload"]:
                found = self._ref(req, repo_id, unquote("/".join(rest[1:])))
                if found is None:
                    return
                repo, commit = found
                existing = repo["commits"][commit]["files"]
                files = []
                for f in json.loads(body)["files"]:
                    lfs = self.lfs_mode and f["path"].endswith(".safetensors")
                    content = existing.get(f["path"])
                    oid = None if content is None else (hashlib.sha256(content).hexdigest() if lfs
                                                        else _git_sha1(content))
                    files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                                  "shouldIgnore": False, "oid": oid})
                return self._json(req, 200, {"files": files, "commitOid": commit})
            if method == "POST" and rest[:1] == ["commit"]:
                revision = unquote("/".join(rest[1:]))
                found = self._ref(req, repo_id, revision)
                if found is None:
                    return
                repo, commit = found
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                assert req.headers.get("Content-Type") == "application/x-ndjson"
                header = lines[0]
                assert header["key"] == "header"
                if header["value"].get("parentCommit") not in (None, commit):
                    return self._error(req, 412, None, "parent commit mismatch")
                files = dict(repo["commits"][commit]["files"])
                for line in lines[1:]:
                    value = line["value"]
                    if line["key"] == "file":
                        assert value["encoding"] == "base64"
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif line["key"] == "lfsFile":
                        if value["oid"] not in self.lfs:
                            return self._error(req, 400, None, f"LFS object {value['oid']} was never uploaded")
                        files[value["path"]] = self.lfs[value["oid"]]
                    elif line["key"] == "deletedFile":
                        files.pop(value["path"], None)
                    else:
                        return self._error(req, 400, None, f"unsupported commit operation {line['key']}")
                self.commits_posted.append({"repo": repo_id, "revision": revision, "header": header["value"],
                                            "operations": [(line["key"], line["value"]["path"]) for line in lines[1:]]})
                sha = self._new_commit(repo, files, commit, header["value"]["summary"])
                if revision in repo["refs"] or revision == "main":
                    repo["refs"][revision] = sha
                return self._json(req, 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}",
                                             "commitOid": sha, "pullRequestUrl": None})
            return self._error(req, 404, None, f"unknown endpoint {path}")
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, filename = f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:]))
            found = self._ref(req, repo_id, revision)
            if found is None:
                return
            repo, commit = found
            content = repo["commits"][commit]["files"].get(filename)
            if content is None:
                return self._error(req, 404, "EntryNotFound", "Entry not found", commit=commit)
            etag = hashlib.sha256(content).hexdigest() if filename.endswith(".safetensors") else _git_sha1(content)
            return self._send(req, 200, content, {"ETag": f'"{etag}"', "X-Repo-Commit": commit,
                                                  "Content-Type": "application/octet-stream"})
        return self._error(req, 404, None, f"unknown endpoint {method} {path}")


@pytest.fixture(params=["lfs", "regular"])
def hub(request, monkeypatch, tmp_path):
    server = UploadHub(lfs=request.param == "lfs")
    monkeypatch.setattr(hf_constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    if hasattr(hf_constants, "AGENT_HARNESSES_PATH"):
        monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    yield server
    server.stop()


def make_sae(seed: int, d_in: int = 8, d_sae: int = 16, **cfg) -> SAE:
    torch.manual_seed(seed)
    sae = SAE.from_config(SAEConfig(d_in=d_in, d_sae=d_sae, **cfg))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return sae


def assert_same_sae(a: SAE, b: SAE) -> None:
    x = torch.randn(5, a.cfg.d_in, generator=torch.Generator().manual_seed(1))
    assert type(a) is type(b)
    assert a.cfg.to_dict() | {"device": None} == b.cfg.to_dict() | {"device": None}
    for name, p in a.state_dict().items():
        assert torch.equal(p, b.state_dict()[name]), name
    assert torch.equal(a.encode(x), b.encode(x))
    assert torch.equal(a(x), b(x))


def test_upload_then_from_pretrained_round_trip(hub, tmp_path):
    standard = make_sae(0, metadata={"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre",
                                     "neuronpedia_id": "gpt2-small/3-res-test"})
    standard.log_feature_sparsity = torch.linspace(-7, -1, 16)
    topk = make_sae(1, architecture="topk", k=4, metadata={"hook_name": "blocks.5.hook_resid_post"})
    on_disk = tmp_path / "saved-topk"
    topk.save_model(on_disk)
    jumprelu = make_sae(2, architecture="jumprelu", metadata={"hook_name": "blocks.7.hook_mlp_out"})

    info = upload_saes_to_huggingface(
        {"blocks.3.hook_resid_pre": standard, "layer_5/width_16": str(on_disk), "jump": jumprelu},
        "someone/my-saes", token="hf_test_token", show_progress=False,
        metrics={"jump": {"metrics": {"sparsity": {"l0": 12.5}}}})

    # One commit holding every file (and the README), through the endpoints the Hub has.
    assert len(hub.commits_posted) == 1
    ops = dict((path, key) for key, path in hub.commits_posted[0]["operations"])
    expected = {"README.md", "blocks.3.hook_resid_pre/cfg.json", "blocks.3.hook_resid_pre/sae_weights.safetensors",
                "blocks.3.hook_resid_pre/sparsity.safetensors", "layer_5/width_16/cfg.json",
                "layer_5/width_16/sae_weights.safetensors", "jump/cfg.json", "jump/sae_weights.safetensors"}
    assert set(ops) == expected
    weights = {p for p in expected if p.endswith(".safetensors")}
    if hub.lfs_mode:
        assert {p for p, k in ops.items() if k == "lfsFile"} == weights
        assert len(hub.requests("PUT", "/lfs-upload/")) == len(weights)
        assert hub.requests("POST", "/someone/my-saes.git/info/lfs/objects/batch")
    else:
        assert set(ops.values()) == {"file"} and not hub.requests("PUT")
    assert info.oid == hub.repos["someone/my-saes"]["refs"]["main"]
    assert info.commit_url.endswith(info.oid)
    auth = {a for m, p, a in hub.log if p.startswith("/api/") and p != "/api/agent-harnesses"}
    assert auth == {"Bearer hf_test_token"}
    assert "/api/repos/create" in hub.requests("POST")
    assert "/api/validate-yaml" in hub.requests("POST")

    # README: model card with library_name for the Hub, the SAEs, hooks and metrics.
    readme = hub.files("someone/my-saes")["README.md"].decode()
    meta = yaml.safe_load(readme.split("---")[1])
    assert meta["library_name"] == "saelens" and "sparse-autoencoder" in meta["tags"]
    assert "| `blocks.3.hook_resid_pre` | standard | 8 | 16 | gpt2 | blocks.3.hook_resid_pre |" in readme
    assert "[gpt2-small/3-res-test](https://neuronpedia.org/gpt2-small/3-res-test)" in readme
    assert "| `layer_5/width_16` | topk |" in readme and "blocks.7.hook_mlp_out" in readme
    assert "| `jump` | metrics/sparsity/l0 | 12.5 |" in readme
    assert "mean log10 feature density" in readme
    assert "SAE.from_pretrained('someone/my-saes', 'blocks.3.hook_resid_pre')" in readme

    # Loading back through the ordinary download path gives the same SAEs (and the sparsity).
    got, cfg, sparsity = SAE.from_pretrained_with_cfg_and_sparsity("someone/my-saes", "blocks.3.hook_resid_pre")
    assert_same_sae(standard, got)
    assert got.cfg.metadata.neuronpedia_id == "gpt2-small/3-res-test"
    assert torch.allclose(sparsity, standard.log_feature_sparsity)
    assert_same_sae(topk, SAE.from_pretrained("someone/my-saes", "layer_5/width_16"))
    got_jump = SAE.from_pretrained("someone/my-saes", "jump")
    assert_same_sae(jumprelu, got_jump)
    assert SAE.from_pretrained_with_cfg_and_sparsity("someone/my-saes", "jump")[2] is None


def test_reupload_keeps_readme_skips_unchanged_files_and_targets_branches(hub, tmp_path):
    sae = make_sae(3)
    hub.create_repo("org/saes", files={"README.md": b"---\nlicense: mit\n---\n# Mine\n"})
    upload_saes_to_huggingface({"a": sae}, "org/saes", show_progress=False)
    assert hub.files("org/saes")["README.md"] == b"---\nlicense: mit\n---\n# Mine\n"  # an existing card is kept
    assert "/api/repos/create" in hub.requests("POST")  # asked, got 409, carried on
    first = hub.repos["org/saes"]["refs"]["main"]

    # The same SAE again: every file is unchanged on the Hub, so no commit is made.
    info = upload_saes_to_huggingface({"a": sae}, "org/saes", show_progress=False)
    assert len(hub.commits_posted) == 1 and info.oid == first

    # Another branch: created from main, the new SAE only there.
    changed = make_sae(4)
    upload_saes_to_huggingface({"a": changed, "b": sae}, "org/saes", hf_revision="dev", show_progress=False)
    assert hub.requests("POST", "/api/models/org/saes/branch/dev")
    assert "b/cfg.json" in hub.files("org/saes", "dev") and "b/cfg.json" not in hub.files("org/saes", "main")
    assert_same_sae(changed, SAE.from_pretrained("org/saes", "a", revision="dev"))
    assert_same_sae(sae, SAE.from_pretrained("org/saes", "a"))
    assert_same_sae(sae, SAE.from_pretrained("org/saes", "b", revision="dev"))


def test_upload_without_readme_and_with_foreign_format(hub, tmp_path):
    from safetensors.torch import save_file

    # A sparsify-format SAE directory is converted to SAELens layout on the way.
    folder = tmp_path / "sparsify" / "layers.2"
    folder.mkdir(parents=True)
    torch.manual_seed(5)
    d_in, d_sae = 8, 24
    save_file({"encoder.weight": torch.randn(d_sae, d_in), "encoder.bias": torch.randn(d_sae),
               "W_dec": torch.randn(d_sae, d_in), "b_dec": torch.randn(d_in)}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"expansion_factor": 3, "normalize_decoder": True, "num_latents": 0,
                                                 "k": 4, "multi_topk": False, "d_in": d_in}))
    local = SAE.load_from_disk(folder)
    upload_saes_to_huggingface({"layers.2": folder}, "me/converted", add_default_readme=False, show_progress=False)
    assert "README.md" not in hub.files("me/converted")
    assert set(hub.files("me/converted")) == {".gitattributes", "layers.2/cfg.json", "layers.2/sae_weights.safetensors"}
    assert_same_sae(local, SAE.from_pretrained("me/converted", "layers.2"))


def test_upload_validates_before_touching_the_network(hub, tmp_path):
    sae = make_sae(0)
    with pytest.raises(ValueError, match="empty"):
        upload_saes_to_huggingface({}, "a/b", show_progress=False)
    with pytest.raises(ValueError, match="namespace/name"):
        upload_saes_to_huggingface({"x": sae}, "no-namespace", show_progress=False)
    for bad in ("../up", "a//b", "./x", ""):
        with pytest.raises(ValueError, match="SAE id"):
            upload_saes_to_huggingface({bad: sae}, "a/b", show_progress=False)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        upload_saes_to_huggingface({"x": tmp_path / "missing"}, "a/b", show_progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no SAE"):
        upload_saes_to_huggingface({"x": tmp_path / "empty"}, "a/b", show_progress=False)
    with pytest.raises(TypeError, match="SAE or a directory"):
        upload_saes_to_huggingface({"x": 3}, "a/b", show_progress=False)
    assert hub.requests() == []


def test_default_readme_is_valid_yaml_with_escaped_table_cells():
    card = default_readme("o/r", {"x|y": {"cfg": {"d_in": 4, "d_sae": 8, "architecture": "standard",
                                                   "metadata": {"model_name": "m|n", "hook_name": "h"}}}})
    meta = yaml.safe_load(card.split("---")[1])
    assert meta == {"library_name": "saelens", "tags": ["sparse-autoencoder", "saelens", "nnsae"]}
    assert "m\\|n" in card
