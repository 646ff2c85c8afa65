"""README.md: every ```python block runs, in order, in one namespace, offline, on the embedded SmolLM2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


def fences() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(README.read_text())]


def test_readme_fences_are_labelled():
    """An unlabelled or misspelled fence would silently escape the run below."""
    langs = [lang for lang, _ in fences()]
    assert "python" in langs
    assert set(langs) <= {"python", "bash", "text", ""}
    for lang, body in fences():
        if lang != "python":
            assert not re.search(r"^\s*(import |from \w+ import |with model\.)", body, re.M), body[:200]


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippets write acts/, runs/, my-sae/, feats/, dash/ to the working directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__readme__"}
    blocks = [body for lang, body in fences() if lang == "python"]
    for i, body in enumerate(blocks):
        path = tmp_path / f"readme_block_{i}.py"  # nnsight reads trace bodies back from their source file
        path.write_text(body)
        exec(compile(body, str(path), "exec"), namespace)

    # what the tour claims, checked against independent computations
    sae, tokens, hf_model = namespace["sae"], namespace["tokens"], namespace["hf_model"]
    assert (tmp_path / "my-sae" / "cfg.json").is_file() and (tmp_path / "runs" / "x" / "layer6").is_dir()
    assert any((tmp_path / "acts").iterdir())
    ce = namespace["record"]["metrics"]["model_performance_preservation"]
    assert ce["ce_loss_without_sae"] < ce["ce_loss_with_sae"] < ce["ce_loss_with_ablation"]
    assert 0 < ce["ce_loss_score"] <= 1
    with torch.no_grad():
        out = hf_model(tokens, output_hidden_states=True)
        resid6 = out.hidden_states[7]  # hidden_states[0] is the embedding, [i + 1] the output of layer i
    torch.testing.assert_close(namespace["x"], resid6, atol=1e-4, rtol=1e-4)
    feats = namespace["feats"]
    assert ((feats > 0).sum(-1) <= 32).all() and (feats > 0).any()
    torch.testing.assert_close(namespace["recon"], sae.decode(sae.encode(resid6)), atol=1e-4, rtol=1e-4)
    assert str(namespace["nnsae"].resolve_hook(namespace["model"], sae).read.module) == "model.layers.6"
    torch.testing.assert_close(namespace["acts"], sae.encode(resid6), atol=1e-4, rtol=1e-4)
    logits, cache = namespace["logits"], namespace["cache"]
    assert logits.shape == out.logits.shape and not torch.allclose(logits, out.logits)
    torch.testing.assert_close(cache["model.layers.6.hook_sae_acts_post"], feats, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "feats" / "manifest.json").is_file()
    # the migration table's block
    assert namespace["loss"].ndim == 0 and namespace["patched"] > namespace["loss"]
    assert set(namespace["cache"]) >= {"model.layers.6.hook_sae_acts_post"}
    assert namespace["report"]["answer_tokens"] == [" Mary"] and namespace["batch"].shape[1] == 64
    assert namespace["nnsae"].attached(namespace["model"]) == [] and not namespace["handle"].attached
    assert (tmp_path / "dash" / "index.html").is_file() and (tmp_path / "dash" / "features" / "0.json").is_file()
    assert not namespace["nnsae"].attached(namespace["model"])
