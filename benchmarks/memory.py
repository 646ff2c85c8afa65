"""Peak memory of a training run against what it must hold: model + one mixing buffer + SAE with optimizer state.

The run is the default CLI job, `nnsae train --model smollm2 --hook model.layers.6 --arch topk --k 32 --expansion 8
--dataset offline --tokens N` (harvest from the model, mixing buffer, sparse TopK trainer), executed in a fresh
subprocess through `nnsae.cli.main`. Accounting, all in resident memory (RSS):

- **measured baseline** (a second fresh subprocess): Python + torch + transformers + nnsight + nnsae imported and
  SmolLM2-135M loaded (dequantized from the embedded GGUF), no store and no training: its RSS after loading
  (VmRSS). It contains the model's parameter bytes (listed separately) and the interpreter/library overhead.
- **one mixing buffer**: `n_batches_in_buffer × batch_size_tokens × d_in × 4` bytes (float32; store defaults 16 ×
  4096 × 576).
- **SAE + optimizer**: parameters, their gradients and Adam's two moments, `4 × n_params × 4` bytes.
- budget = baseline + buffer + SAE state; the target is a training peak within 1.3× of it.

Peak of the training child: VmHWM after the model is loaded (the high-water mark is reset through
`/proc/self/clear_refs` once loading is done, so a loading transient does not hide the training peak), plus the
whole-process `ru_maxrss` (which includes loading). Two token budgets show whether the peak has plateaued once the
buffer is full (default 0.1M and 0.2M tokens: the buffer holds 65k tokens and is refilled every 32k); `--tokens 5e6`
runs the 5M-token job (about half an hour of harvesting on 2 quiet CPU cores).

Run: `python -m benchmarks.memory [--tokens 1.5e5 3e5]`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_line, markdown_table

MB = 2 ** 20
HOOK = "model.layers.6"
D_IN, EXPANSION, BATCH, BUFFER_BATCHES = 576, 8, 4096, 16
TRAIN_ARGS = ["train", "--model", "smollm2", "--hook", HOOK, "--arch", "topk", "--k", "32", "--expansion",
              str(EXPANSION), "--dataset", "offline"]


def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ≥ 4.0); False when not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """Polls VmRSS, a fallback for kernels where the high-water mark cannot be reset."""

    def __init__(self, every: float = 0.05):
        super().__init__(daemon=True)
        self.every, self.peak_kb, self.stop = every, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_kb = max(self.peak_kb, proc_status_kb("VmRSS"))
            time.sleep(self.every)


# ---- the two children ---------------------------------------------------------------------------------------------

def child_baseline() -> dict[str, Any]:
    import nnsight  # noqa: F401 - the training child imports these too
    import torch

    import nnsae.cli  # noqa: F401
    from nnsae.models import load_model

    model, _ = load_model()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    return {"rss_kb": proc_status_kb("VmRSS"), "hwm_kb": proc_status_kb("VmHWM"), "model_bytes": model_bytes,
            "threads": torch.get_num_threads()}


def child_train(tokens: int, out: str) -> dict[str, Any]:
    import nnsae.models
    from nnsae.cli import main

    loaded = nnsae.models.load_model()
    after_load_kb = proc_status_kb("VmRSS")
    nnsae.models.load_model = lambda *args, **kwargs: loaded  # the CLI below gets this model: no second load
    reset = reset_peak()
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    main([*TRAIN_ARGS, "--tokens", str(tokens), "--out", out])
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    peak_kb = proc_status_kb("VmHWM") if reset else sampler.peak_kb
    return {"after_load_kb": after_load_kb, "train_peak_kb": peak_kb, "peak_source": "VmHWM" if reset else "sampled",
            "process_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "seconds": seconds}


def spawn(*args: str) -> dict[str, Any]:
    env = dict(os.environ, TQDM_DISABLE="1")
    run = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", *args], capture_output=True,
                         text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# ---- the report ---------------------------------------------------------------------------------------------------

def run(budgets: list[int]) -> str:
    d_sae = D_IN * EXPANSION
    n_params = 2 * D_IN * d_sae + d_sae + D_IN
    sae_bytes = 4 * n_params * 4
    buffer_bytes = BUFFER_BATCHES * BATCH * D_IN * 4
    base = spawn("baseline")
    baseline_bytes = base["rss_kb"] * 1024
    budget = baseline_bytes + buffer_bytes + sae_bytes
    rows = []
    for tokens in budgets:
        with tempfile.TemporaryDirectory(prefix="nnsae-mem-") as tmp:
            r = spawn("train", str(tokens), str(Path(tmp) / "run"))
        children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far
        peak = r["train_peak_kb"] * 1024
        rows.append([f"{tokens:,}", f"{r['seconds']:.0f}", f"{r['after_load_kb'] / 1024:,.0f}",
                     f"{peak / MB:,.0f} ({r['peak_source']})", f"{r['process_peak_kb'] / 1024:,.0f}",
                     f"{children_peak / 1024:,.0f}", f"{(peak - baseline_bytes) / MB:,.0f}",
                     f"**{peak / budget:.2f}×**"])
        print(f"  {tokens}: {rows[-1]}", file=sys.stderr, flush=True)  # progress; the report goes to stdout
    other = baseline_bytes - base["model_bytes"]
    lines = [
        f"Peak memory of `nnsae {' '.join(TRAIN_ARGS)} --tokens N` (CPU, {machine_line()}).", "",
        "Budget (what the run must hold):", "",
        markdown_table(["part", "MiB", "how"], [
            ["baseline process", f"{baseline_bytes / MB:,.0f}", "measured: VmRSS of a fresh subprocess after importing "
             "torch/transformers/nnsight/nnsae and loading SmolLM2-135M (no store, no training)"],
            ["  of which model parameters + buffers", f"{base['model_bytes'] / MB:,.0f}", "Σ numel × element size"],
            ["  of which interpreter, libraries, allocator", f"{other / MB:,.0f}", "the rest"],
            ["one mixing buffer", f"{buffer_bytes / MB:,.0f}", f"{BUFFER_BATCHES} × {BATCH} tokens × {D_IN} × 4 B "
             f"(float32)"],
            ["SAE + Adam", f"{sae_bytes / MB:,.0f}", f"4 × {n_params:,} params × 4 B (weights, grads, 2 moments)"],
            ["**budget**", f"**{budget / MB:,.0f}**", "sum"]]), "",
        "Training runs (fresh subprocess each; peak = VmHWM reset after the model is loaded, so it is the peak while "
        "harvesting and training):", "",
        markdown_table(["tokens", "s", "RSS after load MiB", "training peak MiB", "process peak MiB (ru_maxrss)",
                        "RUSAGE_CHILDREN max MiB", "peak − baseline MiB", "peak / budget"], rows)]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        result = child_baseline() if sys.argv[2] == "baseline" else child_train(int(sys.argv[3]), sys.argv[4])
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, nargs="*", default=[1e5, 2e5],
                        help="token budgets, one training run each (5e6 for the full figure)")
    args = parser.parse_args()
    print(run([int(t) for t in args.tokens]))


if __name__ == "__main__":
    main()
