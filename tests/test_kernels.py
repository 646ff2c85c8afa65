"""The fast TopK inference kernels against the dense computation, written here independently (float64 references).
The bf16 candidate selection runs twice: by the native kernel (`nnsae/csrc`) and by its torch-ops form."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnsae import SAE, SAEConfig, kernels, native

D_IN, K = 24, 6


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Which form of the bf16 selection runs: the loaded native kernels (which must build wherever a compiler is) or
    None, the torch ops (`NNSAE_NATIVE=0` for SAEs)."""
    monkeypatch.setenv("NNSAE_NATIVE", "1" if request.param == "native" else "0")
    if request.param == "torch":
        return None
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the native kernels cannot be built here")
    lib = native.library()
    assert lib is not None
    return lib


def reference_topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, absolute: bool,
                   scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 pre-activations (one matmul) and the k-th largest key per row."""
    h = x.double() @ W.double() + b.double()
    if scale is not None:
        h = h * scale.double()
    key = h.abs() if absolute else h
    return h, key.sort(dim=1, descending=True).values[:, k - 1]


def check_selection(values, indices, x, W, b, k, absolute, relu, scale=None, tol=1e-5):
    """The chosen latents hold the k largest keys (ties: any of them) and their values are the pre-activations."""
    h, kth = reference_topk(x, W, b, k, absolute, scale)
    assert indices.shape == (x.shape[0], k) and values.dtype == x.dtype
    assert all(len(set(row.tolist())) == k for row in indices)
    picked = h.gather(1, indices)
    torch.testing.assert_close(values.double(), picked, atol=tol, rtol=tol)
    key = picked.abs() if absolute else picked
    slack = tol * (1 + kth.abs())
    relevant = kth > 0 if relu else torch.ones_like(kth, dtype=torch.bool)  # relu: only positives matter
    assert bool(((key.min(dim=1).values >= kth - slack) | ~relevant).all())
    if relu:  # every positive pre-activation above the k-th is chosen
        full = torch.zeros_like(h).scatter_(1, indices, torch.relu(picked))
        expected = torch.where((h >= kth[:, None]) & (h > 0), h, torch.zeros_like(h))
        near_tie = ((h - kth[:, None]).abs() <= slack[:, None]).any(1)
        torch.testing.assert_close(full[~near_tie], expected[~near_tie], atol=tol, rtol=tol)


def random_problem(n: int, s: int, seed: int = 0, big_rows: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    if big_rows:
        x[::7] *= 1000  # large-norm rows (SmolLM2's massive activations)
    W = torch.randn(D_IN, s, generator=g) / D_IN ** 0.5
    b = 0.1 * torch.randn(s, generator=g)
    return x, W, b


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("s", [256, 200, 4096])
def test_bf16_candidates_select_exactly_the_dense_top_k(absolute, rescale, s, path):
    x, W, b = random_problem(300, s)
    scale = torch.rand(s) + 0.5 if rescale else None
    weights = kernels._Bf16Weights(W, b, scale)  # forced on, whatever the CPU
    values, indices = kernels.topk_preacts(x, W, b, K, absolute=absolute, relu=not absolute, scale=scale,
                                           weights=weights, native=path)
    check_selection(values, indices, x, W, b, K, absolute, not absolute, scale)


def test_bf16_candidates_edge_rows(path):
    s = 512
    x, W, b = random_problem(64, s, big_rows=False)
    x[0] = 0  # pre = b: ties decided by the bias alone
    b[:] = -1.0
    b[::3] = 0.5  # many exact ties at 0.5
    x[1] = float("nan")  # non-finite rows take the dense path
    x[2] *= 1e30
    x[3] = -x[3]
    weights = kernels._Bf16Weights(W, b, None)
    values, indices = kernels.topk_preacts(x, W, b, K, absolute=False, relu=True, weights=weights, native=path)
    rows = torch.tensor([i for i in range(64) if i != 1])
    check_selection(values[rows], indices[rows], x[rows], W, b, K, False, True)
    assert (values[0] == 0.5).all()
    # all-negative pre-activations: ReLU gives zeros whichever latents are chosen
    values, indices = kernels.topk_preacts(x[4:8], W, torch.full((s,), -1e6), K, absolute=False, relu=True,
                                           weights=kernels._Bf16Weights(W, torch.full((s,), -1e6), None), native=path)
    assert (torch.relu(values) == 0).all()


@pytest.mark.parametrize("absolute", [False, True])
def test_ordered_rows_are_by_value_then_index_and_the_same_on_every_path(absolute, path):
    x, W, b = random_problem(200, 512, seed=3)
    b[[40, 8, 24]] = 5.0  # x = 0: three tied top latents, listed by index
    x[5] = 0
    weights = kernels._Bf16Weights(W, b, None)
    runs = [kernels.topk_preacts(x, W, b, K, absolute=absolute, relu=not absolute, weights=w, ordered=True,
                                 native=path) for w in (weights, None)]  # bf16 candidates, dense float32
    for values, indices in runs:
        check_selection(values, indices, x, W, b, K, absolute, not absolute)
        later = (values[:, 1:] < values[:, :-1]) | ((values[:, 1:] == values[:, :-1])
                                                    & (indices[:, 1:] > indices[:, :-1]))
        assert bool(later.all())
    assert torch.equal(runs[0][1], runs[1][1])
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-5, rtol=1e-5)
    assert runs[0][1][5, :3].tolist() == [8, 24, 40] and (runs[0][0][5, :3] == 5.0).all()


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("margin", [kernels.NATIVE_MARGIN, 0.0, -1.0])
def test_native_threshold_certifies_rows_itself_and_retries_the_ones_it_fails(absolute, margin, monkeypatch):
    """The native kernel fits each row's threshold to its error bound: at the default margin it certifies every row of
    a plain problem (none left for the dense path). With margin 0 (candidates: little more than the top-k bf16 keys)
    or -1 (often fewer than k) the first round fails many rows, and the kernel's wider second round must still select
    exactly (without the second round this test fails at every margin)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the native kernels cannot be built here")
    monkeypatch.setenv("NNSAE_NATIVE", "1")
    lib = native.library()
    assert lib is not None
    x, W, b = random_problem(1100, 1024, seed=5, big_rows=False)  # the kernel takes 512 rows at a time
    weights = kernels._Bf16Weights(W, b, None)
    n = x.shape[0]
    values, indices = torch.empty(n, K), torch.empty(n, K, dtype=torch.long)
    ok = torch.zeros(n, dtype=torch.bool)
    monkeypatch.setattr(kernels, "NATIVE_MARGIN", margin)
    kernels._native_block(lib, x, b, K, absolute, not absolute, None, weights, values, indices, ok)
    assert bool(ok.all())
    check_selection(values, indices, x, W, b, K, absolute, not absolute)


