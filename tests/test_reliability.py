"""Bad input, faults and interruption, tried as a hostile user would (issue #22).

Every anticipated failure is one line naming the file or argument and the fix (on the command line: exit code 1 or
2, one `error:` line, no traceback); nothing half-done is left attached or written; interrupted jobs resume to the
bytes of an uninterrupted run. The tables below are the probes; each row is one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file

import nnsae
from nnsae import SAE, SAEConfig
from nnsae.cli import main
from nnsae.training import TrainConfig, train
from tests.tiny_models import tiny_model, tiny_tokenizer, tiny_tokens

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"Doc {i}: " + ["The quick brown fox jumps over the lazy dog. " * 2, "Pack my box with five dozen jugs.",
                         "How vexingly quick daft zebras jump! " * 3][i % 3] for i in range(24)]


def make_sae(d_in: int = 64, d_sae: int = 32, architecture: str = "topk", hook: str = "blocks.1.hook_resid_post",
             seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    extra = {"k": 4} if "topk" in architecture else {}
    sae = SAE.from_config(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, **extra,
                                    metadata={"hook_name": hook, "model_name": "tiny-llama"}))
    with torch.no_grad():
        (sae.b_enc if hasattr(sae, "b_enc") else sae.b_gate).normal_(0, 0.2)
    return sae


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("reliability")
    model_dir = d / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = d / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    empty = d / "empty.jsonl"
    empty.write_text("")
    short = d / "short.jsonl"
    short.write_text(json.dumps({"text": "hi"}))
    make_sae().save_model(d / "sae")
    make_sae(d_in=32, d_sae=16, architecture="standard").save_model(d / "sae32")
    bad_cfg = d / "bad-cfg"
    make_sae().save_model(bad_cfg)
    cfg = json.loads((bad_cfg / "cfg.json").read_text())
    (bad_cfg / "cfg.json").write_text(json.dumps(dict(cfg, apply_b_dec_to_input="no")))
    return SimpleNamespace(dir=d, model=model_dir, data=data, empty=empty, short=short, sae=d / "sae",
                           sae32=d / "sae32", bad_cfg=bad_cfg)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str], str]:
    """(exit code, the `error:` lines on stderr, all stderr) of `nnsae ARGV` run in this process; an exception other
    than SystemExit (a traceback for the user) fails the test."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):  # SystemExit("error: ..."): Python prints it and exits with 1
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = e.code or 0
    err = capsys.readouterr().err
    return code, [line for line in re.split(r"[\r\n]", err) if "error:" in line], err


# ---- the command line: one row per bad input --------------------------------------------------------------------

M = lambda e: ["--model", str(e.model)]  # noqa: E731
DATA = lambda e: ["--dataset", str(e.data), "--context-size", "16"]  # noqa: E731
TRAIN = lambda e: ["train", *M(e), "--hook", "model.layers.1", "--tokens", "512", "--batch-size-tokens", "64"]  # noqa


def _foreign(e: SimpleNamespace) -> Path:
    folder = e.dir / "foreign"
    folder.mkdir(exist_ok=True)
    (folder / "notes.txt").write_text("mine")
    return folder


