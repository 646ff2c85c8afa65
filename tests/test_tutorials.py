"""tutorials/*.ipynb: committed without outputs, and each executes in a fresh kernel with real outcomes checked.

The slow test runs a notebook with nbclient (cwd = tutorials/) after inserting one cell before its clean-up cell
that prints the values checked here as JSON, so the notebooks themselves carry nothing test-specific.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(p.name for p in TUTORIALS.glob("*.ipynb"))
MARK = "NNSAE-TUTORIAL-RESULTS "
CELL_TIMEOUT = 1200  # seconds; one cell trains an SAE on a shared 2-core machine

# notebook → expression (evaluated in the notebook's namespace) whose JSON value the assertions below read
PROBES = {
    "00_from_saelens.ipynb": """{
        "ce": ce, "l0_mean": l0.mean().item(), "ranks": ranks, "index_exists": index.is_file(),
        "n_cache": len(cache), "acts_post_key": f"{HOOK}.hook_sae_acts_post" in cache,
        "rows": token_dataset.num_rows, "batch_shape": list(batch_tokens.shape)}""",
    "01_loading_saes.ipynb": """{
        "same_weights": same_weights, "offline_error": offline_error,
        "hub_equal": bool(torch.equal(from_hub.W_dec, sae.W_dec)),
        "release_equal": bool(torch.equal(by_release.W_enc, sae.W_enc)),
        "format": detect_format(hookpoint), "foreign_hook": foreign.cfg.metadata.hf_hook_name,
        "encode_matches": bool(encode_matches), "error_term_exact": bool(error_term_exact),
        "l0": l0.mean().item()}""",
    "02_basic_analysis.ipynb": """{
        "ioi_clean": ioi_clean, "ioi_sae": ioi_sae, "ce": ce, "l0_mean": l0.mean().item(),
        "index_exists": index.is_file(),
        "feature_pages": sorted(int(p.stem) for p in (index.parent / "features").glob("*.json")),
        "top_features": top_features}""",
    "03_interventions.ipynb": """{
        "error_term_exact": bool(error_term_exact), "ablation_effect": ablation_effect,
        "earlier_untouched": bool(torch.equal(ablated_logits[0, :-1], clean_logits[0, :-1])),
        "spliced_changes": (spliced_logits - clean_logits).abs().max().item(),
        "plain_text": plain_text, "steered_text": steered_text,
        "attribution_shape": list(attribution.shape), "attribution_finite": bool(attribution.isfinite().all()),
        "cache_keys": sorted(cache), "cache_matches": bool(torch.allclose(acts_post, feats, atol=1e-5)),
        "attached_after": len(nnsae.attached(model)), "n_tokens": ids.shape[1], "d_sae": sae6.cfg.d_sae}""",
    "04_training.ipynb": """{
        "mse_first": mse_first, "mse_last": mse_last, "ev": ev,
        "reloaded_equal": bool(torch.equal(reloaded.W_dec, saes["topk"].W_dec)),
        "eval_json": (WORK / "eval.json").is_file() or any(WORK.glob("eval*.json"))}""",
    "05_extraction.ipynb": """{
        "extraction_matches": bool(extraction_matches), "shards_after_crash": shards_after_crash,
        "resumed_identical": resumed_identical, "n_tokens": stats["n_tokens"], "rows": table.num_rows,
        "n_shards": len(manifest["shards"])}""",
    "06_remote_ndif.ipynb": """{
        "server_imported_nnsae": bool(server_imported_nnsae), "remote_matches_local": bool(remote_matches_local),
        "mounted_error": mounted_error, "size_fp32": size_fp32, "size_bf16": size_bf16,
        "weights_fp32": weights_fp32}""",
    "07_circuits.ipynb": """{
        "fvu": fvu.tolist(), "logit_tokens": [tokenizer.decode(t) for t in graph.logit_tokens.tolist()],
        "n_selected": len(graph.selected_features), "n_active": len(graph.active_features),
        "reloaded_equal": bool(torch.equal(reloaded.adjacency_matrix, graph.adjacency_matrix)),
        "replacement": replacement_score, "completeness": completeness_score, "kept_nodes": int(node_mask.sum()),
        "json_nodes": len(json.loads(json_path.read_text())["nodes"]), "page_exists": page.is_file(),
        "with_examples": len(with_examples), "edge_weight": edge_weight, "logit_change": logit_change,
        "boost_change": boost_change}""",
}


def test_every_notebook_has_a_probe():
    assert NOTEBOOKS and set(NOTEBOOKS) == set(PROBES)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) // 2  # prose explains the steps


def run_notebook(name: str) -> dict:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    probe = (f"import json as _json, sys as _sys\n_r = {PROBES[name].strip()}\n_r['python'] = _sys.executable\n"
             f"print({MARK!r} + _json.dumps(_r))")
    cleanup = max(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    if "rmtree" not in nb.cells[cleanup].source:
        cleanup += 1
    nb.cells.insert(cleanup, nbformat.v4.new_code_cell(probe))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(TUTORIALS)}})
    client.execute()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and MARK in out.get("text", ""):
                line = next(x for x in out["text"].splitlines() if x.startswith(MARK))
                return json.loads(line[len(MARK):])
    raise AssertionError(f"{name}: the probe cell printed nothing")


def execute(name: str) -> dict:
    r = run_notebook(name)
    # the kernel is this interpreter's (the venv's), not some other python on PATH
    assert Path(r["python"]).resolve() == Path(sys.executable).resolve()
    return r


@pytest.mark.slow
def test_00_from_saelens():
    r = execute("00_from_saelens.ipynb")
    ce = r["ce"]
    assert ce["orig"] < ce["reconstr"] < ce["zero"]
    assert 0 < r["l0_mean"] <= 32
    assert r["ranks"]["clean"] == 0  # SmolLM2 completes the IOI prompt with " Mary"
    assert r["ranks"]["with_sae"] >= 0 and r["index_exists"]
    assert r["acts_post_key"] and r["n_cache"] > 100  # SAE points and the model's own TL points
    assert r["batch_shape"] == [8, 128] and r["rows"] > 8


@pytest.mark.slow
def test_01_loading_saes():
    r = execute("01_loading_saes.ipynb")
    assert r["same_weights"] and r["hub_equal"] and r["release_equal"]
    assert r["offline_error"] == "OfflineCacheMissError"
    assert r["format"] == "sparsify" and r["foreign_hook"] == "model.layers.6"
    assert r["encode_matches"] and r["error_term_exact"]
    assert r["l0"] == 16  # k of the sparsify SAE; random weights give positive top-16 pre-activations


@pytest.mark.slow
def test_02_basic_analysis():
    r = execute("02_basic_analysis.ipynb")
    assert r["ioi_clean"] > 0  # SmolLM2 prefers " Mary"
    ce = r["ce"]
    assert ce["ce_loss_without_sae"] < ce["ce_loss_with_sae"] < ce["ce_loss_with_ablation"]
    assert 0.5 < ce["ce_loss_score"] <= 1
    assert 0 < r["l0_mean"] <= 32
    assert r["index_exists"] and r["feature_pages"] == sorted(r["top_features"])


@pytest.mark.slow
def test_03_interventions():
    r = execute("03_interventions.ipynb")
    assert r["error_term_exact"] and r["earlier_untouched"]
    assert r["ablation_effect"] != 0 and r["spliced_changes"] > 0
    assert r["steered_text"] != r["plain_text"]
    assert r["attribution_shape"] == [r["n_tokens"], r["d_sae"]] and r["attribution_finite"]
    assert "blocks.6.hook_resid_post.hook_sae_acts_post" in r["cache_keys"]
    assert all(k.split(".hook_sae_")[0] in ("blocks.3.hook_resid_post", "blocks.6.hook_resid_post")
               for k in r["cache_keys"] if ".hook_sae_" in k)
    # the model's own points are cached too, except where an SAE sits (as in SAELens)
    assert "blocks.5.hook_resid_post" in r["cache_keys"] and "blocks.6.hook_resid_post" not in r["cache_keys"]
    assert r["cache_matches"] and r["attached_after"] == 0


@pytest.mark.slow
def test_04_training():
    r = execute("04_training.ipynb")
    assert r["mse_last"] < r["mse_first"] / 2
    assert r["ev"]["topk"] > 0.5 and r["ev"]["batchtopk"] > 0.5
    assert r["ev"]["topk"] > r["ev"]["untrained"] + 0.3
    assert r["reloaded_equal"] and r["eval_json"]


@pytest.mark.slow
def test_05_extraction():
    r = execute("05_extraction.ipynb")
    assert r["extraction_matches"]
    assert r["n_tokens"] == r["rows"] == 4096 and r["n_shards"] == 4
    assert 2 <= r["shards_after_crash"] < r["n_shards"] and r["resumed_identical"]


@pytest.mark.slow
def test_06_remote_ndif():
    r = execute("06_remote_ndif.ipynb")
    assert not r["server_imported_nnsae"] and r["remote_matches_local"]
    assert "UnknownPersistentId" in r["mounted_error"]
    assert r["size_fp32"] - r["size_bf16"] > 0.45 * r["weights_fp32"]


@pytest.mark.slow
def test_07_circuits():
    r = execute("07_circuits.ipynb")
    assert max(r["fvu"]) < 1 and sum(r["fvu"]) / len(r["fvu"]) < 0.8  # the transcoders explain part of each MLP
    assert r["logit_tokens"][0] == " Paris"
    assert r["n_selected"] == 256 < r["n_active"] and r["reloaded_equal"]
    assert 0 < r["completeness"] <= 1 and 0 < r["replacement"] <= 1
    assert r["json_nodes"] > 0 and r["page_exists"] and r["with_examples"] > 0
    # the strongest feature → logit edge exists, and setting that feature (to 0, to 3x) moves the logit
    assert r["edge_weight"] != 0
    assert abs(r["logit_change"]) > 1e-3 and abs(r["boost_change"]) > 1e-3
