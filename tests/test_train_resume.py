"""Kill-and-resume: a run killed with SIGKILL (or stopped by SIGTERM) and resumed ends with exactly the weights,
statistics and metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nnsae.training import TrainConfig, TrainingInterrupted, train
from tests.test_train_store import FakeStore

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
CHECKPOINT_EVERY = BATCH * 5


class SlowStore(FakeStore):
    """FakeStore whose batches take `delay` seconds, so a run can be interrupted part-way."""

    def __init__(self, delay: float = 0.0, **kw):
        FakeStore.__init__(self, hooks={"a": 16, "b": 12}, batch_size_tokens=BATCH, **kw)
        self.delay = delay

    def global_batch(self, t):
        if self.delay:
            time.sleep(self.delay)
        return FakeStore.global_batch(self, t)


def make_configs() -> list[TrainConfig]:
    # Exercise everything that carries state across steps: Adam moments, warm-up + cosine + decay LR, coefficient
    # warm-up, dead-latent windows (AuxK switches on), firing-rate window resets, the BatchTopK threshold, an SAE
    # that finishes before the others, and the activation norm estimate.
    common = dict(checkpoint_every_tokens=CHECKPOINT_EVERY, dead_feature_window=4, feature_sampling_window=7,
                  log_every=3, lr_warm_up_steps=3, lr_decay_steps=5, lr_scheduler="cosineannealing")
    return [
        TrainConfig(architecture="topk", hook="a", d_sae=48, k=3, training_tokens=BATCH * 40, **common),
        TrainConfig(architecture="batchtopk", hook="a", d_sae=48, k=2.5, training_tokens=BATCH * 40,
                    normalize_activations="expected_average_only_in", n_batches_for_norm_estimate=2, **common),
        TrainConfig(architecture="jumprelu", hook="b", d_sae=36, training_tokens=BATCH * 25, lr=3e-3,
                    l0_coefficient=0.1, l0_warm_up_steps=10, **common),
    ]


CHILD = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.test_train_resume import SlowStore, make_configs
from nnsae.training import train
train(None, make_configs(), SlowStore(delay={delay}), {out!r}, resume={resume}, progress=False)
"""


def _child(out: Path, delay: float, resume: bool = False) -> subprocess.Popen:
    code = CHILD.format(root=str(ROOT), delay=delay, out=str(out), resume=resume)
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, min_step: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")] if \
            (out / "checkpoints").is_dir() else []
        if steps and max(steps) >= min_step:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"the child ended early:\n{proc.stderr.read().decode()}")
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared in time")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("uninterrupted")
        train(None, make_configs(), SlowStore(), out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def _assert_same_results(got: Path, expected: Path) -> None:
    names = sorted(p.name for p in expected.iterdir() if p.is_dir())
    assert names == sorted(p.name for p in got.iterdir() if p.is_dir()) and len(names) == 3
    for name in names:
        for file in ("sae_weights.safetensors", "sparsity.safetensors"):
            a, b = load_file(got / name / file), load_file(expected / name / file)
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), f"{name}/{file}:{key} differs"
        assert json.loads((got / name / "cfg.json").read_text()) == json.loads((expected / name / "cfg.json")
                                                                                 .read_text())

        def metrics(folder):
            lines = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
            return [{k: v for k, v in line.items() if not k.startswith("perf/")} for line in lines]

        assert metrics(got) == metrics(expected)
    assert json.loads((got / "run.json").read_text()) == json.loads((expected / "run.json").read_text())


def _resume_in_process(out: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(None, make_configs(), SlowStore(), out, resume=True, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_sigkill_then_resume_reaches_the_uninterrupted_weights(tmp_path, reference):
    proc = _child(tmp_path, delay=0.05)
    try:
        step = _wait_for_checkpoint(tmp_path, proc, min_step=15)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert "complete" not in json.loads((tmp_path / "run.json").read_text())  # killed part-way
    assert 15 <= step < 40
    _resume_in_process(tmp_path)
    _assert_same_results(tmp_path, reference)


class SignallingStore(SlowStore):
    """Sends this process SIGTERM while producing batch `at` (mid-step, like a scheduler's preemption)."""

    def __init__(self, at: int, **kw):
        SlowStore.__init__(self, **kw)
        self.at = at

    def global_batch(self, t):
        if t == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return SlowStore.global_batch(self, t)


def test_sigterm_writes_a_checkpoint_and_resume_continues_from_it(tmp_path, reference):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(TrainingInterrupted, match="resume=True"):
            train(None, make_configs(), SignallingStore(at=13), tmp_path, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    # batch 13 is training step 11 (two batches went to the norm estimate): that step completes, then checkpoints
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-12"]
    _resume_in_process(tmp_path)
    _assert_same_results(tmp_path, reference)
