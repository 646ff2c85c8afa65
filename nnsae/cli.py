"""`nnsae` command line: one subcommand per job, argparse, HF-style flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

import torch

from nnsae.circuits.cli import add_attribute_command
from nnsae.cli_args import load_sae_arg
from nnsae.dashboards.cli import add_dashboard_command
from nnsae.evals import evaluate
from nnsae.extract import extract
from nnsae.harvest import KEEP_FREED_HEAP_ENV, ActivationStore
from nnsae.io.registry import list_pretrained, list_sae_ids
from nnsae.models import load_model
from nnsae.training import TrainConfig, train


def cmd_convert(args: argparse.Namespace) -> None:
    sae = load_sae_arg(args.src, dtype=args.dtype, format=args.format)
    weights, cfg = sae.save_model(args.dst)
    print(f"Wrote {sae.cfg.architecture} SAE (d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}) in SAELens layout: "
          f"{cfg}, {weights}")


def cmd_list(args: argparse.Namespace) -> None:
    if args.release:
        print("\n".join(list_sae_ids(args.release)))
        return
    rows = list_pretrained(args.filter)
    width = max((len(r.release) for r in rows), default=10)
    for r in rows:
        print(f"{r.release:<{width}}  {r.format:<19} {r.n_saes:>6}  {r.model}  ({r.repo_id})")


def cmd_eval(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args.model, device=args.device)
    saes = [load_sae_arg(spec, device=args.device) for spec in args.sae]
    records = evaluate(model, saes, args.dataset, tokenizer=tokenizer, n_tokens=int(args.tokens),
                       n_ce_tokens=int(args.ce_tokens) if args.ce_tokens else None, context_size=args.context_size,
                       batch_size_prompts=args.batch_size_prompts, split=args.split, out=args.out, plots=args.plots)
    for spec, record in zip(args.sae, records):
        m = record["metrics"]
        line = f"{spec}: L0 {m['sparsity']['l0']:.2f}, explained variance " \
               f"{m['reconstruction_quality']['explained_variance']:.4f}"
        if "model_performance_preservation" in m:
            line += f", CE loss score {m['model_performance_preservation']['ce_loss_score']:.4f}, " \
                    f"KL score {m['model_behavior_preservation']['kl_div_score']:.4f}"
        print(line)
    print(f"Wrote {args.out}")


# Short spellings of TrainConfig fields used on the command line (the long ones work too).
TRAIN_ALIASES = {"arch": "architecture", "expansion": "expansion_factor", "tokens": "training_tokens"}


def _train_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (`--l1-coefficient`, ...), typed from the dataclass."""
    aliases = {v: k for k, v in TRAIN_ALIASES.items()}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("hook", "device"):  # --hook and --device are the command's own
            continue
        flags = ["--" + f.name.replace("_", "-")] + (["--" + aliases[f.name]] if f.name in aliases else [])
        hint = str(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if "bool" in hint:
            kind = lambda v: v.lower() in ("1", "true", "yes")  # noqa: E731
            parser.add_argument(*flags, type=kind, default=default, metavar="BOOL", help=f"(default {default})")
        elif "list" in hint:
            parser.add_argument(*flags, type=int, nargs="*", default=default, help=f"(default {default})")
        else:
            integer = "int" in hint and "float" not in hint
            kind = (lambda v: int(float(v))) if integer else float if "float" in hint else str
            parser.add_argument(*flags, type=kind, default=default, help=f"(default {default})")


def cmd_train(args: argparse.Namespace) -> None:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in ("hook", "device")}
    values["device"] = args.device
    cfgs = [TrainConfig(**{**values, "hook": hook, "name": values["name"] if len(args.hook) == 1 else None})
            for hook in args.hook]
    model, tokenizer = load_model(args.model, device=args.device)
    store = ActivationStore(model, args.hook, args.dataset, tokenizer=tokenizer, context_size=args.context_size or 128,
                            batch_size_tokens=args.batch_size_tokens, split=args.split or "train")
    saes = train(model, cfgs, store, args.out, resume=args.resume)
    for name in saes:
        print(f"Wrote {Path(args.out) / name}")


def cmd_extract(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args.model, device=args.device)
    saes = [load_sae_arg(spec, device=args.device) for spec in args.sae]
    out = extract(model, saes, args.dataset, args.out, tokenizer=tokenizer, context_size=args.context_size or 128,
                  batch_size_prompts=args.batch_size_prompts, top_k=args.top_k or None, threshold=args.threshold,
                  n_tokens=int(args.tokens) if args.tokens else None, split=args.split or "train")
    print(f"Wrote {out}")


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded, offline), an HF model id or a local path")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dataset", default="offline", help="'offline', a local .txt/.jsonl/.parquet path, or an HF "
                                                        "dataset name")
    p.add_argument("--split", default=None)
    p.add_argument("--context-size", type=int, default=None)


def _cuda() -> bool:
    return torch.cuda.is_available()


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

    p = sub.add_parser("train", help="harvest activations and train SAEs (several hooks share one model pass)")
    _model_arguments(p)
    p.add_argument("--hook", action="append", required=True, help="HF module path or TransformerLens hook name "
                                                                   "(repeatable: one SAE per hook)")
    p.add_argument("--batch-size-tokens", type=int, default=4096)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    _train_config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="SAELens metrics (L0, explained variance, CE/KL scores, ...) of SAEs")
    _model_arguments(p)
    p.add_argument("--sae", action="append", required=True, help="SAE directory or RELEASE:SAE_ID (repeatable; "
                                                                  "SAEs share one harvest pass)")
    p.add_argument("--tokens", type=float, default=100_000, help="tokens for the activation metrics")
    p.add_argument("--ce-tokens", type=float, default=20_000, help="tokens for CE/KL (0 skips them)")
    p.add_argument("--batch-size-prompts", type=int, default=8)
    p.add_argument("--out", default="eval.json", help="a .json file, or a folder for one JSON per SAE")
    p.add_argument("--plots", action="store_true", help="also write L0 and feature-density histograms (PNG)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("extract", help="per-token sparse features of SAEs over a dataset (sharded parquet, "
                                       "resumable) plus per-feature statistics")
    _model_arguments(p)
    p.add_argument("--sae", action="append", required=True, help="SAE directory or RELEASE:SAE_ID (repeatable; "
                                                                  "one model pass for all)")
    p.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    p.add_argument("--tokens", type=float, default=None, help="stop after this many tokens (default: whole dataset)")
    p.add_argument("--top-k", type=int, default=64, help="features kept per token (0: all above --threshold)")
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--batch-size-prompts", type=int, default=8)
    p.set_defaults(func=cmd_extract)

    add_dashboard_command(sub)
    add_attribute_command(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault(KEEP_FREED_HEAP_ENV, "1")  # this process is nnsae's own (see nnsae.harvest)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
