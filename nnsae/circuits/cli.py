"""`nnsae attribute`: an attribution graph from the command line.

    nnsae attribute --model smollm2 --transcoders PATH --prompt "The capital of France is" --out graphs/ \\
        [--max-feature-nodes N] [--batch-size B] [--node-threshold 0.8] [--edge-threshold 0.98] [--slug NAME] \\
        [--extraction DIR]

Writes `{slug}.pt` (`Graph.to_pt`), `{slug}.json` + `graph-metadata.json` (Neuronpedia's files, as circuit-tracer's
`create_graph_files`) and `{slug}.html` (the offline viewer) into `--out`. `add_attribute_command(subparsers)`
registers it on the `nnsae` parser (see `nnsae.cli.build_parser`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nnsae.circuits.attribution import attribute
from nnsae.circuits.files import create_graph_files, sanitize_slug
from nnsae.circuits.load import load_transcoders
from nnsae.circuits.viewer import write_viewer
from nnsae.config import parse_dtype
from nnsae.models import load_model

__all__ = ["add_attribute_command", "cmd_attribute"]


def cmd_attribute(args: argparse.Namespace) -> None:
    out = Path(args.out)
    slug = sanitize_slug(args.slug or args.prompt[:40])
    transcoders = load_transcoders(args.transcoders, device=args.device, dtype=parse_dtype(args.dtype))
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    graph = attribute(model, args.prompt, transcoders, max_n_logits=args.max_n_logits,
                      desired_logit_prob=args.desired_logit_prob, max_feature_nodes=args.max_feature_nodes,
                      batch_size=args.batch_size, update_interval=args.update_interval, verbose=args.verbose,
                      tokenizer=tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    graph.to_pt(out / f"{slug}.pt")
    json_path = create_graph_files(graph, slug, out, node_threshold=args.node_threshold,
                                   edge_threshold=args.edge_threshold, tokenizer=tokenizer)
    page = write_viewer(graph, out / f"{slug}.html", node_threshold=args.node_threshold,
                        edge_threshold=args.edge_threshold, tokenizer=tokenizer, extraction=args.extraction)
    print(f"Graph: {out / f'{slug}.pt'} ({len(graph.selected_features)} feature nodes of "
          f"{len(graph.active_features)} active, {len(graph.logit_tokens)} logits)")
    print(f"Neuronpedia file: {json_path}")
    print(f"Viewer: {page.resolve()} (open it in a browser; it works offline)")


def add_attribute_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `attribute` to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "attribute", help="build the attribution graph of a prompt through transcoders (circuit-tracer's graphs)",
        description="Attribute a prompt's next-token logits through per-layer transcoders or a cross-layer "
                    "transcoder and write the graph (.pt), Neuronpedia's graph files (.json) and an offline viewer "
                    "(.html).")
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded, offline) or an HF model id / local path "
                                                      "(default: smollm2)")
    p.add_argument("--transcoders", required=True, metavar="PATH",
                   help="transcoder folder (circuit-tracer transcoder_set / cross_layer_transcoder, SAELens "
                        "transcoders) or hub id")
    p.add_argument("--prompt", required=True, help="the prompt (a BOS is prepended as circuit-tracer does)")
    p.add_argument("--out", default="graphs", help="output directory (default: graphs/)")
    p.add_argument("--slug", default=None, help="name of the graph files (default: from the prompt)")
    p.add_argument("--max-feature-nodes", type=int, default=None,
                   help="attribute at most this many features, chosen by logit influence (default: all active)")
    p.add_argument("--batch-size", type=int, default=256, help="targets per backward pass (default: 256)")
    p.add_argument("--max-n-logits", type=int, default=10, help="most logit targets (default: 10)")
    p.add_argument("--desired-logit-prob", type=float, default=0.95,
                   help="stop adding logit targets once they cover this probability (default: 0.95)")
    p.add_argument("--update-interval", type=int, default=4,
                   help="re-rank features every this many batches (default: 4)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="pruning: node influence kept (default: 0.8)")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="pruning: edge influence kept (default: 0.98)")
    p.add_argument("--extraction", default=None, metavar="DIR",
                   help="an `nnsae extract` output of the transcoders' features: the viewer shows their "
                        "top-activating examples")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype (default: float32)")
    p.add_argument("--verbose", action="store_true", help="log progress")
    p.set_defaults(func=cmd_attribute)
    return p
