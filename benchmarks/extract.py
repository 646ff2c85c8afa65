"""Feature-extraction throughput on SmolLM2 against a plain HF forward stopped after the deepest hook.

For 1 SAE (layer 6) and 3 SAEs (layers 3, 6, 9) — random TopK SAEs, d_sae 4608, k 32, SAELens configs with
`hf_hook_name` — on the same batches of the offline corpus (context 128, 8 prompts per batch):

* forward: the HF model with a forward hook on the deepest layer that raises (embed + layers[:L+1]);
* forward + encode: the same plus the bare SAE math on the captured activations (`x @ W_enc + b_enc`, top-k) —
  the compute a float32 extraction must do (each of these SAEs costs about 3/4 of a SmolLM2 layer), so
  `(forward + encode) / forward` is the ceiling of any extraction that evaluates the encoder densely in float32;
* `nnsae.extract` end to end: packing, the nnsight harvest, encoding, per-token lists, streaming statistics and
  top contexts, parquet shard, statistics state, final statistics and manifest writes (with fsync);
* `nnsae.extract` steady state: the end-to-end time minus the one-time cost of a call (an extraction of a single
  128-token chunk: hook resolution and the harvester's probe forward, fingerprints, final statistics files), i.e.
  the throughput of a long run.

Run: `python -m benchmarks.extract [--tokens 8192] [--repeats 5] [--threads 1]`. Measurements are repeated
round-robin after a warm-up; times are medians and ratios medians of per-round ratios. One torch thread by default: the ratios then measure work rather than
how a shared machine schedules OpenMP threads (`--threads 0` keeps torch's default).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import interleaved_samples, machine_line, markdown_table, median_ratio
from nnsae import SAE, SAEConfig
from nnsae.data import OFFLINE, iter_documents, pack
from nnsae.extract import extract

D_IN, D_SAE, K, CTX, BATCH = 576, 4608, 32, 128, 8
CONFIGS = {"1 SAE (layer 6)": [6], "3 SAEs (layers 3, 6, 9)": [3, 6, 9]}


class _Stop(Exception):
    pass


def make_sae(layer: int) -> SAE:
    torch.manual_seed(layer)
    return SAE.from_config(SAEConfig(
        d_in=D_IN, d_sae=D_SAE, architecture="topk", k=K,
        metadata={"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "hook_name": f"blocks.{layer}.hook_resid_post",
                  "hf_hook_name": f"model.layers.{layer}", "context_size": CTX, "prepend_bos": True}))


def truncated_forward(model, batches: list[torch.Tensor], layers: list[int], saes: list[SAE] | None = None) -> None:
    """Plain HF forward stopped (by an exception) after the deepest hooked layer; optionally the bare SAE math."""
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def hook(output, layer):
        captured[layer] = output[0] if isinstance(output, tuple) else output
        if layer == deepest:
            raise _Stop

    handles = [model.model.layers[L].register_forward_hook(lambda m, a, o, L=L: hook(o, L)) for L in layers]
    try:
        with torch.inference_mode():
            for tokens in batches:
                try:
                    model(tokens)
                except _Stop:
                    pass
                for L, sae in zip(layers, saes or []):
                    x = captured[L].flatten(0, 1)
                    torch.topk((x - sae.b_dec) @ sae.W_enc + sae.b_enc, K, dim=-1)
    finally:
        for h in handles:
            h.remove()


def run(n_tokens: int = 8192, repeats: int = 5, threads: int = 1) -> str:
    from nnsae.models import load_smollm2

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    load_s = time.perf_counter() - start
    n_chunks = max(n_tokens // CTX, 2)
    chunks = list(itertools.islice(pack(iter_documents(OFFLINE), tokenizer, CTX), n_chunks))
    batches = [torch.stack([c.tokens for c in chunks[i:i + BATCH]]) for i in range(0, n_chunks, BATCH)]
    tokens = n_chunks * CTX
    tmp = Path(tempfile.mkdtemp(prefix="nnsae-bench-extract-"))

    def extraction(saes: list[SAE], n: int) -> None:
        shutil.rmtree(tmp / "out", ignore_errors=True)
        extract((model, tokenizer), saes, OFFLINE, tmp / "out", n_tokens=n, context_size=CTX,
                batch_size_prompts=BATCH, progress=False)

    rows = []
    try:
        for label, layers in CONFIGS.items():
            saes = [make_sae(L) for L in layers]
            samples = interleaved_samples({
                "forward": lambda: truncated_forward(model, batches, layers),
                "floor": lambda: truncated_forward(model, batches, layers, saes),
                "extract": lambda: extraction(saes, tokens),
                "setup": lambda: extraction(saes, CTX),
            }, repeats=repeats)
            per_round = [dict(zip(samples, ts)) for ts in zip(*samples.values())]
            steady = [(tokens - CTX) / max(r["extract"] - r["setup"], 1e-9) for r in per_round]
            med = {name: statistics.median(ts) for name, ts in samples.items()}
            rows.append([label, f"{tokens / med['forward']:,.0f}", f"{tokens / med['floor']:,.0f}",
                         f"{tokens / med['extract']:,.0f}", f"{med['setup']:.2f}", f"{statistics.median(steady):,.0f}",
                         f"{1 / median_ratio(samples, 'extract', 'forward'):.2f}×",
                         f"{statistics.median(s * r['forward'] / tokens for s, r in zip(steady, per_round)):.2f}×",
                         f"{1 / median_ratio(samples, 'floor', 'forward'):.2f}×",
                         f"{statistics.median(s * r['floor'] / tokens for s, r in zip(steady, per_round)):.2f}×"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    header = ["SAEs", "HF forward tok/s", "forward + bare encode tok/s", "extract end-to-end tok/s",
              "one-time cost s", "extract steady tok/s", "end-to-end / forward", "steady / forward",
              "(forward + encode) / forward", "steady / (forward + encode)"]
    return (f"Feature extraction, SmolLM2-135M, {tokens} tokens (context {CTX}, {BATCH} prompts per batch), random "
            f"TopK SAEs d_sae {D_SAE} k {K}; {repeats} interleaved rounds after a warm-up, medians (ratios: median of "
            f"per-round ratios); model load {load_s:.0f} s (float32, CPU; {machine_line()})\n\n"
            + markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    print(run(args.tokens, args.repeats, args.threads))


if __name__ == "__main__":
    main()
