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
from nnsae.cli_args import Parser, boolean, check_device, load_model_arg, load_sae_arg, token_count
from nnsae.dashboards.cli import add_dashboard_command
from nnsae.evals import evaluate
from nnsae.extract import extract
from nnsae.harvest import KEEP_FREED_HEAP_ENV, ActivationStore
from nnsae.io.registry import list_pretrained, list_sae_ids
from nnsae.rundir import RunLocked
from nnsae.training import TrainConfig, TrainingDiverged, TrainingInterrupted, train


def cmd_convert(args: argparse.Namespace) -> None:
    if args.to == "circuit-tracer":
        from nnsae.circuits.load import convert_to_circuit_tracer

        print(convert_to_circuit_tracer(args.src, args.dst, dtype=args.dtype))
        return
    sae = load_sae_arg(args.src, dtype=args.dtype, format=args.format)
    dst = Path(args.dst)
    if dst.is_dir() and any(dst.iterdir()) and not args.overwrite:
        raise ValueError(f"{dst} is not empty: refusing to write the converted SAE into it. Use a new or empty "
                         "directory, or --overwrite (replaces cfg.json and the weights there).")
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
    model, tokenizer = load_model_arg(args.model, device=args.device)
    saes = [load_sae_arg(spec, device=args.device) for spec in args.sae]
    records = evaluate(model, saes, args.dataset, tokenizer=tokenizer, n_tokens=args.tokens,
                       n_ce_tokens=args.ce_tokens or None, context_size=args.context_size,
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
        if f.name in ("hook", "hook_out", "device"):  # the command's own flags (hook_out: see _transcoder_configs)
            continue
        flags = ["--" + f.name.replace("_", "-")] + (["--" + aliases[f.name]] if f.name in aliases else [])
        hint = str(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if "bool" in hint:
            parser.add_argument(*flags, type=boolean, default=default, metavar="BOOL", help=f"(default {default})")
        elif "list" in hint:
            parser.add_argument(*flags, type=int, nargs="*", default=default, help=f"(default {default})")
        else:
            integer = "int" in hint and "float" not in hint
            kind = (lambda v: int(float(v))) if integer else float if "float" in hint else str
            parser.add_argument(*flags, type=kind, default=default, help=f"(default {default})")


def cmd_train(args: argparse.Namespace) -> None:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if f.name not in ("hook", "hook_out", "device")}
    values["device"] = args.device
    hooks = list(args.hook or [])
    single = len(hooks) == 1 and not (args.transcoder or args.clt)
    cfgs = [TrainConfig(**{**values, "hook": hook, "skip_connection": False, "name": values["name"] if single else None})
            for hook in hooks]
    transcoder_cfgs, transcoder_hooks = _transcoder_configs(args, values)
    cfgs += transcoder_cfgs
    hooks += [h for h in transcoder_hooks if h not in hooks]
    if not cfgs:
        raise ValueError("Nothing to train: give --hook (one SAE per hook) and/or --transcoder / --clt with --layers.")
    model, tokenizer = load_model_arg(args.model, device=args.device)
    store = ActivationStore(model, hooks, args.dataset, tokenizer=tokenizer, context_size=_context_size(args),
                            batch_size_tokens=args.batch_size_tokens, split=args.split or "train")
    saes = train(model, cfgs, store, args.out, resume=args.resume, overwrite=args.overwrite)
    for name in saes:
        print(f"Wrote {Path(args.out) / name}")


def _transcoder_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "transcoders", "MLP transcoders: each layer's MLP input (blocks.L.mlp.hook_in) encoded to predict its MLP "
        "output (blocks.L.hook_mlp_out); every other option applies to them as to SAEs (--skip-connection true adds "
        "W_skip to per-layer transcoders)")
    group.add_argument("--transcoder", action="store_true", help="one per-layer transcoder per layer of --layers")
    group.add_argument("--clt", action="store_true", help="one cross-layer transcoder over --layers (0..n-1; "
                                                          "architecture topk or jumprelu)")
    group.add_argument("--layers", default=None, help="layers, e.g. 0-29 or 0,4,8-11")


def _transcoder_configs(args: argparse.Namespace, values: dict) -> tuple[list[TrainConfig], list[str]]:
    """(configs, store hooks) of the transcoders the command asks for."""
    if not (args.transcoder or args.clt):
        if args.layers is not None:
            raise ValueError("--layers is for --transcoder / --clt.")
        return [], []
    if args.layers is None:
        raise ValueError("--transcoder / --clt need --layers (e.g. --layers 0-29).")
    layers = []
    for part in args.layers.split(","):
        first, _, last = part.strip().partition("-")
        layers += list(range(int(first), int(last or first) + 1))
    ins, outs = [f"blocks.{i}.mlp.hook_in" for i in layers], [f"blocks.{i}.hook_mlp_out" for i in layers]
    cfgs = [TrainConfig(**{**values, "hook": i, "hook_out": o, "name": None}) for i, o in zip(ins, outs)] \
        if args.transcoder else []
    if args.clt:
        cfgs.append(TrainConfig(**{**values, "hook": ins, "hook_out": outs, "skip_connection": False,
                                   "name": None if args.transcoder else values["name"]}))
    return cfgs, [h for pair in zip(ins, outs) for h in pair]


