"""`nnsae dashboard`: the feature dashboard from the command line.

    nnsae dashboard --model smollm2 --sae PATH_OR_RELEASE:ID --dataset offline --tokens 200000 --features 0-99 \\
        --out dash/ [--from-extraction DIR]

`add_dashboard_command(subparsers)` registers it on the `nnsae` parser (see `nnsae.cli.build_parser`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nnsae.cli_args import load_model_arg, load_sae_arg, token_count
from nnsae.dashboards.build import dashboard


def cmd_dashboard(args: argparse.Namespace) -> None:
    model, tokenizer = load_model_arg(args.model, device=args.device, dtype=args.dtype)
    saes = [load_sae_arg(spec, device=args.device) for spec in args.sae]
    site = dashboard(model, saes if len(saes) > 1 else saes[0], dataset=args.dataset, out=args.out,
                     features=args.features, n_tokens=args.tokens, from_extraction=args.from_extraction,
                     tokenizer=tokenizer, context_size=args.context_size, batch_size_prompts=args.batch_size,
                     n_top_contexts=args.top_contexts, context_window=args.window, n_quantiles=args.quantiles,
                     n_per_quantile=args.per_quantile, exclude_special_tokens=args.exclude_special_tokens,
                     progress=not args.quiet, overwrite=args.overwrite)
    print(f"Dashboard: {Path(site).resolve()} (open it in a browser; it works offline)")


def add_dashboard_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `dashboard` to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "dashboard", help="build a static feature dashboard (HTML + JSON) for one or more SAEs",
        description="Run one extraction pass over the dataset (or reuse one) and write a self-contained static site: "
                    "index.html (searchable, sortable feature list) and features/{i}.html per feature, plus JSON.")
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded, offline) or an HF model id / local path "
                                                      "(default: smollm2)")
    p.add_argument("--sae", action="append", required=True, metavar="PATH_OR_RELEASE:ID",
                   help="SAE directory (any supported format) or RELEASE:SAE_ID; repeat for several SAEs")
    p.add_argument("--dataset", default="offline", help="'offline', a local .txt/.jsonl/.parquet file or folder, or an "
                                                        "HF dataset name (default: offline)")
    p.add_argument("--tokens", type=token_count(1), default=200_000, help="tokens to analyse (default: 200000)")
    p.add_argument("--features", default=100, help="features to show: '0-99', '3,7,10-20' or 'all' "
                                                   "(default: the first 100, or all of a smaller SAE)")
    p.add_argument("--out", default="dashboard", help="output directory (default: dashboard/)")
    p.add_argument("--from-extraction", default=None, metavar="DIR",
                   help="use an existing `nnsae extract` output instead of running the model over the dataset")
    p.add_argument("--context-size", type=int, default=128, help="tokens per context chunk (default: 128)")
    p.add_argument("--batch-size", type=int, default=8, help="chunks per forward pass (default: 8)")
    p.add_argument("--top-contexts", type=int, default=20, help="top activating contexts per feature (default: 20)")
    p.add_argument("--window", type=int, default=16, help="tokens shown either side of an activation (default: 16)")
    p.add_argument("--quantiles", type=int, default=5, help="activation quantile groups (default: 5)")
    p.add_argument("--per-quantile", type=int, default=5, help="examples per quantile group (default: 5)")
    p.add_argument("--exclude-special-tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="leave BOS/EOS/PAD/SEP out of the statistics (default; --no-exclude-special-tokens counts them)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype (default: float32)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out that is not an earlier "
                                                            "dashboard (files with the dashboard's names are replaced)")
    p.set_defaults(func=cmd_dashboard)
    return p


__all__ = ["add_dashboard_command", "cmd_dashboard"]
