"""Eval metrics against formulas computed here with plain HF forwards and torch hooks."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F

from nnsae import SAE, SAEConfig
from nnsae.data import Document, pack
from nnsae.evals import evaluate
from tests.test_harvest import TEXTS
from tests.tiny_models import tiny_model, tiny_tokenizer

evals = importlib.import_module("nnsae.evals")  # the module (`nnsae.evals` may name a function)

CTX, BATCH = 16, 4


def make_sae(hook: str, seed: int = 0, arch: str = "standard") -> SAE:
    torch.manual_seed(seed)
    sae = SAE.from_config(SAEConfig(d_in=64, d_sae=96, architecture=arch, k=8 if arch == "topk" else None,
                                    metadata={"hook_name": hook, "context_size": CTX}))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    return sae


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    chunks = list(pack([Document(text=t) for t in TEXTS], tok, CTX))
    tokens = torch.stack([c.tokens for c in chunks])[: (len(chunks) // BATCH) * BATCH]
    return model, tok, tokens


def expected_metrics(model, sae, tokens, layer, special):
    """Every metric from its SAELens formula, on a plain HF forward of the same batches."""
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    rows = {"x": [], "xh": [], "f": [], "legacy": [], "bias": []}
    ce = {"clean": [], "sae": [], "abl": [], "kl_sae": [], "kl_abl": []}
    fired_prompts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for batch in tokens.split(BATCH):
        mask = ~torch.isin(batch, special)
        with torch.no_grad():
            out = model(batch, output_hidden_states=True)
        x = out.hidden_states[layer + 1].double()
        f = torch.relu((x - b_dec) @ W_enc + b_enc)
        xh = f @ W_dec + b_dec
        xs, xhs, fs = x[mask], xh[mask], f[mask]
        rows["x"].append(xs), rows["xh"].append(xhs), rows["f"].append(fs)
        resid = (xs - xhs).pow(2).sum(-1)
        rows["legacy"].append(1 - resid / (xs - xs.mean(0)).pow(2).sum(-1))
        rows["bias"].append(xhs.norm(dim=-1).pow(2).mean() / (xs * xhs).sum(-1).mean())
        fired_prompts += ((f != 0) & mask[..., None]).any(1).sum(0)

        def splice(m, i, o, xh=xh, mask=mask):
            return torch.where(mask[..., None], xh.float(), o)

        h = model.transformer.h[layer].register_forward_hook(splice)
        with torch.no_grad():
            logits_sae = model(batch).logits
        h.remove()
        h = model.transformer.h[layer].register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        with torch.no_grad():
            logits_abl = model(batch).logits
        h.remove()
        clean = out.logits

        def ce_of(lg):
            return F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]).double(), batch[:, 1:].reshape(-1),
                                   reduction="none").view(BATCH, -1)[mask[:, :-1]]

        def kl_of(lg):
            p = F.log_softmax(clean.double(), -1)
            return (p.exp() * (p - F.log_softmax(lg.double(), -1))).sum(-1)[mask]

        ce["clean"].append(ce_of(clean)), ce["sae"].append(ce_of(logits_sae)), ce["abl"].append(ce_of(logits_abl))
        ce["kl_sae"].append(kl_of(logits_sae)), ce["kl_abl"].append(kl_of(logits_abl))
    x, xh, f = (torch.cat(rows[k]) for k in ("x", "xh", "f"))
    n = x.shape[0]
    mse = (x - xh).pow(2).sum(-1).mean().item()
    var = x.pow(2).sum(-1).mean() - x.mean(0).pow(2).sum()
    m = {k: torch.cat(v).mean().item() for k, v in ce.items()}
    density = (f != 0).double().sum(0) / n
    return {
        "sparsity": {"l0": (f != 0).sum(-1).double().mean().item(), "l1": f.abs().sum(-1).mean().item(),
                     "dead_features_fraction": (density == 0).double().mean().item()},
        "reconstruction_quality": {
            "explained_variance": 1 - mse / var.item(), "mse": mse,
            "explained_variance_legacy": torch.cat(rows["legacy"]).mean().item(),
            "cossim": F.cosine_similarity(x, xh, dim=-1).mean().item()},
        "shrinkage": {"l2_norm_in": x.norm(dim=-1).mean().item(), "l2_norm_out": xh.norm(dim=-1).mean().item(),
                      "l2_ratio": (xh.norm(dim=-1) / x.norm(dim=-1)).mean().item(),
                      "relative_reconstruction_bias": torch.stack(rows["bias"]).mean().item()},
        "model_performance_preservation": {
            "ce_loss_without_sae": m["clean"], "ce_loss_with_sae": m["sae"], "ce_loss_with_ablation": m["abl"],
            "ce_loss_score": (m["abl"] - m["sae"]) / (m["abl"] - m["clean"])},
        "model_behavior_preservation": {
            "kl_div_with_sae": m["kl_sae"], "kl_div_with_ablation": m["kl_abl"],
            "kl_div_score": (m["kl_abl"] - m["kl_sae"]) / m["kl_abl"]},
    }, density, (f != 0).double().sum(0) / fired_prompts


@pytest.mark.parametrize("exclude", [True, False])
def test_metrics_match_saelens_formulas(setup, exclude):
    model, tok, tokens = setup
    sae = make_sae("blocks.1.hook_resid_post")
    n = tokens.numel()
    record = evaluate(model, sae, TEXTS, tokenizer=tok, n_tokens=n, n_ce_tokens=n, batch_size_prompts=BATCH,
                      exclude_special_tokens=exclude, progress=False)
    special = torch.tensor([0, 1, 2]) if exclude else torch.tensor([], dtype=torch.long)
    expected, density, cah = expected_metrics(model, sae, tokens, 1, special)
    for group, values in expected.items():
        for name, value in values.items():
            assert record["metrics"][group][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (group, name)
    fm = record["feature_metrics"]
    torch.testing.assert_close(torch.tensor(fm["feature_density"], dtype=torch.float64), density)
    torch.testing.assert_close(torch.tensor(fm["consistent_activation_heuristic"], dtype=torch.float64), cah,
                               equal_nan=True)
    assert fm["encoder_norm"] == pytest.approx(sae.W_enc.norm(dim=0).tolist(), rel=1e-5)
    assert record["metrics"]["token_stats"]["total_tokens_eval_sparsity_variance"] == int(
        (~torch.isin(tokens, special)).sum())


def test_several_saes_in_one_pass_match_separate_evals(setup, tmp_path):
    model, tok, tokens = setup
    a, b = make_sae("blocks.0.hook_resid_post", 1), make_sae("blocks.2.hook_resid_pre", 2, arch="topk")
    kw = dict(tokenizer=tok, n_tokens=256, n_ce_tokens=None, batch_size_prompts=BATCH, progress=False)
    both = evaluate(model, [a, b], TEXTS, out=tmp_path / "evals", plots=True, **kw)
    for sae, rec in zip([a, b], both):
        alone = evaluate(model, sae, TEXTS, **kw)
        assert rec["metrics"] == alone["metrics"]
    assert "model_performance_preservation" not in both[0]["metrics"]
    files = sorted(p.name for p in (tmp_path / "evals").iterdir())
    assert "blocks.0.hook_resid_post.json" in files and "blocks.0.hook_resid_post_l0_hist.png" in files
    saved = json.loads((tmp_path / "evals" / "blocks.2.hook_resid_pre.json").read_text())
    assert saved["metrics"]["sparsity"]["l0"] == pytest.approx(both[1]["metrics"]["sparsity"]["l0"])
    assert both[1]["metrics"]["sparsity"]["l0"] <= 8


def test_two_saes_on_one_hook_write_two_records(setup, tmp_path):
    """The usual width comparison: both records are kept (`{hook}.json`, `{hook}_2.json`), each the SAE's own."""
    model, tok, _ = setup
    narrow, wide = make_sae("blocks.1.hook_resid_post", 1), make_sae("blocks.1.hook_resid_post", 2, arch="topk")
    records = evaluate(model, [narrow, wide], TEXTS, tokenizer=tok, n_tokens=128, n_ce_tokens=None,
                       batch_size_prompts=BATCH, progress=False, out=tmp_path / "evals")
    assert sorted(p.name for p in (tmp_path / "evals").iterdir()) == [".lock", "blocks.1.hook_resid_post.json",
                                                                     "blocks.1.hook_resid_post_2.json"]
    for name, record in zip(["blocks.1.hook_resid_post", "blocks.1.hook_resid_post_2"], records):
        saved = json.loads((tmp_path / "evals" / f"{name}.json").read_text())
        assert saved["sae_cfg"]["architecture"] == record["sae_cfg"]["architecture"]
        assert saved["metrics"]["sparsity"]["l0"] == pytest.approx(record["metrics"]["sparsity"]["l0"])
    assert records[0]["sae_cfg"]["architecture"] == "standard" and records[1]["sae_cfg"]["architecture"] == "topk"