def test_native_kernels_fall_back_when_they_cannot_be_built(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("NNSAE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")  # a compiler that always fails
    with pytest.warns(RuntimeWarning, match="native kernels unavailable"):
        assert native.library() is None
    assert native.library() is None  # decided once, no second warning or build
    monkeypatch.setattr(kernels, "bf16_is_fast", lambda device, dt: dt == torch.float32)
    sae = make_sae("topk", 256)
    x = torch.randn(50, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(x).double(), dense_reference(sae, x)[1], atol=1e-4, rtol=1e-5)
    assert not list(tmp_path.rglob("*.so"))


def test_k_equal_to_d_sae_takes_the_dense_path():
    x, W, b = random_problem(10, 16)
    values, indices = kernels.topk_preacts(x, W, b, 16, absolute=False, relu=True,
                                           weights=kernels._Bf16Weights(W, b, None))
    check_selection(values, indices, x, W, b, 16, False, True)


@pytest.mark.parametrize("absolute", [False, True])
def test_row_topk_selects_what_torch_topk_selects(path, absolute):
    g = torch.Generator().manual_seed(0)
    cases = [(7, 4608, 32), (33, 100, 5), (5, 96, 3), (4, 37, 2), (16, 64, 32), (3, 64, 64), (4, 30, 1),
             (300, 1152, 16), (9, 4617, 7), (6, 4608, 288), (2, 33, 16)]
    for n, s, k in cases:
        wide = torch.randn(n, s + 5, generator=g)
        h = wide[:, 2:s + 2]  # rows further apart than their length
        h[0, 0] = float("inf")
        if not absolute:
            h[0, 1] = -float("inf")
        key = h.abs() if absolute else h
        expected = torch.sort(torch.topk(key, k, sorted=False).indices).values
        got = kernels.row_topk(h, k, path, absolute)
        assert torch.equal(torch.sort(got).values, expected), (n, s, k)


def test_native_row_topk_never_selects_nan():
    lib = native.library()
    if lib is None:
        pytest.skip("no C++ compiler: the native kernels cannot be built here")
    h = torch.randn(4, 200)
    h[0, ::3] = float("nan")
    h[1, :198] = float("nan")  # only two numbers: the other three picks are NaN positions
    got = kernels.row_topk(h, 5, lib)
    finite = torch.nan_to_num(h, nan=-float("inf"))
    assert torch.equal(torch.sort(got[0]).values, torch.sort(torch.topk(finite[0], 5).indices).values)
    assert set(got[1].tolist()) >= {198, 199} and all(torch.isnan(h[1, i]) for i in got[1].tolist()
                                                      if i not in (198, 199))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_equals_dense_product(dtype):
    W = torch.randn(300, D_IN).to(dtype)
    indices = torch.stack([torch.randperm(300)[:K] for _ in range(9)])
    values = torch.randn(9, K).to(dtype)
    dense = torch.zeros(9, 300, dtype=torch.float64).scatter_(1, indices, values.double())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(kernels.sparse_decode(values, indices, W).double(), dense @ W.double(), **tol)


def make_sae(arch: str, d_sae: int, dtype=torch.float32, **kw) -> SAE:
    sae = SAE.from_config(SAEConfig(d_in=D_IN, d_sae=d_sae, architecture=arch, k=K,
                                    dtype=str(dtype).removeprefix("torch."), **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_((0.3 * torch.randn(p.shape, generator=g)).to(dtype))
    return sae


def dense_reference(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' TopK math in float64: features and reconstruction."""
    p = {k: v.detach().double() for k, v in sae.state_dict().items()}
    xt = x.to(sae.dtype).double() - p["b_dec"]
    z = xt @ p["W_enc"] + p["b_enc"]
    norms = p["W_dec"].norm(dim=-1)
    if sae.cfg.rescale_acts_by_decoder_norm:
        z = z * norms
    absolute = sae.cfg.architecture == "abstopk"
    idx = (z.abs() if absolute else z).topk(K, dim=-1).indices
    vals = z.gather(-1, idx)
    f = torch.zeros_like(z).scatter_(-1, idx, vals if absolute else torch.relu(vals))
    dec = f / norms if sae.cfg.rescale_acts_by_decoder_norm else f
    return f, dec @ p["W_dec"] + p["b_dec"]


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", ["inference_mode", "no_grad"])
def test_sae_fast_paths_equal_the_dense_math(arch, rescale, dtype, grad, path, monkeypatch):
    monkeypatch.setattr(kernels, "bf16_is_fast", lambda device, dt: dt == torch.float32)
    sae = make_sae(arch, 512, dtype, rescale_acts_by_decoder_norm=rescale)
    x = torch.randn(4, 50, D_IN)
    x[0, 0] *= 500
    f_ref, r_ref = dense_reference(sae, x)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    ctx = torch.inference_mode() if grad == "inference_mode" else torch.no_grad()
    with ctx:
        f, (f2, recon), recon2, out = sae.encode(x), sae.encode_decode(x), sae.reconstruct(x), sae(x)
        values, indices = sae.sparse_encode(x)
    assert f.shape == f_ref.shape and f.dtype == dtype and indices.shape == (4, 50, K)
    if dtype == torch.float32:
        for acts in (f, f2):
            torch.testing.assert_close(acts.double(), f_ref, **tol)
        for r in (recon, recon2, out):
            torch.testing.assert_close(r.double(), r_ref, **tol)
        return
    # bf16 SAEs compute in bf16: rounding can swap latents near the k-th place, so check that the chosen latents
    # are a top k of the float64 keys within bf16 tolerance, and that decoding them is the dense product.
    z = f_ref.new_zeros(())  # keys of the chosen latents vs the k-th key, per token
    p = {k: v.detach().double() for k, v in sae.state_dict().items()}
    h = (x.to(dtype).double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if rescale:
        h = h * p["W_dec"].norm(dim=-1)
    key = h.abs() if arch == "abstopk" else h
    kth = key.sort(-1, descending=True).values[..., K - 1:K]
    chosen = key.gather(-1, indices)
    assert bool((chosen >= kth - 5e-2 * (1 + kth.abs()) + z).all())
    for acts in (f, f2):
        torch.testing.assert_close(acts.double().gather(-1, indices), values.double(), rtol=0, atol=0)
    dec = f.double() / p["W_dec"].norm(dim=-1) if rescale else f.double()
    expected = dec @ p["W_dec"] + p["b_dec"]
    scale = dec.abs() @ p["W_dec"].abs() + p["b_dec"].abs()  # bf16 errors are relative to the summed magnitudes
    for r in (recon, recon2, out):
        assert bool(((r.double() - expected).abs() <= 2 ** -5 * scale + 1e-3).all())


def test_hooked_sae_keeps_the_dense_path_and_hooks_see_dense_acts():
    sae = make_sae("topk", 512)
    x = torch.randn(6, D_IN)
    seen = []
    handle = sae.hook_sae_acts_post.register_forward_hook(lambda m, i, o: seen.append(o.clone()) or o * 0)
    try:
        assert sae.observed("hook_sae_acts_post")
        with torch.inference_mode():
            recon = sae.reconstruct(x)
    finally:
        handle.remove()
    assert seen and seen[0].shape == (6, 512) and ((seen[0] != 0).sum(-1) <= K).all()
    torch.testing.assert_close(recon, sae.b_dec.detach().expand(6, -1))  # the edit reached the decoder
    assert not sae.observed("hook_sae_acts_post", "hook_sae_acts_pre")
    sae.hook_sae_acts_pre.forward = lambda t: t  # what nnsight does to modules it wraps
    assert sae.observed("hook_sae_acts_pre")


def test_weights_created_in_inference_mode_and_in_place_edits(monkeypatch):
    monkeypatch.setattr(kernels, "bf16_is_fast", lambda device, dt: dt == torch.float32)
    with torch.inference_mode():  # inference tensors: no version counter, nothing cached
        sae = make_sae("topk", 256)
        x = torch.randn(5, D_IN)
        torch.testing.assert_close(sae.reconstruct(x).double(), dense_reference(sae, x)[1], atol=1e-4, rtol=1e-5)
    sae = make_sae("topk", 256)
    with torch.no_grad():
        sae.reconstruct(x)
        sae.W_enc.mul_(-1)  # an in-place edit must invalidate the cached bf16 weights
        torch.testing.assert_close(sae.reconstruct(x).double(), dense_reference(sae, x)[1], atol=1e-4, rtol=1e-5)


def test_pickled_sae_leaves_the_bf16_cache_behind(monkeypatch):
    import pickle

    monkeypatch.setattr(kernels, "bf16_is_fast", lambda device, dt: dt == torch.float32)
    sae = make_sae("topk", 256)
    x = torch.randn(5, D_IN)
    with torch.no_grad():
        expected = sae(x)
    assert "_bf16_cache" in sae.__dict__
    copy = pickle.loads(pickle.dumps(sae))  # what a remote (NDIF) payload does with an SAE sent by value
    assert "_bf16_cache" not in copy.__dict__
    with torch.no_grad():
        torch.testing.assert_close(copy(x), expected)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("hooked", [False, True])
def test_error_term_cancels_the_reconstruction_bit_for_bit(grad, hooked, monkeypatch):
    # The clean reconstruction must take the kernel the hooked one took (sparse only without grad and hooks).
    monkeypatch.setattr(kernels, "bf16_is_fast", lambda device, dt: dt == torch.float32)
    sae = make_sae("topk", 256)
    if hooked:
        sae.hook_sae_acts_post.register_forward_hook(lambda m, i, o: o)
    x = torch.randn(7, D_IN) * 3
    with torch.set_grad_enabled(grad):
        recons = sae.reconstruct(x)
        clean = sae.clean_reconstruct(x)
    assert torch.equal(recons, clean)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_decoding_sparse_activations_reads_only_their_rows_and_equals_the_dense_product(arch, monkeypatch):
    sae = make_sae(arch, 512, rescale_acts_by_decoder_norm=arch == "topk")
    calls = []
    bag = torch.nn.functional.embedding_bag
    monkeypatch.setattr(torch.nn.functional, "embedding_bag", lambda *a, **kw: calls.append(1) or bag(*a, **kw))
    g = torch.Generator().manual_seed(2)
    acts = torch.randn(3, 5, 512, generator=g) * (torch.rand(3, 5, 512, generator=g) < 0.02)  # ~10 per token
    acts[1, 2] = 0  # a token with none
    W = sae.W_dec.detach().double()
    if arch == "topk":
        W = W / W.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        out = sae.decode(acts)
        assert len(calls) == 1  # the sparse path ran
        dense = acts.clone()
        dense[0, 0] = 1.0  # more than 1/32 non-zero: the dense product
        out_dense = sae.decode(dense)
        assert len(calls) == 1
        with pytest.raises(ValueError, match="d_sae=512"):  # a wrong width is refused, not decoded
            sae.decode(acts[..., :500])
    torch.testing.assert_close(out.double(), acts.double() @ W + sae.b_dec.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_dense.double(), dense.double() @ W + sae.b_dec.double(), atol=1e-5, rtol=1e-5)
    # With grad, the dense product: every feature (zero or not) gets its gradient
    acts.requires_grad_(True)
    sae.decode(acts).sum().backward()
    assert len(calls) == 1
    torch.testing.assert_close(acts.grad.double(), W.sum(-1).expand(3, 5, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
@pytest.mark.parametrize("shift, sparse", [(0.0, False), (-4.0, True)])  # ~half or ~0.4% of the features fire
def test_error_term_cancels_the_reconstruction_bit_for_bit_for_every_decoder_path(grad, arch, shift, sparse,
                                                                                   monkeypatch):
    calls = []
    bag = torch.nn.functional.embedding_bag
    monkeypatch.setattr(torch.nn.functional, "embedding_bag", lambda *a, **kw: calls.append(1) or bag(*a, **kw))
    sae = make_sae(arch, 4096)
    with torch.no_grad():
        sae.b_enc.fill_(shift)
    sae.hook_sae_acts_post.register_forward_hook(lambda m, i, o: o)
    x = torch.randn(7, D_IN)
    with torch.set_grad_enabled(grad):
        assert torch.equal(sae.reconstruct(x), sae.clean_reconstruct(x))
    assert len(calls) == (2 if sparse and not grad else 0)  # the clean reconstruction follows the caller's grad mode


_LOAD_KERNELS = ("import warnings, sys; warnings.simplefilter('always'); from nnsae import native; "
                 "lib = native.library(); print('loaded' if lib is not None else 'none')")


def test_a_damaged_cached_library_is_rebuilt_never_loaded(tmp_path):
    """A library truncated in the cache (a crash after the first build) used to kill every later process with
    SIGBUS; it is now checked against its recorded size and sha256 and rebuilt, in a fresh process each time."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the native kernels cannot be built here")
    env = dict(os.environ, NNSAE_CACHE=str(tmp_path), NNSAE_NATIVE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))

    def load() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _LOAD_KERNELS], env=env, capture_output=True, text=True,
                              timeout=120)

    first = load()
    assert first.returncode == 0 and first.stdout.strip() == "loaded", first.stderr
    (record,) = (tmp_path / "native").glob("kernels-*.json")
    entry = json.loads(record.read_text())
    library = record.parent / entry["file"]
    assert library.stat().st_size == entry["size"]
    for damage in ("truncate", "same size, other bytes", "missing"):
        if damage == "truncate":
            library.write_bytes(library.read_bytes()[: entry["size"] // 3])
        elif damage == "same size, other bytes":
            data = bytearray(library.read_bytes())
            data[len(data) // 2] ^= 0xFF
            library.write_bytes(bytes(data))
        else:
            library.unlink()
        run = load()
        assert run.returncode == 0 and run.stdout.strip() == "loaded", (damage, run.returncode, run.stderr)
        assert "damaged" in run.stderr and str(record) in run.stderr
        entry = json.loads(record.read_text())
        library = record.parent / entry["file"]
        assert library.stat().st_size == entry["size"]  # a whole library again
    record.write_text("{not json")
    run = load()
    assert run.returncode == 0 and run.stdout.strip() == "loaded" and "damaged" in run.stderr
    assert not [p for p in record.parent.iterdir() if p.name.startswith(".tmp-")]
