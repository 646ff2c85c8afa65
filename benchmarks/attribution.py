"""Attribution time against its floor on SmolLM2-135M (30 layers), per prompt length.

    .venv/bin/python benchmarks/attribution.py [--lengths 64 128 256] [--max-feature-nodes 4096]
        [--batch-size 256] [--d-transcoder 4096] [--k 16] [--threads 2]

Setup: random TopK transcoders (d_transcoder 4096, k 16 by default) reading `mlp.hook_in` and writing `hook_mlp_out`
on all 30 layers, a prompt of N tokens (BOS + text), float32 on CPU. Each length runs in its own process, so the
peak resident memory (ru_maxrss) is that length's own; "model + transcoders" is the resident memory before
attributing. The floor is (number of batched backward passes attribution made) x (one forward + backward of the
plain model over `batch` copies of the prompt, gradient read at the token embeddings), timed in the same process
right after the attribution (median of 3). Rows/s counts logit and feature rows of the adjacency.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bars

from benchmarks.common import machine_line, markdown_table  # noqa: E402

TEXT = ("The capital of France is Paris, a city on the Seine known for its museums, its cafes and the Eiffel "
        "Tower, which was built for the world fair of 1889. ")


def random_transcoders(d_model: int, n_layers: int, d_transcoder: int, k: int):
    from nnsae.circuits import SingleLayerTranscoder, TranscoderSet

    g = torch.Generator().manual_seed(0)
    layers = [SingleLayerTranscoder(torch.randn(d_transcoder, d_model, generator=g) / d_model ** 0.5,
                                    torch.randn(d_transcoder, d_model, generator=g) / d_transcoder ** 0.5,
                                    torch.zeros(d_transcoder), torch.zeros(d_model), activation="topk", k=k)
              for _ in range(n_layers)]
    return TranscoderSet(layers, "mlp.hook_in", "hook_mlp_out", scan="benchmark-random-topk")


def prompt_tokens(tokenizer, n_tokens: int) -> torch.Tensor:
    ids = tokenizer(TEXT * (n_tokens // 8 + 1), add_special_tokens=False).input_ids[: n_tokens - 1]
    return torch.tensor([tokenizer.bos_token_id or 0, *ids])


def one_length(args: argparse.Namespace) -> dict:
    """Attribute one prompt and time the floor, in this process."""
    import nnsae
    from nnsae.circuits import attribute
    from nnsae.circuits import attribution as attribution_module

    torch.set_num_threads(args.threads)
    hf, tokenizer = nnsae.models.load_smollm2()
    config = hf.config
    transcoders = random_transcoders(config.hidden_size, config.num_hidden_layers, args.d_transcoder, args.k)
    tokens = prompt_tokens(tokenizer, args.length)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    passes = []
    original_rows = attribution_module._ReplacementModel.rows

    def counted_rows(self, layers, *args):  # count the batched backward passes and their sizes
        passes.append(len(layers))
        return original_rows(self, layers, *args)

    attribution_module._ReplacementModel.rows = counted_rows
    start = time.perf_counter()
    graph = attribute(hf, tokens, transcoders, max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    attribution_module._ReplacementModel.rows = original_rows
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    copies = max(1, min(args.batch_size, max(len(graph.logit_tokens), len(graph.selected_features))))
    for p in hf.parameters():
        p.requires_grad_(False)

    def forward_backward() -> None:
        embeds = hf.get_input_embeddings()(tokens[None].expand(copies, -1)).detach().requires_grad_(True)
        hidden = hf.base_model(inputs_embeds=embeds).last_hidden_state
        torch.autograd.grad(hidden, embeds, torch.ones_like(hidden))

    forward_backward()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        forward_backward()
        times.append(time.perf_counter() - t)
    one = statistics.median(times)
    return {"length": args.length, "active": int(len(graph.active_features)),
            "selected": int(len(graph.selected_features)), "logits": len(graph.logit_tokens),
            "passes": len(passes), "rows": sum(passes), "seconds": seconds, "one_fwd_bwd": one, "copies": copies,
            "floor": len(passes) * one, "peak_gib": peak, "before_gib": rss_before}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)  # one length, in a subprocess
    parser.add_argument("--max-feature-nodes", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--d-transcoder", type=int, default=4096)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.length is not None:
        print(json.dumps(one_length(args)))
        return
    results = []
    for length in args.lengths:
        command = [sys.executable, __file__, "--length", str(length), "--max-feature-nodes",
                   str(args.max_feature_nodes), "--batch-size", str(args.batch_size), "--d-transcoder",
                   str(args.d_transcoder), "--k", str(args.k), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"length {length} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    print(f"SmolLM2-135M, 30 layers, random TopK-{args.k} transcoders (d_transcoder {args.d_transcoder}), "
          f"max_feature_nodes {args.max_feature_nodes}, batch_size {args.batch_size}; {machine_line()}\n")
    rows = [[r["length"], r["active"], r["selected"], r["passes"], f"{r['seconds']:.1f}",
             f"{r['floor']:.1f} ({r['passes']} x {r['one_fwd_bwd']:.2f})", f"{r['seconds'] / r['floor']:.2f}x",
             f"{r['rows'] / r['seconds']:.0f}", f"{r['peak_gib']:.2f} ({r['before_gib']:.2f})"]
            for r in results]
    print(markdown_table(["tokens", "active features", "feature nodes", "backward passes", "attribution (s)",
                          "floor (s)", "ratio", "rows/s", "peak RSS GiB (model + transcoders)"], rows))


if __name__ == "__main__":
    main()
