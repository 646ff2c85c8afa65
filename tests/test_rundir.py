"""The run-directory module: atomic files under a crash, the lock across processes, identity messages, names."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nnsae import rundir
from nnsae.rundir import (IdentityMismatch, RunLocked, atomic_write, check_identity, child_path, claim, locked,
                          safe_name, unique_names, write_json, write_safetensors)
from nnsae.training import TrainConfig, train
from tests.test_train_store import FakeStore


def _crash_on_replace(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """Make `os.replace` onto a file named `target` fail as a crash at that moment would."""
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == target:
            raise OSError(5, "simulated crash")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_atomic_write_leaves_the_old_or_the_new_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "record.json"
    write_json(path, {"version": 1})
    assert json.loads(path.read_text()) == {"version": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~rundir._umask()  # open()'s mode, not mkstemp's 0600
    _crash_on_replace(monkeypatch, "record.json")
    with pytest.raises(OSError, match="simulated crash"):
        write_json(path, {"version": 2})
    assert json.loads(path.read_text()) == {"version": 1}  # the old file, whole
    with pytest.raises(OSError, match="simulated crash"):
        write_safetensors(tmp_path / "record.json", {"x": torch.ones(2)})
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["record.json"]  # no temp file left
    monkeypatch.undo()
    write_safetensors(tmp_path / "w.safetensors", {"x": torch.arange(3.0)})
    assert torch.equal(load_file(tmp_path / "w.safetensors")["x"], torch.arange(3.0))

    def failing_writer(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, failing_writer)
    assert json.loads(path.read_text()) == {"version": 1}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["record.json"]


_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from nnsae.rundir import locked
    with locked(Path(sys.argv[1]), "a test job"):
        print("locked", flush=True)
        if sys.argv[2] == "hold":
            time.sleep(120)
""")


