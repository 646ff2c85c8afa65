"""Cost of running an SAE through nnsae.attach vs the bare SAE math in a plain torch hook (SmolLM2-135M).

    .venv/bin/python benchmarks/attach.py [--rounds 9] [--batch 2] [--seq 64] [--threads 1]

Setup: TopK SAE (d_in 576, d_sae 4608, k 32, random weights) spliced at the output of model.layers[6]; no_grad.
Rows are timed round-robin (one of each per round); each row's ratio to the baseline is taken within a round and
the median over rounds is reported, so load drift on a shared machine cancels. The headline ratio is "nnsae trace,
trace-scoped attach" over "HF forward + torch hook doing sae(x)" (target <= 1.05x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bars

import nnsae  # noqa: E402
from nnsae import SAE, SAEConfig  # noqa: E402
from nnsae.attachment import attach  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from nnsight.modeling.transformers import TransformersModel

    t0 = time.perf_counter()
    hf, tok = nnsae.models.load_smollm2()
    load_s = time.perf_counter() - t0
    model = TransformersModel(hf, tokenizer=tok)
    sae = SAE.from_config(SAEConfig(d_in=576, d_sae=4608, architecture="topk", k=32,
                                    metadata={"hook_name": "blocks.6.hook_resid_post"}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    ids = torch.randint(100, 40000, (args.batch, args.seq), generator=g)
    layer = hf.model.layers[6]

    def hf_plain():
        hf(ids)

    def hf_hook_sae():
        handle = layer.register_forward_hook(lambda m, a, out: sae(out))
        try:
            hf(ids)
        finally:
            handle.remove()

    def nnsae_trace_scoped():
        with model.trace(ids):
            attach(model, sae)
            model.output.logits.save()

    def nnsae_trace_read():
        with model.trace(ids):
            h = attach(model, sae)
            h.hook_sae_acts_post.output.save()
            model.output.logits.save()

    persistent = {}

    def nnsae_persistent_trace():
        with model.trace(ids):
            model.output.logits.save()

    def nnsae_persistent_plain_call():
        hf(ids)

    rows = {
        "HF forward, no SAE": hf_plain,
        "HF forward + torch hook `sae(x)` (baseline)": hf_hook_sae,
        "nnsae: trace, attach inside (trace-scoped)": nnsae_trace_scoped,
        "nnsae: trace, attach inside + save features": nnsae_trace_read,
        "nnsae: persistent attach, trace": nnsae_persistent_trace,
        "nnsae: persistent attach, plain HF call": nnsae_persistent_plain_call,
    }
    needs_persistent = {"nnsae: persistent attach, trace", "nnsae: persistent attach, plain HF call"}
    times: dict[str, list[float]] = {name: [] for name in rows}
    with torch.no_grad():
        for fn in rows.values():  # warm-up
            if fn in (nnsae_persistent_trace, nnsae_persistent_plain_call):
                persistent["h"] = attach(model, sae)
                fn()
                persistent.pop("h").detach()
            else:
                fn()
        for _ in range(args.rounds):
            for name, fn in rows.items():
                if name in needs_persistent:
                    persistent["h"] = attach(model, sae)
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
                if name in needs_persistent:
                    persistent.pop("h").detach()

        # the splice op alone vs the bare SAE math, on the real layer-6 activation (paired, many reps)
        act = []
        grab = layer.register_forward_hook(lambda m, a, out: act.append(out))
        hf(ids)
        grab.remove()
        x = act[0]
        h = attach(model, sae)
        op_t, bare_t = [], []
        for _ in range(args.rounds * 5):
            t = time.perf_counter()
            sae(x)
            t1 = time.perf_counter()
            h.module(x)
            t2 = time.perf_counter()
            bare_t.append(t1 - t)
            op_t.append(t2 - t1)
        h.detach()

        # attach/detach cost on their own (persistent, outside a trace)
        attach_t, detach_t = [], []
        for _ in range(50):
            t = time.perf_counter()
            h = attach(model, sae)
            t1 = time.perf_counter()
            h.detach()
            t2 = time.perf_counter()
            attach_t.append(t1 - t)
            detach_t.append(t2 - t1)

    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    baseline = times["HF forward + torch hook `sae(x)` (baseline)"]
    ratios = {name: statistics.median(t / b for t, b in zip(v, baseline)) for name, v in times.items()}
    print(f"SmolLM2-135M (load {load_s:.1f}s), {args.batch}x{args.seq} tokens, TopK SAE 576x4608 k=32 at "
          f"model.layers.6 output, no_grad, {torch.get_num_threads()} threads, median of {args.rounds} rounds\n")
    print("| run | median ms | vs baseline (median of per-round ratios) |")
    print("|---|---:|---:|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.1f} | {ratios[name]:.3f}x |")
    op_ratio = statistics.median(o / b for o, b in zip(op_t, bare_t))
    print(f"| bare `sae(x)` on the layer-6 activation | {statistics.median(bare_t) * 1e3:.2f} | |")
    print(f"| nnsae splice op (`SAESplice`) on the same | {statistics.median(op_t) * 1e3:.2f} | "
          f"{op_ratio:.3f}x of bare |")
    print(f"| persistent `attach()` alone | {statistics.median(attach_t) * 1e3:.2f} | |")
    print(f"| `detach()` alone | {statistics.median(detach_t) * 1e3:.2f} | |")
    ratio = ratios["nnsae: trace, attach inside (trace-scoped)"]
    print(f"\nheadline: trace-scoped nnsae splice / (HF + bare SAE hook) = {ratio:.3f}x (target <= 1.05x)")


if __name__ == "__main__":
    main()