# (id, argv from env, exit code, text the error line must hold)
CLI_CASES: list[tuple[str, Callable[[SimpleNamespace], list[str]], int, str]] = [
    ("train on an empty dataset", lambda e: [*TRAIN(e), "--dataset", str(e.empty), "--context-size", "16",
                                             "--out", str(e.dir / "t-empty")], 1, "trained on 0 of 512 tokens"),
    ("train on a too-short dataset", lambda e: [*TRAIN(e), "--dataset", str(e.short), "--context-size", "16",
                                                "--out", str(e.dir / "t-short")], 1, "no activations"),
    ("train into a foreign folder", lambda e: [*TRAIN(e), *DATA(e), "--out", str(_foreign(e))], 1, "--overwrite"),
    ("train with a non-boolean", lambda e: [*TRAIN(e), *DATA(e), "--apply-b-dec-to-input", "ye", "--out",
                                            str(e.dir / "t-b")], 2, "--apply-b-dec-to-input"),
    ("train with a non-number", lambda e: [*TRAIN(e), *DATA(e), "--k", "abc", "--out", str(e.dir / "t-k")], 2,
     "--k"),
    ("train at an unknown hook", lambda e: ["train", *M(e), "--hook", "model.layers.99", *DATA(e), "--out",
                                            str(e.dir / "t-h")], 1, "model.layers.99"),
    ("train with a context larger than the model's", lambda e: [*TRAIN(e), "--dataset", str(e.data),
                                                                "--context-size", "100000", "--out",
                                                                str(e.dir / "t-c")], 1, "context_size=100000"),
    ("extract --tokens 0", lambda e: ["extract", *M(e), "--sae", str(e.sae), *DATA(e), "--tokens", "0", "--out",
                                      str(e.dir / "x0")], 2, "--tokens"),
    ("extract --tokens nan", lambda e: ["extract", *M(e), "--sae", str(e.sae), *DATA(e), "--tokens", "nan",
                                        "--out", str(e.dir / "x0")], 2, "--tokens"),
    ("extract --context-size 0", lambda e: ["extract", *M(e), "--sae", str(e.sae), "--dataset", str(e.data),
                                            "--context-size", "0", "--out", str(e.dir / "x0")], 1, "context_size"),
    ("extract an SAE of the wrong width", lambda e: ["extract", *M(e), "--sae", str(e.sae), "--sae", str(e.sae32),
                                                     *DATA(e), "--out", str(e.dir / "x0")], 1, "d_in=32"),
    ("train --name that is a path", lambda e: [*TRAIN(e), *DATA(e), "--name", "../escape", "--out",
                                               str(e.dir / "t0")], 1, "cannot be used as a file name"),
    ("train --tokens 0", lambda e: [*TRAIN(e), *DATA(e), "--tokens", "0", "--out", str(e.dir / "t0")], 1,
     "training_tokens"),
    ("train --lr nan", lambda e: [*TRAIN(e), *DATA(e), "--lr", "nan", "--out", str(e.dir / "t0")], 1, "lr"),
    ("train --arch unknown", lambda e: [*TRAIN(e), *DATA(e), "--arch", "foo", "--out", str(e.dir / "t0")], 1,
     "'foo'"),
    ("eval an SAE of the wrong width", lambda e: ["eval", *M(e), "--sae", str(e.sae32), *DATA(e), "--tokens", "64",
                                                  "--out", str(e.dir / "ev.json")], 1, "d_in=32"),
    ("convert --dtype int8", lambda e: ["convert", str(e.sae), str(e.dir / "c0"), "--dtype", "int8"], 1, "'int8'"),
    ("convert --format unknown", lambda e: ["convert", str(e.sae), str(e.dir / "c0"), "--format", "foo"], 1,
     "'foo'"),
    ("extract into a foreign folder", lambda e: ["extract", *M(e), "--sae", str(e.sae), *DATA(e), "--tokens", "64",
                                                 "--out", str(_foreign(e))], 1, "--overwrite"),
    ("extract with a malformed cfg.json", lambda e: ["extract", *M(e), "--sae", str(e.bad_cfg), *DATA(e),
                                                     "--out", str(e.dir / "x1")], 1, "apply_b_dec_to_input"),
    ("eval --tokens 0", lambda e: ["eval", *M(e), "--sae", str(e.sae), *DATA(e), "--tokens", "0"], 2, "--tokens"),
    ("eval --ce-tokens -1", lambda e: ["eval", *M(e), "--sae", str(e.sae), *DATA(e), "--ce-tokens", "-1"], 2,
     "--ce-tokens"),
    ("eval --context-size 0", lambda e: ["eval", *M(e), "--sae", str(e.sae), "--dataset", str(e.data),
                                         "--context-size", "0"], 1, "context_size"),
    ("eval --batch-size-prompts 0", lambda e: ["eval", *M(e), "--sae", str(e.sae), *DATA(e),
                                               "--batch-size-prompts", "0"], 1, "batch_size_prompts"),
    ("eval a missing SAE", lambda e: ["eval", *M(e), "--sae", str(e.dir / "nothing"), *DATA(e)], 1,
     str(Path("nothing"))),
    ("eval a missing dataset", lambda e: ["eval", *M(e), "--sae", str(e.sae), "--dataset",
                                          str(e.dir / "nope.jsonl"), "--context-size", "16", "--out",
                                          str(e.dir / "ev.json")], 1, "nope.jsonl"),
    ("--model /nonexistent", lambda e: ["eval", "--model", "/nonexistent", "--sae", str(e.sae), *DATA(e)], 1,
     "no model at /nonexistent"),
    ("--model ./relative-missing", lambda e: ["eval", "--model", "./relative-missing", "--sae", str(e.sae),
                                              *DATA(e)], 1, "no model at"),
    ("--model a folder without config.json", lambda e: ["extract", "--model", str(e.sae), "--sae", str(e.sae),
                                                        *DATA(e), "--out", str(e.dir / "x2")], 1, "config.json"),
    ("--device junk", lambda e: ["eval", *M(e), "--device", "gpu7", "--sae", str(e.sae), *DATA(e)], 1,
     "--device 'gpu7'"),
    ("dashboard into a foreign folder", lambda e: ["dashboard", *M(e), "--sae", str(e.sae), *DATA(e), "--tokens",
                                                   "64", "--quiet", "--out", str(_foreign(e))], 1, "--overwrite"),
    ("dashboard with a bad feature list", lambda e: ["dashboard", *M(e), "--sae", str(e.sae), *DATA(e),
                                                     "--tokens", "64", "--features", "x-3", "--quiet", "--out",
                                                     str(e.dir / "d1")], 1, "'x-3'"),
    ("dashboard --tokens 0", lambda e: ["dashboard", *M(e), "--sae", str(e.sae), "--tokens", "0", "--out",
                                        str(e.dir / "d2")], 2, "--tokens"),
    ("dashboard from a missing extraction", lambda e: ["dashboard", *M(e), "--sae", str(e.sae),
                                                       "--from-extraction", str(e.dir / "none"), "--quiet", "--out",
                                                       str(e.dir / "d3")], 1, "manifest.json"),
    ("convert a malformed cfg.json", lambda e: ["convert", str(e.bad_cfg), str(e.dir / "c1")], 1, "cfg.json"),
    ("convert into a non-empty folder", lambda e: ["convert", str(e.sae), str(_foreign(e))], 1, "--overwrite"),
    ("convert an empty folder", lambda e: ["convert", str(_foreign(e)), str(e.dir / "c2")], 1,
     "Could not detect"),
    ("list an unknown release", lambda e: ["list", "--release", "no-such-release"], 1, "no-such-release"),
]
if not torch.cuda.is_available():
    CLI_CASES.append(("--device cuda without CUDA", lambda e: ["eval", *M(e), "--device", "cuda", "--sae",
                                                               str(e.sae), *DATA(e)], 1, "CUDA is not available"))


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line(case, env, capsys, monkeypatch):
    name, argv, code, needle = case
    monkeypatch.chdir(env.dir)  # eval's default --out lands here, not in the repository
    foreign_before = sorted((env.dir / "foreign").iterdir()) if (env.dir / "foreign").exists() else None
    got_code, lines, err = run_cli(argv(env), capsys)
    assert got_code == code, err
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    if foreign_before is not None:  # a refused foreign folder is left exactly as it was
        assert sorted((env.dir / "foreign").iterdir()) == foreign_before
        assert (env.dir / "foreign" / "notes.txt").read_text() == "mine"