def _holder(directory: Path, mode: str) -> subprocess.Popen:
    root = str(Path(__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(directory), mode], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_process_and_a_lock_file_left_behind_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    proc = _holder(run_dir, "hold")
    try:
        with pytest.raises(RunLocked) as info:
            with locked(run_dir, "another job"):
                pytest.fail("the lock was taken twice")
        assert str(info.value) == (f"{run_dir} is in use: a test job (pid {proc.pid} on {os.uname().nodename}) "
                                   f"holds {run_dir}/.lock. Wait for it to finish or use another output directory.")
        assert "\n" not in str(info.value)
    finally:
        proc.kill()  # SIGKILL: the OS releases the lock, the file stays
        proc.wait()
    assert (run_dir / ".lock").exists()
    with locked(run_dir, "the next job"):
        assert "the next job" in (run_dir / ".lock").read_text()
    _holder(run_dir, "exit").wait()  # a job that finished normally
    with locked(run_dir, "after a finished job"):
        pass


def test_lock_follows_a_lock_file_replaced_while_waiting(tmp_path, monkeypatch):
    """A contender that opened the lock file just before a winner's cleanup removed it must not lock the removed
    file (two holders): it locks the file that is there now."""
    real_open, calls = os.open, []

    def open_then_remove(path, flags, *mode):
        fd = real_open(path, flags, *mode)
        if str(path).endswith(".lock") and not calls:
            calls.append(path)
            os.unlink(path)  # removed between our open and our flock
        return fd

    monkeypatch.setattr(os, "open", open_then_remove)
    with locked(tmp_path, "job"):
        assert len(calls) == 1 and (tmp_path / ".lock").read_text().startswith("job (pid")


def test_identity_mismatch_lists_the_differing_keys():
    old = {"model": "a" * 64, "settings": {"context_size": 128, "top_k": 5, "gone": 1}, "texts": ["x" * 100]}
    new = {"model": "b" * 64, "settings": {"context_size": 256, "top_k": 5, "added": [1, 2]}, "texts": ["y" * 100]}
    check_identity(Path("run"), old, json.loads(json.dumps(old)), "a job", "fix")  # equal: no error
    with pytest.raises(IdentityMismatch) as info:
        check_identity(Path("out/run"), old, new, "a training run", "Use another --out, or overwrite=True.")
    assert str(info.value) == (
        "out/run holds a training run with different settings:\n"
        "  model: aaaaaaaaaaaa… → bbbbbbbbbbbb…\n"
        "  settings.added (only in the new call)\n"
        "  settings.context_size: 128 → 256\n"
        "  settings.gone (only in the existing run)\n"
        f"  texts: [\"{'x' * 57}… → [\"{'y' * 57}…\n"
        "Use another --out, or overwrite=True.")
    assert isinstance(info.value, ValueError)
    # Tuples and lists are the same once recorded as JSON.
    check_identity(Path("run"), {"hooks": ["a", "b"]}, {"hooks": ("a", "b")}, "a job", "fix")


@pytest.mark.parametrize("name", ["..", ".", "", "../escaped", "a/b", "a\\b", "/etc", ".hidden", "x\0y", "é" * 200])
def test_safe_name_rejects_hostile_names(name, tmp_path):
    with pytest.raises(ValueError, match="cannot be used as a file name"):
        safe_name(name)
    with pytest.raises(ValueError):
        child_path(tmp_path, "ok", name)


def test_names_and_paths_that_are_fine():
    assert safe_name("blocks.1.hook_resid_post") == "blocks.1.hook_resid_post"
    assert child_path(Path("out"), "stats", "sae.json") == Path("out/stats/sae.json")
    assert unique_names(["blocks.1.hook_resid_post", "blocks.1.hook_resid_post", "gpt2/0-res/1", None, "..", "a"]) == [
        "blocks.1.hook_resid_post", "blocks.1.hook_resid_post_2", "gpt2_0-res_1", "sae_3", "sae_4", "a"]


def test_claim_refuses_a_foreign_directory_unless_overwriting(tmp_path):
    assert claim(tmp_path / "new", "run.json", "a run") is False
    (tmp_path / ".lock").touch()
    (tmp_path / ".tmp-run.json.x.tmp").touch()
    assert claim(tmp_path, "run.json", "a run") is False  # only our own lock and temp files: still empty
    (tmp_path / "notes.txt").write_text("user's")
    with pytest.raises(ValueError, match=r"is not empty and holds no run.json: refusing to write a run into it "
                                         r"\(found \['notes.txt'\]\).*overwrite=True"):
        claim(tmp_path, "run.json", "a run")
    assert claim(tmp_path, "run.json", "a run", overwrite=True) is False
    (tmp_path / "run.json").write_text("{}")
    assert claim(tmp_path, "run.json", "a run") is True


def test_run_json_is_written_atomically(tmp_path, monkeypatch):
    """A crash while the finished run's run.json replaces the running one leaves the running one, whole: the run
    can be resumed to completion."""
    cfg = TrainConfig(architecture="topk", d_sae=48, k=3, training_tokens=64 * 4)
    real = rundir.write_json

    def crash_on_completion(path, data, indent=2):
        if path.name == "run.json" and data.get("complete"):
            _crash_on_replace(monkeypatch, "run.json")
        return real(path, data, indent)

    monkeypatch.setattr("nnsae.training.trainer.write_json", crash_on_completion)
    with pytest.raises(OSError, match="simulated crash"):
        train(None, cfg, FakeStore(batch_size_tokens=64), tmp_path, progress=False)
    monkeypatch.undo()
    record = json.loads((tmp_path / "run.json").read_text())
    assert "complete" not in record and set(record["saes"]) == {"blocks.0.hook_resid_post-topk-48-k3"}
    assert not list(tmp_path.glob(".tmp-*"))
    train(None, cfg, FakeStore(batch_size_tokens=64), tmp_path, resume=True, progress=False)
    assert json.loads((tmp_path / "run.json").read_text())["complete"]