def test_an_unwritable_out_fails_before_any_compute(setup, tmp_path, monkeypatch):
    model, tok, _ = setup
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(evals, "Harvester", lambda *a, **k: pytest.fail("computed before checking out"))
    with pytest.raises(PermissionError, match=r"Cannot create the output directory .*file/evals"):
        evaluate(model, make_sae("blocks.1.hook_resid_post"), TEXTS, tokenizer=tok, out=blocker / "evals")


def test_a_second_evaluation_into_the_same_folder_is_refused(setup, tmp_path, monkeypatch):
    from nnsae.rundir import RunLocked, locked

    model, tok, _ = setup
    monkeypatch.setattr(evals, "Harvester", lambda *a, **k: pytest.fail("computed while the folder is in use"))
    with locked(tmp_path / "evals", "another evaluation"):
        with pytest.raises(RunLocked, match="is in use: another evaluation"):
            evaluate(model, make_sae("blocks.1.hook_resid_post"), TEXTS, tokenizer=tok, out=tmp_path / "evals")
    assert sorted(p.name for p in (tmp_path / "evals").iterdir()) == [".lock"]


def test_empty_dataset_is_a_clear_error(setup):
    model, tok, _ = setup
    with pytest.raises(ValueError, match="no complete chunk"):
        evaluate(model, make_sae("blocks.1.hook_resid_post"), ["too short"], tokenizer=tok, progress=False)
