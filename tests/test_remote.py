"""Remote (NDIF) path, offline: nnsight's real request payload, executed by a fresh process that cannot import nnsae.

The client builds each payload exactly as `remote=True` does (`pull_env()` then `RequestModel.serialize(tracer)`),
via a capturing backend instead of the HTTP client. tests/remote_server.py (one fresh process for all payloads, since
starting one costs more than the runs) deserializes them against its own copies of the tiny models, with nnsae
blocked from import, and runs them; results must equal the same bodies run locally, bit for bit.
"""

from __future__ import annotations

import os
import warnings

import nnsight
import pytest
import torch
from nnsight.modeling.transformers import TransformersModel

from nnsae import SAE, SAEConfig
from nnsae.attachment import attach, splice
from nnsae.hooks import resolve_hook
from tests.remote_server import CaptureBackend, make_tokenizer, run_server
from tests.tiny_models import D_MODEL, tiny_model, tiny_tokens

warnings.filterwarnings("ignore", message=".*LanguageModel is deprecated.*")

IDS = tiny_tokens(batch=2, seq=8)
LAYERS = {"gpt2": "transformer.h", "llama": "model.layers"}


def make_sae(d_in: int = D_MODEL, d_sae: int = 96, seed: int = 1, hook_name: str | None = None, **cfg) -> SAE:
    cfg.setdefault("architecture", "topk")
    if cfg["architecture"] == "topk":
        cfg.setdefault("k", 16)
    sae = SAE.from_config(SAEConfig(d_in=d_in, d_sae=d_sae, metadata={"hook_name": hook_name}, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return sae


def wrap(hf, wrapper: str):
    return nnsight.NNsight(hf) if wrapper == "nnsight" else TransformersModel(hf, tokenizer=make_tokenizer())


# ---------------------------------------------------------------------------------------------------------------
# the client side: each case runs its body locally, then captures the same body's payload
# ---------------------------------------------------------------------------------------------------------------


def case_edit(family: str, wrapper: str):
    """Inline splice with the error term and a feature ablation (a lambda shipped by source)."""
    sae = make_sae()
    hook = f"{LAYERS[family]}.1"
    model = wrap(tiny_model(family), wrapper)
    results = []
    for backend in (None, CaptureBackend()):
        kw = {} if backend is None else {"backend": backend}
        # No torch.no_grad() here: the server runs the body with grad enabled whatever the client's mode, and a
        # TopK SAE takes its (float-rounding-different) sparse kernels only without grad, so both sides must agree.
        with model.trace(IDS, **kw):
            feats = splice(model, sae, hook=hook, use_error_term=True,
                           edit=lambda f: f.index_fill_(-1, torch.arange(0, 48), 0)).save()
            logits = model.output.logits.save()
        results.append({"feats": feats, "logits": logits} if backend is None else backend.blob)
    local, blob = results
    assert (local["logits"] - tiny_model(family)(IDS).logits).abs().max() > 1e-3  # the ablation matters
    return local, blob


def case_plain(dtype: torch.dtype):
    """Plain splice (no error term), hook given as a HookPoint resolved before the trace, SAE in fp32 or bf16."""
    sae = make_sae(d_sae=1024, architecture="standard", hook_name="blocks.1.hook_resid_post").to(dtype)
    model = wrap(tiny_model("llama"), "transformers")
    point = resolve_hook(model, sae).read
    results = []
    for backend in (None, CaptureBackend()):
        kw = {} if backend is None else {"backend": backend}
        with torch.no_grad(), model.trace(IDS, **kw):
            splice(model, sae, hook=point)
            logits = model.output.logits.save()
        results.append({"logits": logits} if backend is None else backend.blob)
    return results[0], results[1]


def case_attach_in_body(family: str):
    """nnsae.attach called *inside* the body: it runs on the server, mounting on the server's model for that trace."""
    sae = make_sae()
    model = wrap(tiny_model(family), "transformers")
    results = []
    for backend in (None, CaptureBackend()):
        kw = {} if backend is None else {"backend": backend}
        with torch.no_grad(), model.trace(IDS, **kw):
            h = attach(model, sae, hook=f"{LAYERS[family]}.1", use_error_term=True)
            feats = h.hook_sae_acts_post.output.save()
            h.hook_sae_acts_post.output[:, :, :48] = 0
            logits = model.output.logits.save()
        results.append({"feats": feats, "logits": logits} if backend is None else backend.blob)
    return results[0], results[1]


def case_mounted():
    """A mounted (attach) SAE: the server's model has no such module."""
    model = wrap(tiny_model("llama"), "transformers")
    h = attach(model, make_sae(), hook="model.layers.1")
    capture = CaptureBackend()
    with torch.no_grad(), model.trace(IDS, backend=capture):
        feats = model.model.layers[1].sae.hook_sae_acts_post.output.save()
    h.detach()
    return {}, capture.blob


@pytest.fixture(scope="module")
def remote():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The server cannot import nnsae, so an SAE shipped by value runs the torch form of the TopK kernels there
    # (`nnsae.native` is never referenced by the shipped code); the local runs use it too, to compare bit for bit.
    native_setting = os.environ.get("NNSAE_NATIVE")
    os.environ["NNSAE_NATIVE"] = "0"
    try:
        cases = {
            "edit-llama-transformers": (case_edit("llama", "transformers"), "llama", "transformers"),
            "edit-gpt2-nnsight": (case_edit("gpt2", "nnsight"), "gpt2", "nnsight"),
            "plain-fp32": (case_plain(torch.float32), "llama", "transformers"),
            "plain-bf16": (case_plain(torch.bfloat16), "llama", "transformers"),
            "attach-llama": (case_attach_in_body("llama"), "llama", "transformers"),
            "attach-gpt2": (case_attach_in_body("gpt2"), "gpt2", "transformers"),
            "mounted": (case_mounted(), "llama", "transformers"),
        }
    finally:
        torch.set_num_threads(threads)
        if native_setting is None:
            os.environ.pop("NNSAE_NATIVE")
        else:
            os.environ["NNSAE_NATIVE"] = native_setting
    jobs = {name: {"blob": blob, "family": family, "wrapper": wrapper}
            for name, ((_, blob), family, wrapper) in cases.items()}
    results = run_server(jobs)
    local = {name: case[0][0] for name, case in cases.items()}
    sizes = {name: len(case[0][1]) for name, case in cases.items()}
    return local, results, sizes


# ---------------------------------------------------------------------------------------------------------------
# assertions
# ---------------------------------------------------------------------------------------------------------------


def test_server_cannot_import_nnsae(remote):
    _, results, _ = remote
    assert results["nnsae_importable"] is False
    assert results["nnsae_imported"] is False  # everything arrived by value


@pytest.mark.parametrize("name", ["edit-llama-transformers", "edit-gpt2-nnsight", "plain-fp32", "plain-bf16"])
def test_inline_splice_runs_remotely_and_matches_local(remote, name):
    local, results, sizes = remote
    out = results[name]
    assert "error" not in out, out.get("traceback")
    assert set(local[name]) <= set(out["values"])
    for key, value in local[name].items():
        assert torch.equal(out["values"][key], value), key
    assert sizes[name] < 2_000_000


@pytest.mark.parametrize("name", ["attach-llama", "attach-gpt2"])
def test_trace_scoped_attach_runs_on_the_server(remote, name):
    """Offline server only: NDIF's sandbox (import whitelist, protected modules) may refuse the mount."""
    local, results, _ = remote
    out = results[name]
    assert "error" not in out, out.get("traceback")
    for key, value in local[name].items():
        assert torch.equal(out["values"][key], value), key
    assert out["leftovers"] == []


def test_bf16_weights_halve_the_payload(remote):
    _, _, sizes = remote
    weight_bytes = sum(p.numel() for p in make_sae(d_sae=1024, architecture="standard").parameters()) * 4
    assert sizes["plain-fp32"] - sizes["plain-bf16"] > 0.45 * weight_bytes


def test_mounted_attach_is_local_only(remote):
    """Documented limitation: a mounted SAE is not in the server's model, so the payload cannot resolve it."""
    _, results, _ = remote
    assert "UnknownPersistentId" in results["mounted"].get("error", ""), results["mounted"]
