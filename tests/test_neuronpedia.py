"""Neuronpedia page URLs come from one builder, `nnsae.neuronpedia.neuronpedia_page_url`: the SAE helpers, the
dashboard (feature JSON, feature page, index page) and the Hub model card all link through it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import nnsae
from nnsae import SAE, SAEConfig
from nnsae import neuronpedia as np_module
from nnsae.dashboards import build, render
from nnsae.dashboards.data import FeatureData
from nnsae.neuronpedia import neuronpedia_page_url, neuronpedia_url
from nnsae.upload import default_readme
from tests.tiny_models import tiny_tokenizer

PACKAGE_DIR = Path(nnsae.__file__).parent


def test_page_urls():
    assert neuronpedia_page_url("gpt2-small/8-res-jb") == "https://neuronpedia.org/gpt2-small/8-res-jb"
    assert neuronpedia_page_url("/gpt2-small/8-res-jb/", 7) == "https://neuronpedia.org/gpt2-small/8-res-jb/7"
    sae = SAE.from_config(SAEConfig(d_in=4, d_sae=8, metadata={"neuronpedia_id": "gpt2-small/8-res-jb"}))
    assert neuronpedia_url(sae, 7) == neuronpedia_page_url("gpt2-small/8-res-jb", 7)


def test_every_writer_links_through_the_builder(monkeypatch):
    # Move Neuronpedia to another domain: every link nnsae writes must follow.
    monkeypatch.setattr(np_module, "NEURONPEDIA_DOMAIN", "https://np.example")
    np_id = "tiny-llama/1-res-test"
    card = default_readme("o/r", {"s": {"cfg": {"d_in": 4, "d_sae": 8, "metadata": {"neuronpedia_id": np_id}}}})
    assert f"[{np_id}](https://np.example/{np_id})" in card

    info = {"name": "s", "model": "m", "hook": "h", "d_sae": 8, "neuronpedia_id": np_id}
    index = render.index_page(info, [], {"n_tokens": 0}, None)
    assert f'href="https://np.example/{np_id}"' in index

    fd = FeatureData(sae="s", index=3, n_tokens=10, firing_count=0, density=0.0, max_act=0.0, mean_act=0.0,
                     hist_edges=[1.0, 2.0], hist_counts=[0, 0, 0])
    renderer = build.TokenRenderer(tiny_tokenizer())
    record = build.feature_record(fd, renderer, info, None)
    assert record["neuronpedia_url"] == f"https://np.example/{np_id}/3"
    page = render.feature_page(fd, renderer, info, (None, None), None, None, record["neuronpedia_url"])
    assert f'href="https://np.example/{np_id}/3" id="neuronpedia"' in page
    assert build.feature_record(fd, renderer, dict(info, neuronpedia_id=None), None)["neuronpedia_url"] is None


def _string_constants(tree: ast.AST) -> list[str]:
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def offending_modules(package_dir: Path) -> list[str]:
    """Modules other than neuronpedia.py with a string (docstrings aside) that spells Neuronpedia's domain."""
    return [str(path.relative_to(package_dir)) for path in sorted(package_dir.rglob("*.py"))
            if path.name != "neuronpedia.py" or path.parent != package_dir
            if any("neuronpedia.org" in s for s in _string_constants(ast.parse(path.read_text(encoding="utf-8"))))]


def test_no_other_module_spells_the_domain():
    offenders = offending_modules(PACKAGE_DIR)
    assert not offenders, f"{offenders} build Neuronpedia URLs themselves; use nnsae.neuronpedia.neuronpedia_page_url"


def test_the_domain_scan_finds_a_hard_coded_link(tmp_path):
    (tmp_path / "card.py").write_text('"""Links to https://neuronpedia.org pages."""\n'
                                      'def link(i):\n    return f"https://neuronpedia.org/{i}"\n')
    (tmp_path / "doc.py").write_text('"""Only a docstring mentions https://neuronpedia.org."""\n')
    assert offending_modules(tmp_path) == ["card.py"]