def cmd_extract(args: argparse.Namespace) -> None:
    model, tokenizer = load_model_arg(args.model, device=args.device)
    saes = [load_sae_arg(spec, device=args.device) for spec in args.sae]
    out = extract(model, saes, args.dataset, args.out, tokenizer=tokenizer, context_size=_context_size(args),
                  batch_size_prompts=args.batch_size_prompts, top_k=args.top_k or None, threshold=args.threshold,
                  n_tokens=args.tokens, split=args.split or "train",
                  overwrite=args.overwrite)
    print(f"Wrote {out}")


def _context_size(args: argparse.Namespace) -> int:
    return 128 if args.context_size is None else args.context_size  # 0 is an error to report, not "the default"


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
    parser = Parser(prog="nnsae", description="Sparse autoencoders on Hugging Face models.")
    parser.add_argument("--debug", action="store_true", help="show the full Python traceback of an error (this flag "
                                                             "may also follow the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="write any supported SAE format as a SAELens-layout directory")
    p.add_argument("src", help="SAE directory (SAELens, Gemma Scope 1/2, Llama Scope, sparsify, dictionary_learning) "
                               "or RELEASE:SAE_ID")
    p.add_argument("dst", help="output directory")
    p.add_argument("--format", default=None, help="source format (default: detected)")
    p.add_argument("--dtype", default=None, help="cast weights, e.g. bfloat16")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.add_argument("--to", choices=("saelens", "circuit-tracer"), default="saelens",
                   help="circuit-tracer: every layer's transcoder under SRC (a training run, or any directory "
                        "nnsae.circuits.load_transcoders reads) as one transcoder_set / cross_layer_transcoder dir")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("list", help="list pretrained SAE releases, or the SAE ids of one release")
    p.add_argument("filter", nargs="?", default=None, help="substring or glob of release / repo / model")
    p.add_argument("--release", default=None, help="print the SAE ids of this release")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("train", help="harvest activations and train SAEs (several hooks share one model pass)")
    _model_arguments(p)
    p.add_argument("--hook", action="append", help="HF module path or TransformerLens hook name "
                                                    "(repeatable: one SAE per hook)")
    p.add_argument("--batch-size-tokens", type=int, default=4096)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds (another run, or files "
                                                            "nnsae did not write)")
    _train_config_arguments(p)
    _transcoder_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="SAELens metrics (L0, explained variance, CE/KL scores, ...) of SAEs")
    _model_arguments(p)
    p.add_argument("--sae", action="append", required=True, help="SAE directory or RELEASE:SAE_ID (repeatable; "
                                                                  "SAEs share one harvest pass)")
    p.add_argument("--tokens", type=token_count(1), default=100_000, help="tokens for the activation metrics")
    p.add_argument("--ce-tokens", type=token_count(0), default=20_000, help="tokens for CE/KL (0 skips them)")
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
    p.add_argument("--tokens", type=token_count(1), default=None,
                   help="stop after this many tokens (default: whole dataset)")
    p.add_argument("--top-k", type=int, default=64, help="features kept per token (0: all above --threshold)")
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--batch-size-prompts", type=int, default=8)
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds (another extraction, or files "
                                                            "nnsae did not write)")
    p.set_defaults(func=cmd_extract)

    add_dashboard_command(sub)
    add_attribute_command(sub)
    return parser


# Errors a user can cause (bad arguments, files, devices, a busy or foreign --out): one line on stderr, exit code 1.
# Anything else is a bug and keeps its traceback.
ANTICIPATED = (ValueError, OSError, ImportError, RunLocked, TrainingDiverged, torch.cuda.OutOfMemoryError)


def _one_line(error: BaseException) -> str:
    """The error on one line, with the library's keyword advice given as the command's flags."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text.replace("overwrite=True", "--overwrite").replace("train(..., resume=True)", "--resume").replace(
        "resume=True", "--resume")


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault(KEEP_FREED_HEAP_ENV, "1")  # this process is nnsae's own (see nnsae.harvest)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        if hasattr(args, "device"):
            check_device(args.device)
        args.func(args)
    except TrainingInterrupted:
        if debug:
            raise
        print(f"nnsae train: interrupted; a checkpoint was written to {args.out}. Run the same command with --resume "
              "to continue.", file=sys.stderr)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print("nnsae: interrupted.", file=sys.stderr)
        raise SystemExit(130) from None
    except ANTICIPATED as e:
        if debug:
            raise
        print(f"error: {_one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
