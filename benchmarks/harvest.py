"""Harvest throughput against the plain HF forward truncated after the deepest hook, and the full forward.

`python -m benchmarks.harvest [--batches 4] [--batch 8] [--repeats 7]` — SmolLM2-135M, offline text, context 128. The
three runs are timed round-robin in one process; tok/s are medians and each ratio is the median of the per-round
ratios, so machine drift affects both sides alike.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics

import torch

from benchmarks.common import interleaved_samples, machine_line, markdown_table, median_ratio

os.environ.setdefault("TQDM_DISABLE", "1")


class _Stop(Exception):
    pass


def run(n_batches: int = 4, batch: int = 8, repeats: int = 7) -> str:
    import nnsae
    from nnsae.data import iter_documents, pack
    from nnsae.harvest import Harvester

    hf, tok = nnsae.load_smollm2()
    chunks = list(itertools.islice(pack(iter_documents("offline"), tok, 128), n_batches * batch))
    batches = [torch.stack([c.tokens for c in chunks[i:i + batch]]) for i in range(0, len(chunks), batch)]
    n_tokens = sum(b.numel() for b in batches)

    def truncated(layer: int):
        def stop(*_):
            raise _Stop

        def fn():
            handle = hf.model.layers[layer].register_forward_hook(stop)
            try:
                for b in batches:
                    try:
                        hf(b)
                    except _Stop:
                        pass
            finally:
                handle.remove()
        return fn

    def full():
        for b in batches:
            hf(b)

    rows = []
    for layers in ([6], [3, 6, 9]):
        harvester = Harvester(hf, [f"model.layers.{i}" for i in layers])
        with torch.no_grad():
            samples = interleaved_samples({"harvest": lambda: [harvester(b) for b in batches],
                                           "truncated": truncated(max(layers)), "full": full}, repeats=repeats)
        t = {name: statistics.median(ts) for name, ts in samples.items()}
        label = f"layers {', '.join(map(str, layers))}"
        rows.append([label, f"{n_tokens / t['harvest']:,.0f}", f"{n_tokens / t['truncated']:,.0f}",
                     f"{n_tokens / t['full']:,.0f}", f"{median_ratio(samples, 'truncated', 'harvest'):.2f}×",
                     f"{median_ratio(samples, 'full', 'harvest'):.2f}×"])
    header = ["hooks", "nnsae harvest tok/s", "HF forward stopped after deepest hook tok/s", "full HF forward tok/s",
              "harvest / truncated (target ≥ 0.95×)", "harvest / full"]
    return (f"Harvest, SmolLM2-135M, {n_batches}×{batch}×128 tokens ({machine_line()})\n\n"
            + markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(run(args.batches, args.batch, args.repeats))


if __name__ == "__main__":
    main()
