"""`nnsae convert` round-trips every supported format to SAELens layout with identical outputs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nnsae import SAE
from nnsae.cli import main
from tests import test_formats as fx


def _gemma_scope(d):
    fx._write_gemma_scope(d / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_7",
                          fx._gemma_scope_params())
    return d / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_7"


def _gemma_scope_2(d):
    fx._write_gemma_scope_2(d, fx._gs2_config(3, "model.layers.3.output", "model.layers.3.output"))
    return d


def _llama_scope(d):
    fx._write_llama_scope(d, "blocks.3.hook_resid_post", "blocks.3.hook_resid_post", 2.5, 2.5)
    return d


def _sparsify(d):
    fx._write_sparsify(d / "layers.3", fx._sparsify_cfg())
    return d / "layers.3"


def _dictionary_learning(d):
    architecture, _, make_state, _ = fx.DL_CASES["AutoEncoderTopK"]
    return fx._write_dl(d, fx._dl_config("AutoEncoderTopK", k=6), make_state())


WRITERS = {"gemma_scope": _gemma_scope, "gemma_scope_2": _gemma_scope_2, "llama_scope": _llama_scope,
           "sparsify": _sparsify, "dictionary_learning": _dictionary_learning}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_convert_round_trips_every_format(fmt, tmp_path, capsys):
    src = WRITERS[fmt](tmp_path / "src")
    src.mkdir(parents=True, exist_ok=True)
    main(["convert", str(src), str(tmp_path / "out")])
    assert "SAELens layout" in capsys.readouterr().out
    original = SAE.load_from_disk(src)
    converted = SAE.load_from_disk(tmp_path / "out", format="saelens")
    assert converted.cfg.to_dict() == original.cfg.to_dict()
    x = torch.randn(6, original.cfg.d_in)
    torch.testing.assert_close(converted.encode(x), original.encode(x), atol=0, rtol=0)
    torch.testing.assert_close(converted(x), original(x), atol=0, rtol=0)


def test_converted_foreign_sae_loads_in_saelens(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    src = _sparsify(tmp_path / "src")
    main(["convert", str(src), str(tmp_path / "out")])
    ours = SAE.load_from_disk(tmp_path / "out")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "out"))
    x = torch.randn(4, ours.cfg.d_in)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x))


def test_console_entry_point_and_errors(tmp_path):
    run = subprocess.run([sys.executable, "-m", "nnsae.cli", "convert", str(tmp_path / "missing"), str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "neither an existing directory nor RELEASE:SAE_ID" in run.stderr
    (tmp_path / "empty").mkdir()
    run = subprocess.run([sys.executable, "-m", "nnsae.cli", "convert", str(tmp_path / "empty"), str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "Could not detect the SAE format" in run.stderr and "Traceback" not in run.stderr


def test_list_shows_releases(capsys):
    main(["list", "gpt2-small-res-jb"])
    assert "jbloom/GPT2-Small-SAEs-Reformatted" in capsys.readouterr().out
    main(["list", "--release", "gpt2-small-res-jb"])
    assert "blocks.8.hook_resid_pre" in capsys.readouterr().out.split()


def test_train_then_eval_from_the_command_line(tmp_path, capsys):
    from tests.test_harvest import TEXTS
    from tests.tiny_models import tiny_model, tiny_tokenizer

    model_dir, data = tmp_path / "tiny-llama", tmp_path / "data.jsonl"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data.write_text("\n".join(f'{{"text": "{t}"}}' for t in TEXTS * 4))
    main(["train", "--model", str(model_dir), "--hook", "model.layers.1", "--hook", "blocks.0.hook_resid_post",
          "--dataset", str(data), "--context-size", "32", "--arch", "topk", "--k", "4", "--expansion", "2",
          "--tokens", "2048", "--batch-size-tokens", "256", "--out", str(tmp_path / "runs")])
    written = [line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.startswith("Wrote")]
    assert len(written) == 2
    sae = SAE.load_from_disk(written[0])
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 4 and sae.cfg.d_sae == 128
    assert sae.cfg.metadata.hf_hook_name == "model.layers.1.output" and sae.cfg.metadata.context_size == 32
    main(["eval", "--model", str(model_dir), "--sae", written[0], "--sae", written[1], "--dataset", str(data),
          "--tokens", "512", "--ce-tokens", "256", "--out", str(tmp_path / "eval.json")])
    out = capsys.readouterr().out
    assert "CE loss score" in out and (tmp_path / "eval.json").exists()
    main(["extract", "--model", str(model_dir), "--sae", written[0], "--dataset", str(data), "--context-size", "32",
          "--tokens", "256", "--top-k", "3", "--out", str(tmp_path / "feats")])
    from nnsae import load_features

    table = load_features(tmp_path / "feats", format="table")
    assert table.num_rows >= 256 and max(len(v) for v in table.column(table.column_names[-1]).to_pylist()) == 3
