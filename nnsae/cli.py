"""`nnsae` command line: one subcommand per job, argparse, HF-style flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnsae.saes import SAE


def load_sae_arg(spec: str, device: str = "cpu", dtype: str | None = None, format: str | None = None) -> SAE:
    """An SAE named on the command line: a local directory (any supported format) or `RELEASE:SAE_ID`."""
    if Path(spec).exists():
        return SAE.load_from_disk(spec, device=device, dtype=dtype, format=format)
    release, sep, sae_id = spec.partition(":")
    if not sep:
        raise SystemExit(f"error: {spec!r} is neither an existing directory nor RELEASE:SAE_ID.")
    return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype or "float32")


def cmd_convert(args: argparse.Namespace) -> None:
    sae = load_sae_arg(args.src, dtype=args.dtype, format=args.format)
    weights, cfg = sae.save_model(args.dst)
    print(f"Wrote {sae.cfg.architecture} SAE (d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}) in SAELens layout: "
          f"{cfg}, {weights}")


def cmd_list(args: argparse.Namespace) -> None:
    from nnsae.io.registry import list_pretrained, list_sae_ids

    if args.release:
        print("\n".join(list_sae_ids(args.release)))
        return
    rows = list_pretrained(args.filter)
    width = max((len(r.release) for r in rows), default=10)
    for r in rows:
        print(f"{r.release:<{width}}  {r.format:<19} {r.n_saes:>6}  {r.model}  ({r.repo_id})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnsae", description="Sparse autoencoders on Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="write any supported SAE format as a SAELens-layout directory")
    p.add_argument("src", help="SAE directory (SAELens, Gemma Scope 1/2, Llama Scope, sparsify, dictionary_learning) "
                               "or RELEASE:SAE_ID")
    p.add_argument("dst", help="output directory")
    p.add_argument("--format", default=None, help="source format (default: detected)")
    p.add_argument("--dtype", default=None, help="cast weights, e.g. bfloat16")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("list", help="list pretrained SAE releases, or the SAE ids of one release")
    p.add_argument("filter", nargs="?", default=None, help="substring or glob of release / repo / model")
    p.add_argument("--release", default=None, help="print the SAE ids of this release")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
