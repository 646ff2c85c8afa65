"""Encode + decode throughput per architecture against the bare matmul limit (`x @ W_enc` then `f @ W_dec`).

Run: `python -m benchmarks.encode_decode [--d-sae 16384] [--batch 4096]`.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleaved_times, machine_line, markdown_table
from nnsae import SAE, SAEConfig

ARCHS = ["standard", "gated", "jumprelu", "topk", "abstopk", "transcoder", "skip_transcoder", "jumprelu_transcoder"]


def run(d_in: int = 576, d_sae: int = 16384, batch: int = 4096, k: int = 32, repeats: int = 5) -> str:
    torch.manual_seed(0)
    x = torch.randn(batch, d_in)
    rows = []
    with torch.inference_mode():
        for arch in ARCHS:
            kw = dict(apply_b_dec_to_input=False, d_out=d_in) if "transcoder" in arch else {}
            sae = SAE.from_config(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k, **kw))
            W_enc, W_dec = sae.W_enc.detach(), sae.W_dec.detach()
            f = torch.relu(x @ W_enc)
            t = interleaved_times({
                "bare": lambda: (x @ W_enc, f @ W_dec),
                "sae": lambda: sae.decode(sae.encode(x)),
            }, repeats=repeats)
            rows.append([arch, f"{batch / t['bare']:,.0f}", f"{batch / t['sae']:,.0f}", f"{t['bare'] / t['sae']:.2f}×"])
    header = ["architecture", "bare matmuls tok/s", "SAE encode+decode tok/s", "ratio (SAE / bare)"]
    return (f"Encode + decode, d_in {d_in}, d_sae {d_sae}, batch {batch} (float32, CPU; {machine_line()})\n\n"
            + markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(run(args.d_in, args.d_sae, args.batch, repeats=args.repeats))


if __name__ == "__main__":
    main()
