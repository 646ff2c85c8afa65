"""The fused bias + activation of dense encoders (`nnsae.kernels.bias_activation`, native and torch) against the
torch formulas, bit for bit, and the fast `encode` path against the hooked one."""

from __future__ import annotations

import pytest
import torch

from nnsae import SAE, SAEConfig, native
from nnsae.kernels import bias_activation

D_SAE = 257  # odd: no vector-width assumptions


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(9, 3, D_SAE, generator=g)
    h[0, 0, :5] = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf")])
    b = torch.randn(D_SAE, generator=g) * 0.5
    threshold = torch.randn(D_SAE, generator=g) * 0.3  # some negative: relu(z)·1[z > θ] ≠ z·1[z > θ] there
    scale = torch.rand(D_SAE, generator=g) + 0.5
    b2 = torch.randn(D_SAE, generator=g) * 0.5
    return h, b, threshold, scale, b2


def _reference(kind, h, b, threshold, scale, b2):
    if kind == "relu":
        return torch.relu(h + b)
    if kind == "jumprelu":
        z = h + b
        return torch.relu(z) * (z > threshold).to(z.dtype)
    return (h + b > 0).to(h.dtype) * torch.relu(h * scale + b2)


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "gated"])
@pytest.mark.parametrize("use_native", [False, True])
def test_bias_activation_is_the_torch_formula_bit_for_bit(kind, use_native):
    kernels = native.library() if use_native else None
    if use_native and kernels is None:
        pytest.skip("no C++ compiler: the native kernel is not built")
    h, b, threshold, scale, b2 = _inputs()
    want = _reference(kind, h, b, threshold, scale, b2)
    got = bias_activation(h.clone(), b, kind, threshold=threshold, scale=scale, b2=b2, native=kernels)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
    assert torch.equal(torch.nan_to_num(got).signbit() & (got != 0), torch.nan_to_num(want).signbit() & (want != 0))


def test_native_bias_activation_splits_rows_over_threads():
    kernels = native.library()
    if kernels is None:
        pytest.skip("no C++ compiler")
    h = torch.randn(4096, 512)
    b, threshold = torch.randn(512), torch.rand(512)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        got = bias_activation(h.clone(), b, "jumprelu", threshold=threshold, native=kernels)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(got, _reference("jumprelu", h, b, threshold, None, None))


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated", "transcoder", "jumprelu_skip_transcoder"])
def test_fast_encode_equals_the_hooked_path(arch):
    kw = dict(apply_b_dec_to_input=False, d_out=24) if "transcoder" in arch else {}
    sae = SAE.from_config(SAEConfig(d_in=16, d_sae=D_SAE, architecture=arch, **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    x = torch.randn(5, 7, 16, generator=g)
    with torch.no_grad():
        fast_f, fast_out = sae.encode(x), sae(x)
        seen = []
        handle = sae.hook_sae_acts_pre.register_forward_hook(lambda m, i, o: seen.append(o))  # observed: no fusion
        slow_f, slow_out = sae.encode(x), sae(x)
        handle.remove()
    assert seen and torch.equal(fast_f, slow_f) and torch.equal(fast_out, slow_out)
