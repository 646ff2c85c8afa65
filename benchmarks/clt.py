"""Cross-layer transcoder training cost as layers grow, and transcoder vs SAE training throughput, on SmolLM2-135M.

1. CLT step time and peak memory for 4, 8, 16, 30 layers (layers 0..n−1): one training step (forward, backward,
   gradient clipping, Adam) through nnsae's `Trainer.train_step` on one batch of real (MLP input, MLP output)
   pairs. Each layer count runs in its own process; the reported peak is the resident-memory high-water mark
   (VmHWM, reset once the batch is harvested and the model freed) above the resident memory at that point: the
   parameters, Adam state, gradients and the step's temporaries.
2. Per-layer transcoder vs SAE tokens/s at the same width and k: a TopK transcoder (`blocks.L.mlp.hook_in` →
   `blocks.L.hook_mlp_out`) and a TopK SAE on `blocks.L.mlp.hook_in`, stepped alternately on the same batches in one
   process (`benchmarks.common.interleaved_samples`); the ratio is the median over rounds.

Run: `python -m benchmarks.clt [--layers 4 8 16 30] [--d-sae 1152] [--k 16] [--batch 4096] [--steps 3]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import interleaved_samples, machine_line, markdown_table, median_ratio
from nnsae.training import TrainConfig
from nnsae.training.trainer import Trainer


class BatchStore:
    """The store interface `Trainer` needs, over batches already in memory."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch, self.hooks = batch, list(batch)
        self.batch_size_tokens = next(iter(batch.values())).shape[0]

    def d_in(self, hook: str) -> int:
        return self.batch[hook].shape[1]

    def metadata(self, hook: str) -> dict[str, Any]:
        return {"model_name": "SmolLM2-135M", "hook_name": hook}


def harvest_pairs(n_layers: int, n_tokens: int) -> dict[str, torch.Tensor]:
    """One batch of `n_tokens` (MLP input, MLP output) pairs of layers 0..n_layers−1 from the offline corpus."""
    from nnsae import load_smollm2
    from nnsae.harvest import ActivationStore

    model, tokenizer = load_smollm2()
    hooks = [h for i in range(n_layers) for h in (f"blocks.{i}.mlp.hook_in", f"blocks.{i}.hook_mlp_out")]
    store = ActivationStore(model, hooks, tokenizer=tokenizer, context_size=128, batch_size_tokens=n_tokens,
                            store_batch_size_prompts=16, n_batches_in_buffer=2)
    batch = {h: t.clone() for h, t in next(iter(store)).items()}
    del store, model
    return batch


def reset_peak_rss() -> None:
    """Restart the kernel's resident-memory high-water mark (VmHWM) from the current resident size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def clt_child(n_layers: int, d_sae: int, k: int, batch_tokens: int, steps: int) -> dict[str, float]:
    batch = harvest_pairs(n_layers, batch_tokens)
    import gc

    gc.collect()
    from nnsae.harvest import release_free_memory

    release_free_memory()
    base = _current_rss_mb()
    reset_peak_rss()
    cfg = TrainConfig(architecture="topk", k=k, d_sae=d_sae, hook=[f"blocks.{i}.mlp.hook_in" for i in range(n_layers)],
                      hook_out=[f"blocks.{i}.hook_mlp_out" for i in range(n_layers)], training_tokens=10**9,
                      eval_every=0, log_every=10**6)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(None, cfg, BatchStore(batch), out, progress=False)
        trainer.build()
        times = []
        for i in range(steps + 1):  # the first step (allocations, Adam state) is not timed
            start = time.perf_counter()
            trainer.train_step(batch)
            if i:
                times.append(time.perf_counter() - start)
        n_params = sum(p.numel() for p in trainer.runs[0].model.parameters())
    return {"layers": n_layers, "step_s": statistics.median(times), "peak_mb": peak_rss_mb() - base,
            "params_m": n_params / 1e6, "tokens_per_s": batch_tokens / statistics.median(times)}


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tc_vs_sae(layer: int, d_sae: int, k: int, batch_tokens: int, repeats: int) -> dict[str, float]:
    """Median tokens/s of a TopK transcoder and a TopK SAE of the same width and k, stepped alternately."""
    hooks = (f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out")
    batch = {h: t for h, t in harvest_pairs(layer + 1, batch_tokens).items() if h in hooks}
    common = dict(architecture="topk", k=k, d_sae=d_sae, training_tokens=10**9, eval_every=0, log_every=10**6)
    trainers = {}
    for name, cfg in (("sae", TrainConfig(hook=hooks[0], **common)),
                      ("transcoder", TrainConfig(hook=hooks[0], hook_out=hooks[1], **common))):
        trainers[name] = Trainer(None, cfg, BatchStore(batch), tempfile.mkdtemp(), progress=False)
        trainers[name].build()
    samples = interleaved_samples({name: (lambda t=t: t.train_step(batch)) for name, t in trainers.items()},
                                  repeats=repeats, warmup=2)
    return {"sae_tok_s": batch_tokens / statistics.median(samples["sae"]),
            "transcoder_tok_s": batch_tokens / statistics.median(samples["transcoder"]),
            "ratio": 1 / median_ratio(samples, "transcoder", "sae")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="*", default=[4, 8, 16, 30])
    parser.add_argument("--d-sae", type=int, default=1152, help="latents per layer (CLT)")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tc-d-sae", type=int, default=2304, help="width of the transcoder/SAE ratio")
    parser.add_argument("--tc-layer", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("NNSAE_KEEP_FREED_HEAP", "1")
    if args.child is not None:
        print(json.dumps(clt_child(args.child, args.d_sae, args.k, args.batch, args.steps)))
        return
    print(machine_line())
    rows = []
    for n in args.layers:
        cmd = [sys.executable, "-m", "benchmarks.clt", "--child", str(n), "--d-sae", str(args.d_sae), "--k",
               str(args.k), "--batch", str(args.batch), "--steps", str(args.steps)]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        rows.append([n, f"{result['params_m']:.0f}M", f"{result['step_s']:.2f}", f"{result['tokens_per_s']:.0f}",
                     f"{result['peak_mb']:.0f}"])
        print(f"{n} layers: {result}", flush=True)
    print(f"\nCLT training (TopK, d_sae {args.d_sae} per layer, k {args.k}, batch {args.batch} tokens, float32):")
    print(markdown_table(["layers", "parameters", "step (s)", "tokens/s", "peak memory above data (MB)"], rows))
    ratio = tc_vs_sae(args.tc_layer, args.tc_d_sae, args.k, args.batch, args.repeats)
    print(f"\nTopK transcoder vs TopK SAE training, layer {args.tc_layer}, d_sae {args.tc_d_sae}, k {args.k}, batch "
          f"{args.batch} (side by side, median of {args.repeats} rounds):")
    print(markdown_table(["SAE tok/s", "transcoder tok/s", "transcoder / SAE"],
                         [[f"{ratio['sae_tok_s']:.0f}", f"{ratio['transcoder_tok_s']:.0f}", f"{ratio['ratio']:.3f}"]]))


if __name__ == "__main__":
    main()