def test_debug_shows_the_traceback(env, capsys):
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        main(["--debug", "convert", str(env.bad_cfg), str(env.dir / "c3")])
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        main(["convert", str(env.bad_cfg), str(env.dir / "c3"), "--debug"])


def test_the_console_entry_point_prints_one_line(env):
    """The real process: exit status 1, one stderr line, no traceback."""
    run = subprocess.run([sys.executable, "-m", "nnsae.cli", "convert", str(env.bad_cfg), str(env.dir / "c4")],
                         capture_output=True, text=True, cwd=ROOT, env=_child_env())
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert [line for line in run.stderr.splitlines() if line.strip()] == [line for line in run.stderr.splitlines()
                                                                         if line.startswith("error:")]
    assert str(env.bad_cfg / "cfg.json") in run.stderr


def test_rerunning_a_complete_extraction_succeeds_and_overwrite_replaces(env, capsys):
    argv = ["extract", *M(env), "--sae", str(env.sae), *DATA(env), "--tokens", "64", "--out", str(env.dir / "x")]
    assert run_cli(argv, capsys)[0] == 0
    files = {p: p.read_bytes() for p in (env.dir / "x").rglob("*") if p.is_file() and p.name != ".lock"}
    assert run_cli(argv, capsys)[0] == 0  # again: nothing to do, no .lock complaint
    assert {p: p.read_bytes() for p in (env.dir / "x").rglob("*") if p.is_file() and p.name != ".lock"} == files
    other = ["extract", *M(env), "--sae", str(env.sae), *DATA(env), "--tokens", "32", "--out", str(env.dir / "x")]
    code, lines, _ = run_cli(other, capsys)
    assert code == 1 and "different settings" in lines[0] and "--overwrite" in lines[0]
    assert run_cli([*other, "--overwrite"], capsys)[0] == 0


# ---- the API: one row per bad input -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    return tiny_model("llama")


def _evaluate(hf, **kw):
    return nnsae.evaluate(hf, make_sae(), TEXTS, tokenizer=tiny_tokenizer(), progress=False,
                          **{"n_tokens": 64, "n_ce_tokens": 0, "context_size": 16, **kw})


