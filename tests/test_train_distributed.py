"""Data parallel: two gloo processes, each with its shard, train the same SAEs as one process on the global batches."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from nnsae.training import TrainConfig, train
from tests.test_train_store import FakeStore

LOCAL_BATCH, WORLD = 48, 2
HOOKS = {"a": 16}


def configs() -> list[TrainConfig]:
    common = dict(dtype="float64", training_tokens=LOCAL_BATCH * WORLD * 12, dead_feature_window=3, log_every=4,
                  checkpoint_every_tokens=LOCAL_BATCH * WORLD * 5)
    return [
        TrainConfig(architecture="topk", d_sae=40, k=3, **common),
        # global batch-level selection and threshold, norm estimate summed over ranks
        TrainConfig(architecture="batchtopk", d_sae=40, k=2.5, normalize_activations="expected_average_only_in",
                    n_batches_for_norm_estimate=2, **common),
        TrainConfig(architecture="jumprelu", d_sae=40, lr=3e-3, l0_coefficient=0.1, **common),
    ]


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        train(None, configs(), FakeStore(hooks=HOOKS, batch_size_tokens=LOCAL_BATCH), out, progress=False)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_global_batches(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path / "ddp")), nprocs=WORLD,
                       start_method="fork", join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(None, configs(), FakeStore(hooks=HOOKS, batch_size_tokens=LOCAL_BATCH * WORLD),
                       tmp_path / "single", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(single) == 3
    for name in single:
        ddp, one = tmp_path / "ddp" / name, tmp_path / "single" / name
        a, b = load_file(ddp / "sae_weights.safetensors"), load_file(one / "sae_weights.safetensors")
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-11, msg=f"{name}:{key}")
        meta_a = json.loads((ddp / "cfg.json").read_text())["metadata"]
        meta_b = json.loads((one / "cfg.json").read_text())["metadata"]
        assert meta_a["training_tokens"] == meta_b["training_tokens"] == LOCAL_BATCH * WORLD * 12
        assert meta_a["num_dead_features"] == meta_b["num_dead_features"]
        assert meta_a["l0"] == pytest.approx(meta_b["l0"], rel=1e-9)
        lines_a = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
        lines_b = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
        assert len(lines_a) == len(lines_b) == 3
        for la, lb in zip(lines_a, lines_b):
            for key in lb:
                if not key.startswith("perf/"):
                    assert la[key] == pytest.approx(lb[key], rel=1e-7, abs=1e-9), key
