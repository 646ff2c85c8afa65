"""nnsae's HookedSAETransformer-style helpers against SAELens' HookedSAETransformer itself, on identical tiny GPT-2
weights: logits, losses, cache keys and values, hook functions and their call order, replacement at an occupied hook,
transcoders."""

from __future__ import annotations

import nnsight
import pytest
import torch

import nnsae
from nnsae import SAE, SAEConfig
from tests.test_hooks import tl_model
from tests.tiny_models import D_MODEL, tiny_model, tiny_tokens

sae_lens = pytest.importorskip("sae_lens")
CLOSE = dict(rtol=1e-4, atol=1e-5)
IDS = tiny_tokens(batch=2, seq=8)


def make_pair(tmp_path, name: str, seed: int, **cfg) -> tuple[SAE, "sae_lens.SAE"]:
    """The same SAE in nnsae and in SAELens (written by nnsae, read by SAELens)."""
    cfg.setdefault("architecture", "standard")
    sae = SAE.from_config(SAEConfig(d_in=D_MODEL, d_sae=96, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    sae.save_model(tmp_path / name)
    return sae, sae_lens.SAE.load_from_disk(str(tmp_path / name))


@pytest.fixture(scope="module")
def models():
    hf = tiny_model("gpt2")
    hooked = tl_model(hf, model_class=sae_lens.HookedSAETransformer)
    return nnsight.NNsight(hf), hooked


@pytest.fixture
def saes(tmp_path):
    resid = make_pair(tmp_path, "resid", 1, metadata={"hook_name": "blocks.1.hook_resid_post"})
    pre = make_pair(tmp_path, "pre", 2, metadata={"hook_name": "blocks.0.hook_resid_pre"})
    other = make_pair(tmp_path, "other", 3, metadata={"hook_name": "blocks.1.hook_resid_post"})
    return resid, pre, other


@torch.no_grad()
def test_run_with_saes_logits_and_losses(models, saes):
    model, hooked = models
    (ours, theirs), (ours2, theirs2), _ = saes
    for return_type in ("logits", "loss", "both"):
        for per_token in (False, True):
            got = nnsae.run_with_saes(model, IDS, saes=[ours, ours2], return_type=return_type,
                                      loss_per_token=per_token)
            want = hooked.run_with_saes(IDS, saes=[theirs, theirs2], return_type=return_type,
                                        loss_per_token=per_token)
            for g, w in zip(got if return_type == "both" else [got], want if return_type == "both" else [want]):
                torch.testing.assert_close(g, w, **CLOSE)
    assert nnsae.run_with_saes(model, IDS, saes=[ours], return_type=None) is None
    assert ours.use_error_term is False and theirs.use_error_term is False


@torch.no_grad()
def test_cache_keys_and_values(models, saes):
    model, hooked = models
    (ours, theirs), _, _ = saes
    for use_error_term in (False, True):
        logits, cache = nnsae.run_with_cache_with_saes(model, IDS, saes=[ours], use_error_term=use_error_term)
        want_logits, want = hooked.run_with_cache_with_saes(IDS, saes=[theirs], use_error_term=use_error_term)
        torch.testing.assert_close(logits, want_logits, **CLOSE)
        sae_keys = {k for k in want.keys() if ".hook_sae_" in k}
        assert {k for k in cache if ".hook_sae_" in k} == sae_keys
        assert "blocks.1.hook_resid_post" not in cache and "blocks.1.hook_resid_post" not in want.keys()
        assert set(cache) <= set(want.keys())  # TL caches more points (q, k, v, patterns, ...)
        for key, value in cache.items():
            torch.testing.assert_close(value, want[key].flatten(-2) if key.endswith("hook_z") else want[key],
                                       **CLOSE, msg=lambda m, key=key: f"{key}: {m}")
    # a persistently attached SAE is cached too, by run_with_cache
    handle = nnsae.attach(model, ours)
    try:
        _, cache = nnsae.run_with_cache(model, IDS, names_filter=lambda k: k.endswith("acts_post"))
    finally:
        handle.detach()
    hooked.add_sae(theirs)
    try:
        _, want = hooked.run_with_cache(IDS, names_filter=lambda k: k.endswith("acts_post"))
    finally:
        hooked.reset_saes()
    assert set(cache) == set(want.keys()) == {"blocks.1.hook_resid_post.hook_sae_acts_post"}
    torch.testing.assert_close(cache["blocks.1.hook_resid_post.hook_sae_acts_post"],
                               want["blocks.1.hook_resid_post.hook_sae_acts_post"], **CLOSE)


@torch.no_grad()
def test_hook_functions_edit_and_run_in_the_same_order(models, saes):
    model, hooked = models
    (ours, theirs), _, _ = saes
    calls = {"ours": [], "theirs": []}

    def hooks(who):
        def ablate(act, hook):
            calls[who].append(hook.name)
            act[..., :48] = 0
            return act

        def scale(act, hook):
            calls[who].append(hook.name)
            return act * 1.5

        def look(act, hook):
            calls[who].append(hook.name)

        return [("blocks.1.hook_resid_post.hook_sae_acts_post", ablate), ("blocks.0.hook_resid_post", scale),
                ("blocks.1.hook_resid_post.hook_sae_output", look), ("blocks.0.hook_mlp_out", look)]

    got = nnsae.run_with_hooks_with_saes(model, IDS, saes=[ours], fwd_hooks=hooks("ours"))
    want = hooked.run_with_hooks_with_saes(IDS, saes=[theirs], fwd_hooks=hooks("theirs"))
    torch.testing.assert_close(got, want, **CLOSE)
    assert calls["ours"] == calls["theirs"] and len(calls["ours"]) == 4
    assert (got - hooked(IDS)).abs().max() > 1e-3  # the edits matter


def test_backward_hooks_see_the_same_gradients(models, saes):
    model, hooked = models
    (ours, theirs), _, _ = saes
    grads = {}

    def record(who):
        return [("blocks.1.hook_resid_post.hook_sae_acts_post", lambda g, hook: grads.__setitem__(who, g.clone()))]

    nnsae.run_with_hooks_with_saes(model, IDS, saes=[ours], bwd_hooks=record("ours"), return_type="loss").backward()
    hooked.run_with_hooks_with_saes(IDS, saes=[theirs], bwd_hooks=record("theirs"), return_type="loss",
                                    reset_hooks_end=False).backward()
    hooked.reset_hooks()
    torch.testing.assert_close(grads["ours"], grads["theirs"], **CLOSE)


@torch.no_grad()
def test_a_temporary_sae_replaces_the_attached_one_at_its_hook(models, saes):
    model, hooked = models
    (a, a_sl), _, (b, b_sl) = saes
    handle = nnsae.attach(model, a)
    hooked.add_sae(a_sl)
    try:
        got = nnsae.run_with_saes(model, IDS, saes=[b])
        want = hooked.run_with_saes(IDS, saes=[b_sl])
        torch.testing.assert_close(got, want, **CLOSE)
        torch.testing.assert_close(nnsae.run_with_saes(model, IDS), hooked(IDS), **CLOSE)  # `a` is back
    finally:
        handle.detach()
        hooked.reset_saes()


@torch.no_grad()
def test_transcoder_points_sit_at_the_output_hook(models, tmp_path):
    model, hooked = models
    ours, theirs = make_pair(tmp_path, "tc", 4, architecture="transcoder", d_out=D_MODEL, apply_b_dec_to_input=False,
                             metadata={"hook_name": "blocks.0.mlp.hook_in", "hook_name_out": "blocks.0.hook_mlp_out"})
    logits, cache = nnsae.run_with_cache_with_saes(model, IDS, saes=[ours])
    want_logits, want = hooked.run_with_cache_with_saes(IDS, saes=[theirs])
    torch.testing.assert_close(logits, want_logits, **CLOSE)
    keys = {k for k in cache if ".hook_sae_" in k}
    assert keys == {k for k in want.keys() if ".hook_sae_" in k}
    assert all(k.startswith("blocks.0.hook_mlp_out.") for k in keys)
    for key in keys:
        torch.testing.assert_close(cache[key], want[key], **CLOSE)


def test_the_tuple_form_of_from_pretrained_names_the_right_function(saes):
    (sae, _), _, _ = saes
    with pytest.raises(TypeError, match="from_pretrained_with_cfg_and_sparsity"):
        _, _, _ = sae


def test_test_prompt_prints_what_transformer_lens_prints(models, saes, tmp_path, capsys):
    import transformers
    from transformer_lens.utilities import test_prompt as tl_test_prompt

    from tests.tiny_models import tiny_tokenizer

    model, hooked = models
    (ours, theirs), _, _ = saes
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")  # TL reloads it by name
    hooked.set_tokenizer(tokenizer, default_padding_side="right")
    for with_sae in (False, True):
        if with_sae:
            hooked.add_sae(theirs)
        try:
            tl_test_prompt("When John and Mary went", "M", hooked, top_k=4)
        finally:
            hooked.reset_saes()
        want = capsys.readouterr().out
        report = nnsae.test_prompt(model, "When John and Mary went", "M", tokenizer=tokenizer, prepend_bos=True,
                                   top_k=4, saes=[ours] if with_sae else [])
        assert capsys.readouterr().out == want
        assert f"Ranks of the answer tokens: {report['ranks']}" in want
