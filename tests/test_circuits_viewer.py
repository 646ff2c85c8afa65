"""The offline graph viewer (nnsae.circuits.viewer) and the `nnsae attribute` command.

The viewer's nodes and edges are checked against the Neuronpedia file `create_graph_files` writes for the same
thresholds; its top-activating examples against a plain-hook pass of the transcoder encoder over the extraction's
texts; the page itself is rendered in headless Chromium (screenshot in test-artifacts/)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from nnsae import SAE, SAEConfig
from nnsae.circuits import Graph, attribute, create_graph_files, save_transcoders
from nnsae.circuits.viewer import write_viewer
from nnsae.extract import extract, load_features
from tests.test_circuits import random_set
from tests.test_dashboard import ARTIFACTS, browse, dom
from tests.tiny_models import tiny_model, tiny_tokenizer

PROMPT = "Fish swim in the sea"
TEXTS = [f"Document {i}: fish swim in the sea, birds fly over {i * 7} hills." for i in range(24)]
CONTEXT = 32


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer")
    model, tok, tc = tiny_model("llama"), tiny_tokenizer(), random_set()
    graph = attribute(model, PROMPT, tc, tokenizer=tok)
    # The transcoders' encoders as SAEs on the MLP inputs: their features are the transcoders' features.
    saes = {}
    for layer, t in enumerate(tc.transcoders):
        sae = SAE.from_config(SAEConfig(d_in=t.W_enc.shape[1], d_sae=t.W_enc.shape[0], architecture="standard",
                                        metadata={"hook_name": f"blocks.{layer}.mlp.hook_in", "model_name": "tiny"}))
        with torch.no_grad():
            sae.W_enc.copy_(t.W_enc.T)
            sae.b_enc.copy_(t.b_enc)
            sae.W_dec.copy_(t.W_dec)
            sae.b_dec.zero_()
        saes[f"layer{layer}"] = sae
    extraction = extract(model, saes, TEXTS, root / "feats", tokenizer=tok, context_size=CONTEXT, top_k=None,
                         n_top_contexts=4, context_window=3, progress=False)
    page = write_viewer(graph, root / "graph.html", tokenizer=tok, extraction=extraction)
    return model, tok, tc, graph, root, page


def page_data(page) -> dict:
    text = page.read_text()
    block = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', text, re.S).group(1)
    return json.loads(block)


def test_viewer_nodes_and_edges_match_the_neuronpedia_file(built):
    model, tok, tc, graph, root, page = built
    path = create_graph_files(graph, "fish", root / "np", tokenizer=tok)
    neuronpedia = json.loads(path.read_text())
    data = page_data(page)
    kinds = {"cross layer transcoder": "feature", "mlp reconstruction error": "error", "embedding": "embedding",
             "logit": "logit"}
    want_nodes = {(kinds[n["feature_type"]], n["node_id"]): n for n in neuronpedia["nodes"]}
    assert {(n["kind"], n["node_id"]) for n in data["nodes"]} == want_nodes.keys()
    for node in data["nodes"]:
        assert node["id"] == f"{node['kind']}:{node['node_id']}"
        assert node["influence"] == pytest.approx(want_nodes[node["kind"], node["node_id"]]["influence"])
        if node["kind"] == "feature":
            assert node["activation"] == pytest.approx(want_nodes["feature", node["node_id"]]["activation"])
    ids = [n["node_id"] for n in data["nodes"]]
    got = sorted((ids[link["s"]], ids[link["t"]], link["w"]) for link in data["links"])
    want = sorted((link["source"], link["target"], link["weight"]) for link in neuronpedia["links"])
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want])
    assert any(n["kind"] == "feature" for n in data["nodes"])
    text = page.read_text()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', text).group(1)
    assert "default-src &#x27;none&#x27;" in csp and "https:" not in csp and "http://" not in text.replace(
        "http://www.w3.org/2000/svg", "")


def test_viewer_examples_are_the_features_top_activations(built):
    """A feature node's first example peaks at the feature's largest activation over the extraction's chunks,
    computed here with a plain forward hook and the transcoder's own encoder."""
    model, tok, tc, graph, root, page = built
    data = page_data(page)
    features = [n for n in data["nodes"] if n["kind"] == "feature"]
    layers = {n["layer"] for n in features}
    table = load_features(root / "feats", format="table", columns=["token_id", "is_special"])
    chunks = torch.tensor(table.column("token_id").to_numpy()).view(-1, CONTEXT)
    special = torch.tensor(table.column("is_special").to_numpy()).view(-1, CONTEXT)
    inputs = {}
    hooks = [model.model.layers[layer].mlp.register_forward_pre_hook(
        lambda m, args, layer=layer: inputs.__setitem__(layer, args[0])) for layer in layers]
    with torch.no_grad():
        model(chunks)
    for h in hooks:
        h.remove()
    checked = 0
    for node in features:
        acts = tc.encode_layer(inputs[node["layer"]].reshape(-1, inputs[node["layer"]].shape[-1]), node["layer"])
        top = float(acts[~special.flatten(), node["feature"]].max())  # special tokens are left out
        if top <= 0:
            assert node["examples"] == []
            continue
        example = node["examples"][0]
        assert example["acts"][example["max"]] == pytest.approx(top, rel=1e-4, abs=1e-5)
        checked += 1
    assert checked > 0


