"""Encode + decode throughput per architecture against bare matmuls: `x @ W_enc` alone (the limit for TopK SAEs,
whose decoder reads only k rows of W_dec) and `x @ W_enc` then `f @ W_dec` (the limit for the dense architectures).
Measured as `sae(x)` (the reconstruction; TopK SAEs take their sparse path there) and as `sae.decode(sae.encode(x))`
(dense features in between, then the dense decoder).

Run: `python -m benchmarks.encode_decode [--d-sae 16384] [--batch 4096]`.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleaved_times, machine_line, markdown_table
from nnsae import SAE, SAEConfig

ARCHS = ["standard", "gated", "jumprelu", "topk", "abstopk", "transcoder", "skip_transcoder", "jumprelu_transcoder"]


def run(d_in: int = 576, d_sae: int = 16384, batch: int = 4096, k: int = 32, repeats: int = 5,
        archs: list[str] | None = None) -> str:
    torch.manual_seed(0)
    x = torch.randn(batch, d_in)
    rows = []
    for arch in archs or ARCHS:
        kw = dict(apply_b_dec_to_input=False, d_out=d_in) if "transcoder" in arch else {}
        sae = SAE.from_config(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k, **kw))  # as users load one
        with torch.inference_mode():
            W_enc, W_dec = sae.W_enc.detach(), sae.W_dec.detach()
            f = torch.relu(x @ W_enc)
            t = interleaved_times({
                "encoder": lambda: x @ W_enc,
                "bare": lambda: (x @ W_enc, f @ W_dec),
                "forward": lambda: sae(x),
                "dense": lambda: sae.decode(sae.encode(x)),
            }, repeats=repeats)
            rows.append([arch, f"{batch / t['encoder']:,.0f}", f"{batch / t['bare']:,.0f}",
                         f"{batch / t['forward']:,.0f}", f"{batch / t['dense']:,.0f}",
                         f"{t['encoder'] / t['forward']:.2f}×", f"{t['bare'] / t['forward']:.2f}×",
                         f"{t['bare'] / t['dense']:.2f}×"])
    header = ["architecture", "x @ W_enc tok/s", "both matmuls tok/s", "sae(x) tok/s", "decode(encode(x)) tok/s",
              "sae(x) / x @ W_enc", "sae(x) / both matmuls", "decode(encode(x)) / both matmuls"]
    return (f"Encode + decode, d_in {d_in}, d_sae {d_sae}, batch {batch} (float32, CPU; {machine_line()})\n\n"
            + markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--archs", nargs="*", default=None, help=f"subset of {ARCHS}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(run(args.d_in, args.d_sae, args.batch, repeats=args.repeats, archs=args.archs))


if __name__ == "__main__":
    main()