API_CASES: list[tuple[str, Callable[[Any], Any], str]] = [
    ("evaluate n_tokens=0", lambda hf: _evaluate(hf, n_tokens=0), "n_tokens must be"),
    ("evaluate n_ce_tokens=-5", lambda hf: _evaluate(hf, n_ce_tokens=-5), "n_ce_tokens must be"),
    ("evaluate context_size=0", lambda hf: _evaluate(hf, context_size=0), "context_size must be"),
    ("evaluate on texts of only special tokens", lambda hf: nnsae.evaluate(
        hf, make_sae(), ["</s>" * 40], tokenizer=tiny_tokenizer(), context_size=8, n_tokens=8, n_ce_tokens=0,
        progress=False), "not a special token"),
    ("evaluate on too little text", lambda hf: nnsae.evaluate(
        hf, make_sae(), ["hi"], tokenizer=tiny_tokenizer(), context_size=16, n_tokens=16, progress=False),
     "no complete chunk"),
    ("extract n_tokens=0", lambda hf: nnsae.extract(hf, make_sae(), TEXTS, "/nonexistent/x", n_tokens=0,
                                                    tokenizer=tiny_tokenizer()), "n_tokens=0"),
    ("SAE input 0-D", lambda hf: make_sae()(torch.tensor(1.0)), "tensor of shape"),
    ("SAE input of the wrong width", lambda hf: make_sae().encode(torch.randn(2, 31)), "d_in=64"),
    ("decode of the wrong width", lambda hf: make_sae().decode(torch.randn(2, 31)), "d_sae=32"),
    ("SAE on the meta device", lambda hf: make_sae().to("meta")(torch.randn(2, 64)), "meta"),
    ("attach an SAE on the meta device", lambda hf: nnsae.attach(hf, make_sae().to("meta")), "meta device"),
    ("run_with_saes with an SAE on the meta device", lambda hf: nnsae.run_with_saes(
        hf, tiny_tokens(), saes=[make_sae().to("meta")]), "meta device"),
    ("run_with_saes on an empty token tensor", lambda hf: nnsae.run_with_saes(
        hf, torch.zeros(1, 0, dtype=torch.long), saes=[make_sae()]), "input is empty"),
    ("test_prompt with an empty prompt", lambda hf: nnsae.test_prompt(hf, "", "x", tokenizer=tiny_tokenizer(),
                                                                       print_details=False), "prompt is empty"),
    ("steer a feature out of range", lambda hf: nnsae.steer(hf, make_sae(), 999), "feature indices"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_is_a_clear_error(case, hf):
    name, call, needle = case
    with pytest.raises(ValueError, match=re.escape(needle)):
        call(hf)
    assert nnsae.attached(hf) == []  # nothing left behind


@pytest.mark.parametrize("architecture", ["standard", "topk", "abstopk", "jumprelu", "gated"])
@pytest.mark.parametrize("grad", [False, True])
def test_an_empty_batch_gives_an_empty_output(architecture, grad):
    sae = make_sae(architecture=architecture)
    x = torch.randn(0, 64)
    with torch.set_grad_enabled(grad):
        features, out = sae.encode(x), sae(x)
    assert features.shape == (0, 32) and out.shape == (0, 64)
    assert sae(torch.randn(2, 0, 64)).shape == (2, 0, 64)


# ---- attach: all or nothing -------------------------------------------------------------------------------------


def test_a_failing_sae_leaves_nothing_attached_and_the_model_untouched(hf):
    tokens = tiny_tokens()
    with torch.no_grad():
        clean = hf(tokens).logits
    ok, bad = make_sae(), make_sae(d_in=32)
    earlier = make_sae(seed=1)
    handle = nnsae.attach(hf, earlier)  # an SAE the caller attached before: must survive, at its place
    with torch.no_grad():
        with_earlier = hf(tokens).logits
    assert not torch.equal(with_earlier, clean)
    calls: list[Callable[[], Any]] = [
        lambda: nnsae.run_with_saes(hf, tokens, saes=[ok, bad]),
        lambda: nnsae.run_with_saes(hf, tokens, saes=[ok, bad], reset_saes_end=False),
        lambda: nnsae.run_with_cache_with_saes(hf, tokens, saes=[ok, bad]),
        lambda: nnsae.run_with_hooks_with_saes(hf, tokens, saes=[ok, bad], fwd_hooks=[]),
    ]

    def context(reset: bool) -> None:
        with nnsae.saes(hf, [ok, bad], reset_saes_end=reset):
            raise AssertionError("the block must not run")

    calls += [lambda: context(True), lambda: context(False)]
    for call in calls:
        with pytest.raises(ValueError, match="d_in=32"):
            call()
        assert nnsae.attached(hf) == [handle] and handle.attached
        with torch.no_grad():
            assert torch.equal(hf(tokens).logits, with_earlier)
    handle.detach()
    with torch.no_grad():
        assert torch.equal(hf(tokens).logits, clean)


def test_the_same_sae_twice_at_one_hook_is_refused(hf):
    sae = make_sae()
    handle = nnsae.attach(hf, sae)
    try:
        with pytest.raises(ValueError, match="already attached.*apply it twice"):
            nnsae.attach(hf, sae, stack=True)
        assert nnsae.attached(hf) == [handle]
        twin = nnsae.attach(hf, copy.deepcopy(sae), stack=True)  # a copy chains on purpose
        assert len(nnsae.attached(hf)) == 2
        twin.detach()
        assert nnsae.attach(hf, sae).attached  # stack=False replaces: allowed
        assert len(nnsae.attached(hf)) == 1
    finally:
        nnsae.detach(hf)


# ---- files: malformed, truncated, corrupted ---------------------------------------------------------------------

CFG_CASES: list[tuple[str, Any, str]] = [
    ("apply_b_dec_to_input 'no'", lambda c: dict(c, apply_b_dec_to_input="no"), "'apply_b_dec_to_input'"),
    ("rescale_acts_by_decoder_norm 'false'", lambda c: dict(c, rescale_acts_by_decoder_norm="false"),
     "'rescale_acts_by_decoder_norm'"),
    ("a list", lambda c: [c], "JSON object"),
    ("null", lambda c: None, "JSON object"),
    ("d_in a string", lambda c: dict(c, d_in="64"), "'d_in'"),
    ("d_sae a bool", lambda c: dict(c, d_sae=True), "'d_sae'"),
    ("k a string", lambda c: dict(c, k="4"), "'k'"),
    ("metadata a list", lambda c: dict(c, metadata=[1]), "'metadata'"),
    ("architecture a number", lambda c: dict(c, architecture=3), "'architecture'"),
    ("normalize_activations a list", lambda c: dict(c, normalize_activations=[]), "'normalize_activations'"),
    ("d_in missing", lambda c: {k: v for k, v in c.items() if k != "d_in"}, "d_in"),
    ("dtype a number", lambda c: dict(c, dtype=5), "dtype"),
]


@pytest.mark.parametrize("case", CFG_CASES, ids=[c[0] for c in CFG_CASES])
def test_a_malformed_cfg_json_names_the_file_and_key(case, tmp_path):
    name, mutate, key = case
    make_sae().save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(mutate(cfg)))
    with pytest.raises(ValueError) as info:
        SAE.load_from_disk(tmp_path)
    assert str(tmp_path / "cfg.json") in str(info.value) and key in str(info.value)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", b'{"d_in": 64,', b""])
def test_an_unreadable_cfg_json_names_the_file(content, tmp_path):
    make_sae().save_model(tmp_path)
    (tmp_path / "cfg.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "cfg.json"))):
        SAE.load_from_disk(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_integer_weights_are_refused(dtype, tmp_path):
    sae = make_sae()
    sae.save_model(tmp_path)
    save_file({k: v.to(dtype) for k, v in sae.state_dict().items()}, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=f"{tmp_path}.*must be floating point"):
        SAE.load_from_disk(tmp_path)


def test_truncated_weights_name_the_file(tmp_path):
    make_sae().save_model(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match=re.escape(str(weights))):
        SAE.load_from_disk(tmp_path)


def _interrupted_training(out: Path) -> Path:
    """A run stopped by SIGTERM part-way (one checkpoint); returns the checkpoint folder."""
    from tests.test_train_resume import SignallingStore, make_configs

    with pytest.raises(nnsae.training.TrainingInterrupted):
        train(None, make_configs(), SignallingStore(at=13), out, progress=False)
    (checkpoint,) = (out / "checkpoints").iterdir()
    return checkpoint


@pytest.mark.parametrize("pattern", ["state.safetensors", "*.weights.safetensors", "*.optimizer.pt", "state.json"])
def test_a_truncated_checkpoint_file_is_named_on_resume(pattern, tmp_path):
    from tests.test_train_resume import SlowStore, make_configs

    checkpoint = _interrupted_training(tmp_path)
    victim = sorted(checkpoint.glob(pattern))[0]
    victim.write_bytes(victim.read_bytes()[: max(victim.stat().st_size // 2, 1)])
    with pytest.raises(ValueError) as info:
        train(None, make_configs(), SlowStore(), tmp_path, resume=True, progress=False)
    assert str(victim) in str(info.value)


def _extraction(out: Path, hf, **kw) -> Path:
    return nnsae.extract(hf, make_sae(), TEXTS, out, tokenizer=tiny_tokenizer(), context_size=16,
                         batch_size_prompts=2, shard_tokens=64, progress=False, **{"n_tokens": 256, **kw})


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_corrupted_shard_or_statistics_file_is_refused(tmp_path, hf):
    out = _extraction(tmp_path / "x", hf)
    shard = sorted((out / "shards").iterdir())[0]
    _flip_a_byte(shard)  # same size, other bytes
    with pytest.raises(ValueError, match=re.escape(str(shard))):
        nnsae.load_features(out, format="table")
    with pytest.raises(ValueError, match=re.escape(str(shard))):
        _extraction(tmp_path / "x", hf)  # resume
    with pytest.raises(ValueError, match=re.escape(str(shard))):
        nnsae.dashboard(None, None, out=tmp_path / "site", from_extraction=out, tokenizer=tiny_tokenizer(),
                        progress=False)
    assert not (tmp_path / "site").exists()
    out = _extraction(tmp_path / "y", hf)
    (name,) = [p.stem for p in (out / "stats").glob("*.safetensors")]
    _flip_a_byte(out / "stats" / f"{name}.safetensors")
    with pytest.raises(ValueError, match="sha256"):
        nnsae.load_feature_stats(out, name)


def test_a_truncated_statistics_state_is_named_on_resume(tmp_path, hf):
    out = _extraction(tmp_path / "x", hf, n_tokens=64)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False  # as if killed before the last commit
    (out / "manifest.json").write_text(json.dumps(manifest))
    (state,) = [out / f for f in manifest["stats_state"]["files"].values()]
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(str(state))):
        _extraction(tmp_path / "x", hf, n_tokens=64)


MANIFEST_DAMAGE: list[tuple[str, Callable[[dict], Any]]] = [
    ("a list", lambda m: [m]),
    ("no saes", lambda m: {k: v for k, v in m.items() if k != "saes"}),
    ("saes a number", lambda m: dict(m, saes=3)),
    ("a shard entry a number", lambda m: dict(m, shards=[1])),
    ("a shard's bytes a string", lambda m: dict(m, shards=[dict(m["shards"][0], bytes="12")])),
    ("no settings", lambda m: {k: v for k, v in m.items() if k != "settings"}),
    ("stats_state files a list", lambda m: dict(m, stats_state=dict(m["stats_state"], files=[]))),
]


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE, ids=[d[0] for d in MANIFEST_DAMAGE])
def test_a_damaged_extraction_manifest_is_one_error_naming_it(damage, tmp_path, hf):
    out = _extraction(tmp_path / "x", hf, n_tokens=64)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(damage[1](manifest)))
    for call in (lambda: nnsae.load_features(out, format="table"), lambda: _extraction(out, hf, n_tokens=64),
                 lambda: nnsae.dashboard(None, None, out=tmp_path / "site", from_extraction=out,
                                         tokenizer=tiny_tokenizer(), progress=False)):
        with pytest.raises(ValueError, match=re.escape(str(out / "manifest.json"))):
            call()
    assert not (tmp_path / "site").exists()
    _extraction(out, hf, n_tokens=64, overwrite=True)  # told to: starts again
    assert nnsae.load_features(out, format="table").num_rows == 64


@pytest.mark.parametrize("record", [[], "text", 3])
def test_a_run_json_that_is_not_a_record_is_named(record, tmp_path):
    from tests.test_train_resume import SlowStore, make_configs

    train(None, make_configs()[:1], SlowStore(), tmp_path, progress=False)
    (tmp_path / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "run.json"))):
        train(None, make_configs()[:1], SlowStore(), tmp_path, resume=True, progress=False)


# ---- output folders: ownership and names ------------------------------------------------------------------------


def test_resuming_an_extraction_keeps_files_it_did_not_write(tmp_path, hf):
    out = _extraction(tmp_path / "x", hf, n_tokens=64)
    mine = {out / "notes.txt": "a", out / "shards" / "notes.txt": "b", out / "stats" / "mine.json": "c",
            out / "shards" / "shard-1.parquet": "d"}
    for path, text in mine.items():
        path.write_text(text)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))  # as if killed at the end
    _extraction(tmp_path / "x", hf, n_tokens=64)
    assert {path: path.read_text() for path in mine} == mine