def test_viewer_renders_in_headless_chromium(built):
    model, tok, tc, graph, root, page = built
    data = page_data(page)
    doc = dom(browse(page.as_uri(), screenshot=ARTIFACTS / "circuit-viewer.png"))
    body = doc.one("body")
    assert int(body.attrs["data-rendered-nodes"]) == len(data["nodes"])
    assert int(body.attrs["data-rendered-edges"]) == len(data["links"])
    assert len(doc.find("circle")) == len(data["nodes"])
    assert len(doc.find("path")) == len(data["links"])

    # a node selected from the URL: its edges highlighted, its details (activation, examples) shown
    node = next(n for n in data["nodes"] if n["kind"] == "feature" and n["examples"])
    doc = dom(browse(page.as_uri() + "#node=" + node["id"]))
    assert doc.one("body").attrs["data-selected"] == node["id"]
    highlighted = [p for p in doc.find("path") if "hl" in p.classes()]
    expected = [link for link in data["links"] if node["id"] in (data["nodes"][link["s"]]["id"],
                                                                 data["nodes"][link["t"]]["id"])]
    assert len(highlighted) == len(expected) > 0
    assert all(node["id"] in (p.attrs["data-source"], p.attrs["data-target"]) for p in highlighted)
    details = doc.one("#details")
    assert details.one("td.v-activation").text == _fmt(node["activation"])
    assert details.one("td.v-feature").text == str(node["feature"])
    assert "".join(details.find("div.example")[0].text) == "".join(node["examples"][0]["tokens"])


def _fmt(x: float) -> str:
    """viewer.js's number format (toPrecision(4), or toExponential(3) for very small or large values)."""
    a = abs(x)
    if a != 0 and (a < 1e-3 or a >= 1e4):
        mantissa, exponent = f"{x:.3e}".split("e")
        return f"{mantissa}e{int(exponent):+d}"
    digits = 4 - 1 - (int(torch.tensor(a).log10().floor()) if a else 0)
    return f"{x:.{max(digits, 0)}f}"


# ---- nnsae attribute ------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnsae.cli", "attribute", *args], capture_output=True, text=True,
                          timeout=300)


def test_attribute_command_writes_graph_files_and_viewer(built, tmp_path):
    model, tok, tc, graph, root, page = built
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    save_transcoders(tc, tmp_path / "tc")
    out = tmp_path / "graphs"
    result = run_cli("--model", str(tmp_path / "model"), "--transcoders", str(tmp_path / "tc"), "--prompt", PROMPT,
                     "--out", str(out), "--slug", "fish", "--batch-size", "8", "--max-feature-nodes", "20",
                     "--node-threshold", "0.7", "--edge-threshold", "0.9", "--extraction", str(root / "feats"))
    assert result.returncode == 0, result.stderr
    expected = attribute(model, PROMPT, tc, tokenizer=tok, batch_size=8, max_feature_nodes=20)
    written = Graph.from_pt(out / "fish.pt")
    assert torch.equal(written.selected_features, expected.selected_features)
    torch.testing.assert_close(written.adjacency_matrix, expected.adjacency_matrix, rtol=1e-4, atol=1e-5)
    neuronpedia = json.loads((out / "fish.json").read_text())
    assert neuronpedia["metadata"]["node_threshold"] == 0.7
    assert [g["slug"] for g in json.loads((out / "graph-metadata.json").read_text())["graphs"]] == ["fish"]
    data = page_data(out / "fish.html")
    assert data["node_threshold"] == 0.7 and data["edge_threshold"] == 0.9 and data["has_examples"]
    assert {n["node_id"] for n in data["nodes"]} == {n["node_id"] for n in neuronpedia["nodes"]}
    assert str((out / "fish.html").resolve()) in result.stdout


def test_attribute_command_errors_are_one_line(tmp_path):
    result = run_cli("--model", str(tmp_path / "nowhere"), "--transcoders", str(tmp_path / "no-transcoders"),
                     "--prompt", "x", "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-transcoders" in lines[0]
