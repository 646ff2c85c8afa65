"""`evaluate_transcoders` against metrics computed here from a plain HF forward with torch hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnsae.evals import evaluate_transcoders
from tests.test_transcoder_attach import manual_replacement, mlp_modules, random_clt, random_set, ref_acts
from tests.tiny_models import N_LAYERS, tiny_model, tiny_tokens

TOKENS = tiny_tokens(batch=4, seq=12, seed=3)
KW = dict(tokenizer=None, context_size=12, batch_size_prompts=2, exclude_special_tokens=False, progress=False)


def true_mlp_io(model, family):
    inputs, outputs, hooks = {}, {}, []
    for layer, (mlp, out_module) in enumerate(mlp_modules(model, family)):
        hooks.append(mlp.register_forward_pre_hook(lambda m, a, layer=layer: inputs.__setitem__(layer, a[0])))
        hooks.append(out_module.register_forward_hook(lambda m, a, o, layer=layer: outputs.__setitem__(layer, o)))
    with torch.no_grad():
        model(TOKENS)
    for h in hooks:
        h.remove()
    return inputs, outputs


def reference_recons(tc, inputs):
    from nnsae.circuits import CrossLayerTranscoder

    acts = {layer: ref_acts(tc, layer, inputs[layer]) for layer in range(N_LAYERS)}
    if isinstance(tc, CrossLayerTranscoder):
        return acts, {L: sum(acts[s] @ tc.W_dec[s][:, L - s] for s in range(L + 1)) + tc.b_dec[L]
                      for L in range(N_LAYERS)}
    return acts, {L: acts[L] @ tc[L].W_dec + tc[L].b_dec for L in range(N_LAYERS)}


def ce_kl(model, family, tc, layers, tokens=TOKENS):
    def ce(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), tokens[:, 1:].flatten()).item()

    def kl(clean, other):
        p = F.log_softmax(clean.double(), -1)
        return (p.exp() * (p - F.log_softmax(other.double(), -1))).sum(-1).mean().item()

    with torch.no_grad():
        clean = model(tokens).logits
        with manual_replacement(model, family, tc, layers=layers):
            replaced = model(tokens).logits
        outs = mlp_modules(model, family)
        hooks = [outs[layer][1].register_forward_hook(lambda m, a, o: torch.zeros_like(o)) for layer in layers]
        ablated = model(tokens).logits
        for h in hooks:
            h.remove()
    return {"ce_loss_score": (ce(ablated) - ce(replaced)) / (ce(ablated) - ce(clean)),
            "ce_loss_with_sae": ce(replaced), "ce_loss_with_ablation": ce(ablated), "ce_loss_without_sae": ce(clean),
            "kl_div_score": (kl(clean, ablated) - kl(clean, replaced)) / kl(clean, ablated),
            "kl_div_with_sae": kl(clean, replaced)}


@pytest.mark.parametrize("family,kind", [("llama", "set"), ("gemma2", "clt")])
def test_metrics_match_manual_replacement(family, kind):
    tc = random_set(4, "topk") if kind == "set" else random_clt(5)
    model = tiny_model(family)
    out = evaluate_transcoders(model, tc, TOKENS, n_tokens=TOKENS.numel(), n_ce_tokens=TOKENS.numel(), **KW)

    inputs, outputs = true_mlp_io(model, family)
    acts, recons = reference_recons(tc, inputs)
    for layer in range(N_LAYERS):
        y = outputs[layer].flatten(0, 1).double()
        yh = recons[layer].flatten(0, 1).double()
        f = acts[layer].flatten(0, 1)
        variance = y.pow(2).sum(-1).mean() - y.mean(0).pow(2).sum()
        mse = (y - yh).pow(2).sum(-1).mean()
        m = out["layers"][layer]["metrics"]
        torch.testing.assert_close(m["reconstruction_quality"]["explained_variance"], (1 - mse / variance).item(),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m["reconstruction_quality"]["fraction_of_variance_unexplained"],
                                   (mse / variance).item(), rtol=1e-4, atol=1e-5)
        assert m["sparsity"]["l0"] == pytest.approx((f != 0).sum(-1).double().mean().item())
        density = (f != 0).double().mean(0)
        assert m["sparsity"]["dead_features_fraction"] == pytest.approx((density == 0).double().mean().item())
        assert m["sparsity"]["dense_features_fraction"] == pytest.approx((density > 0.1).double().mean().item())

    expected_groups = {"all"} if kind == "clt" else {"all", *(f"layer_{i}" for i in range(N_LAYERS))}
    assert set(out["replacements"]) == expected_groups
    checks = {"all": list(range(N_LAYERS))} if kind == "clt" else {"all": list(range(N_LAYERS)), "layer_1": [1]}
    for name, layers in checks.items():
        want = ce_kl(model, family, tc, layers)
        got = out["replacements"][name]
        perf, behav = got["model_performance_preservation"], got["model_behavior_preservation"]
        for key in ("ce_loss_score", "ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_without_sae"):
            assert perf[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (name, key)
        for key in ("kl_div_score", "kl_div_with_sae"):
            assert behav[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), (name, key)


def test_chosen_layer_groups_and_clt_refusals():
    model = tiny_model("llama")
    out = evaluate_transcoders(model, random_set(1, "relu"), TOKENS, layers=[0, 2], replace=[[0, 2]],
                               n_tokens=24, n_ce_tokens=24, **KW)
    assert sorted(out["layers"]) == [0, 2] and list(out["replacements"]) == ["layers_0_2"]
    want = ce_kl(model, "llama", random_set(1, "relu"), [0, 2], TOKENS[:2])  # n_ce_tokens=24: the first batch
    got = out["replacements"]["layers_0_2"]["model_performance_preservation"]["ce_loss_score"]
    assert got == pytest.approx(want["ce_loss_score"], rel=1e-4)
    with pytest.raises(ValueError, match="cannot replace one MLP alone"):
        evaluate_transcoders(model, random_clt(), TOKENS, replace=["each"], n_tokens=24, **KW)