def test_train_resume_with_another_model_data_or_context_is_refused(env, tmp_path, capsys):
    base = [*TRAIN(env), "--tokens", "256", "--out", str(tmp_path / "t")]
    assert run_cli([*base, *DATA(env)], capsys)[0] == 0
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(json.dumps({"text": "Something else entirely. " * 20}))
    other_model = tmp_path / "other-model"
    tiny_model("llama", seed=1).save_pretrained(other_model)
    tiny_tokenizer().save_pretrained(other_model)
    for change, needle in ((["--dataset", str(other_data), "--context-size", "16"], "dataset"),
                           ([*DATA(env)[:2], "--context-size", "8"], "context_size"),
                           ([*DATA(env), "--model", str(other_model)], "model")):
        code, lines, err = run_cli([*base, *change, "--resume"], capsys)
        assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
        assert "different" in lines[0] and needle in lines[0], lines[0]


def test_dashboard_never_touches_a_foreign_folder_unless_told(tmp_path, hf):
    out = tmp_path / "site"
    out.mkdir()
    (out / "index.html").write_text("my own page")
    kwargs = dict(dataset=TEXTS, out=out, features="0-3", n_tokens=64, tokenizer=tiny_tokenizer(), context_size=16,
                  progress=False)
    with pytest.raises(ValueError, match="not empty"):
        nnsae.dashboard(hf, make_sae(), **kwargs)
    assert sorted(p.name for p in out.iterdir()) == ["index.html"] and (out / "index.html").read_text() == \
        "my own page"
    nnsae.dashboard(hf, make_sae(), **kwargs, overwrite=True)  # told to: it writes its files
    assert (out / "index.html").read_text() != "my own page"
    nnsae.dashboard(hf, make_sae(), **kwargs)  # its own folder now: rebuilt without overwrite
    assert (out / "features" / "3.html").is_file()


def test_a_hostile_manifest_name_writes_nothing_outside(tmp_path, hf):
    out = _extraction(tmp_path / "x", hf)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["saes"][0]["name"] = "../../escaped"
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = sorted(tmp_path.rglob("*"))
    for call in (lambda: nnsae.dashboard(None, None, out=tmp_path / "site", from_extraction=out,
                                         tokenizer=tiny_tokenizer(), progress=False),
                 lambda: nnsae.load_feature_stats(out, "../../escaped")):
        with pytest.raises(ValueError, match="cannot be used as a file name"):
            call()
    assert sorted(tmp_path.rglob("*")) == before


# ---- interruption: SIGKILL / SIGTERM at random points, then the same command -----------------------------------


def _child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", NNSAE_NATIVE="0")


def _cli(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nnsae.cli", *argv], cwd=ROOT, env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _run_to_end(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnsae.cli", *argv], cwd=ROOT, env=_child_env(),
                          capture_output=True, text=True, timeout=300)


def _in_process(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`nnsae ARGV` in this process, set up as `_cli`'s children are (one thread, no native kernels), so its files
    compare byte for byte with theirs; saves a process start."""
    from nnsae.harvest import KEEP_FREED_HEAP_ENV

    monkeypatch.setenv("NNSAE_NATIVE", "0")
    monkeypatch.setenv(KEEP_FREED_HEAP_ENV, os.environ.get(KEEP_FREED_HEAP_ENV, "0"))  # main() sets it otherwise
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(argv)
    finally:
        torch.set_num_threads(threads)


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], extra: float, timeout: float = 120) -> bool:
    """SIGKILL `proc` `extra` seconds after `ready()` holds; False if it ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    time.sleep(extra)
    if proc.poll() is not None:
        return False
    proc.kill()
    proc.wait(timeout=30)
    return True


def _same_output(a: Path, b: Path) -> bool:
    """The same files with the same bytes, once each folder's own path (dashboards record their extraction's) is
    replaced by a placeholder."""
    fa, fb = _files(a), _files(b)
    return fa.keys() == fb.keys() and all(fa[k].replace(str(a).encode(), b"@") == fb[k].replace(str(b).encode(), b"@")
                                          for k in fa)


@pytest.mark.parametrize("command", ["extract", "dashboard"])
def test_sigkill_at_random_points_then_rerun_gives_the_uninterrupted_bytes(command, env, tmp_path, monkeypatch):
    rng = torch.Generator().manual_seed(22)

    def argv(out: Path) -> list[str]:
        common = [*M(env), "--sae", str(env.sae), "--dataset", str(env.data), "--context-size", "16", "--device",
                  "cpu", "--out", str(out)]
        if command == "extract":
            return ["extract", *common, "--batch-size-prompts", "1", "--top-k", "4", "--tokens", "960"]
        return ["dashboard", *common, "--batch-size", "1", "--tokens", "320", "--quiet"]  # default: all 32

    _in_process(argv(tmp_path / "reference"), monkeypatch)
    out = tmp_path / "killed"
    kills = 0
    for _ in range(2):
        proc = _cli(argv(out))
        extra = float(torch.rand(1, generator=rng)) * 0.5
        kills += _kill_when(proc, lambda: (out / ".lock").exists() or (out / "extraction" / ".lock").exists(), extra)
        proc.wait(timeout=300)
    rerun = _run_to_end(argv(out))
    assert rerun.returncode == 0, rerun.stderr
    assert kills >= 1
    assert not [p for p in out.rglob(".tmp-*")]
    assert _same_output(out, tmp_path / "reference")
    if command == "dashboard":
        assert len(list((out / "features").glob("*.html"))) == 32


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["TERM", "INT", "KILL"])
def test_cli_training_stopped_then_resumed_matches_an_uninterrupted_run(sig, env, tmp_path, training_reference):
    """SIGTERM/SIGINT: one line telling the user to pass --resume (no traceback, no `train(...)`); SIGKILL after a
    checkpoint: nothing said. Either way `--resume` ends with the uninterrupted run's bytes."""
    out = tmp_path / "run"
    proc = _cli(_train_argv(env, out))
    deadline = time.monotonic() + 120
    while not list(out.glob("checkpoints/step-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err
        assert "Traceback" not in err and "train(" not in err
        assert "--resume" in [line for line in err.splitlines() if "interrupted" in line][0]
    resumed = _run_to_end([*_train_argv(env, out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    (name,) = [p.name for p in training_reference.iterdir() if (p / "cfg.json").is_file()]
    for file in ("sae_weights.safetensors", "sparsity.safetensors", "cfg.json"):
        assert (out / name / file).read_bytes() == (training_reference / name / file).read_bytes()


def _train_argv(env: SimpleNamespace, out: Path) -> list[str]:
    return ["train", *M(env), "--hook", "model.layers.1", "--dataset", str(env.data), "--context-size", "16",
            "--tokens", "20000", "--batch-size-tokens", "32", "--arch", "topk", "--k", "4", "--expansion", "2",
            "--checkpoint-every-tokens", "640", "--device", "cpu", "--out", str(out)]


@pytest.fixture(scope="module")
def training_reference(env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run = _run_to_end(_train_argv(env, out))
    assert run.returncode == 0, run.stderr
    return out


def test_eval_killed_leaves_no_partial_file_and_reruns(env, tmp_path):
    target = tmp_path / "eval.json"
    argv = ["eval", *M(env), "--sae", str(env.sae), *DATA(env), "--tokens", "2000", "--ce-tokens", "500",
            "--device", "cpu", "--out", str(target)]
    proc = _cli(argv)
    time.sleep(3)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)
    assert not target.exists() or json.loads(target.read_text())  # absent, or whole
    assert not list(tmp_path.glob(".tmp-*"))
    assert _run_to_end(argv).returncode == 0
    first = json.loads(target.read_text())
    assert _run_to_end(argv).returncode == 0
    assert json.loads(target.read_text())["metrics"] == first["metrics"]  # deterministic, whole


def test_concurrent_starts_one_runs_the_other_is_told(env, tmp_path, monkeypatch):
    out = tmp_path / "x"
    argv = ["extract", *M(env), "--sae", str(env.sae), *DATA(env), "--batch-size-prompts", "1", "--tokens", "640",
            "--device", "cpu", "--out", str(out)]
    procs = [_cli(argv) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for code, err in results:
        assert "Traceback" not in err, err
        assert code == 0 or (code == 1 and "is in use" in [line for line in err.splitlines()
                                                           if line.startswith("error:")][0]), err
    assert any(code == 0 for code, _ in results)
    _in_process([*argv[:-1], str(tmp_path / "reference")], monkeypatch)
    assert _same_output(out, tmp_path / "reference")


@pytest.mark.parametrize("command", ["train", "extract", "dashboard"])
def test_a_busy_output_folder_is_one_line(command, env, tmp_path, capsys):
    """Another job holds the folder's lock (a second open file description conflicts even in this process)."""
    from nnsae.rundir import locked

    out = tmp_path / "busy"
    argv = {"train": [*TRAIN(env), *DATA(env), "--out", str(out)],
            "extract": ["extract", *M(env), "--sae", str(env.sae), *DATA(env), "--tokens", "64", "--out", str(out)],
            "dashboard": ["dashboard", *M(env), "--sae", str(env.sae), *DATA(env), "--tokens", "64", "--quiet",
                          "--out", str(out)]}[command]
    with locked(out, "another job"):
        code, lines, err = run_cli(argv, capsys)
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "is in use" in lines[0] and "another job" in lines[0], lines[0]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written beside the lock


def test_evaluate_out_folder_writes_one_file_per_sae_even_on_one_hook(tmp_path, hf):
    saes = [make_sae(d_sae=32), make_sae(d_sae=48, seed=1)]  # two widths on one hook: the usual comparison
    records = nnsae.evaluate(hf, saes, TEXTS, tokenizer=tiny_tokenizer(), context_size=16, n_tokens=64,
                             n_ce_tokens=0, out=tmp_path / "evals", progress=False)
    files = sorted((tmp_path / "evals").glob("*.json"))
    assert len(files) == 2
    assert sorted(json.loads(f.read_text())["sae_cfg"]["d_sae"] for f in files) == [32, 48]
    assert [r["sae_cfg"]["d_sae"] for r in records] == [32, 48]


# ---- read-only and full disks (tmpfs; tests run as root) --------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip() or 'mount failed'}): needs root in a "
                    "container that allows mounts")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_outputs_fail_before_any_compute(env, tmp_path, capsys, monkeypatch, hf):
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        def no_compute(*args, **kwargs):
            raise AssertionError("computed before checking the output directory")

        monkeypatch.setattr(nnsae.evals, "Harvester", no_compute)
        with pytest.raises(PermissionError, match=re.escape(str(ro))):
            nnsae.evaluate(hf, make_sae(), TEXTS, tokenizer=tiny_tokenizer(), context_size=16, n_tokens=64,
                           out=ro / "eval.json", progress=False)
        monkeypatch.undo()
        for argv in (["eval", *M(env), "--sae", str(env.sae), *DATA(env), "--tokens", "64", "--out",
                      str(ro / "e.json")],
                     ["extract", *M(env), "--sae", str(env.sae), *DATA(env), "--tokens", "64", "--out", str(ro / "x")],
                     [*TRAIN(env), *DATA(env), "--out", str(ro / "t")],
                     ["dashboard", *M(env), "--sae", str(env.sae), *DATA(env), "--tokens", "64", "--quiet", "--out",
                      str(ro / "d")],
                     ["convert", str(env.sae), str(ro / "c")]):
            code, lines, err = run_cli(argv, capsys)
            assert code == 1 and len(lines) == 1 and "Traceback" not in err, (argv[0], err)
            assert str(ro) in lines[0] or "Read-only" in lines[0], (argv[0], lines[0])


def test_a_full_disk_is_one_line_and_leaves_no_temp_files(env, tmp_path, capsys):
    make_sae(d_sae=512).save_model(tmp_path / "wide")  # 256 kB of weights
    with _tmpfs(tmp_path / "full", "size=64k") as full:
        for argv in (["extract", *M(env), "--sae", str(env.sae), *DATA(env), "--out", str(full / "x")],
                     ["convert", str(tmp_path / "wide"), str(full / "c")]):
            code, lines, err = run_cli(argv, capsys)
            assert code == 1 and len(lines) == 1 and "Traceback" not in err, (argv[0], err)
            assert "No space left" in lines[0], lines[0]
            assert not list(full.rglob(".tmp-*"))
