"""A static, offline viewer of an attribution graph: one self-contained HTML file.

`write_viewer(graph, "graph.html")` prunes the graph as `create_graph_files` does (same nodes, same edges) and writes
one page with its CSS and script inline (package data in `nnsae/circuits/static/`), the graph as JSON in a
`<script type="application/json">` block, and a Content-Security-Policy that forbids every network load and runs
only that script (by its sha256). Nodes sit by layer (rows: token embeddings at the bottom, logits at the top) and
prompt position (columns); hovering a node shows its feature, activation, influence and, when an `nnsae.extract`
directory of the transcoders is given, its top-activating examples; clicking a node highlights its edges.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from nnsae.circuits.graph import Graph
from nnsae.circuits.prune import prune_graph
from nnsae.dashboards.render import csp, esc, json_for_script
from nnsae.extract import Extraction

__all__ = ["viewer_html", "write_viewer"]


def _static(name: str) -> str:
    return resources.files("nnsae.circuits").joinpath("static").joinpath(name).read_text(encoding="utf-8")


def write_viewer(graph: Graph | str | Path, path: str | Path, node_threshold: float = 0.8,
                 edge_threshold: float = 0.98, tokenizer: Any = None, extraction: str | Path | None = None,
                 extraction_saes: Mapping[int, str] | None = None, n_examples: int = 5,
                 title: str | None = None) -> Path:
    """Write the viewer of `graph` (or a `Graph.to_pt` file) to `path` (an .html file); returns the path.

    `tokenizer` decodes tokens (default: the graph's `cfg.tokenizer_name`, loaded from the HF cache).
    `extraction`: an `nnsae.extract` directory holding the transcoders' features (one SAE per layer, e.g. each
    transcoder's encoder as an SAE on the MLP input); `extraction_saes` maps layer → SAE name in it (default: each
    SAE's layer is the number in its hook name). `n_examples` top-activating examples are shown per feature."""
    if not isinstance(graph, Graph):
        graph = Graph.from_pt(graph)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(graph.cfg.tokenizer_name)
    page = viewer_html(graph, node_threshold, edge_threshold, tokenizer, extraction, extraction_saes, n_examples,
                       title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def viewer_html(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98, tokenizer: Any = None,
                extraction: str | Path | None = None, extraction_saes: Mapping[int, str] | None = None,
                n_examples: int = 5, title: str | None = None) -> str:
    """The viewer page of `graph` as a string (see `write_viewer`)."""
    decode = (lambda i: tokenizer.decode([int(i)])) if tokenizer is not None else (lambda i: f"<{int(i)}>")
    node_mask, edge_mask, cumulative = (t.cpu() for t in prune_graph(graph, node_threshold, edge_threshold))
    nodes = _nodes(graph, node_mask, cumulative, decode)
    targets, sources = edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency_matrix.cpu()[targets, sources].tolist()
    kept = [(s, t, w) for s, t, w in zip(sources.tolist(), targets.tolist(), weights) if s in nodes and t in nodes]
    connected = {s for s, _, _ in kept} | {t for _, t, _ in kept}
    order = [i for i in sorted(nodes) if i in connected or nodes[i]["kind"] in ("embedding", "logit")]
    slot = {index: k for k, index in enumerate(order)}
    has_examples = extraction is not None
    if has_examples:
        _attach_examples([nodes[i] for i in order], extraction, extraction_saes, n_examples, decode)
    prompt = [decode(t) for t in graph.input_tokens.tolist()]
    title = title or f"Attribution graph: {''.join(prompt)!r}"
    data = {"title": title, "n_layers": graph.cfg.n_layers, "prompt_tokens": prompt, "has_examples": has_examples,
            "node_threshold": node_threshold, "edge_threshold": edge_threshold,
            "nodes": [nodes[i] for i in order],
            "links": [{"s": slot[s], "t": slot[t], "w": w} for s, t, w in kept]}
    script = _static("viewer.js")
    meta = (f"{graph.cfg.model_name or 'model'} · {len(order)} nodes, {len(kept)} edges after pruning (node threshold "
            f"{node_threshold}, edge threshold {edge_threshold})")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{esc(csp(script))}">'
            f'<meta name="referrer" content="no-referrer">'
            f"<title>{esc(title)}</title><style>{_static('viewer.css')}</style></head>\n<body>\n"
            f"<header><h1>{esc(title)}</h1><div class=\"meta\">{esc(meta)}</div></header>\n"
            f'<main><div id="canvas"></div><aside id="details"></aside></main><div id="tooltip"></div>\n'
            f'<script type="application/json" id="graph-data">{json_for_script(data)}</script>\n'
            f"<script>{script}</script></body></html>\n")


def _nodes(graph: Graph, node_mask: torch.Tensor, cumulative: torch.Tensor, decode: Any) -> dict[int, dict]:
    """The kept nodes by adjacency index: circuit-tracer's `node_id` (see `nnsae.circuits.files`) and a unique `id`
    (kind:node_id) that the page uses."""
    n_features = len(graph.selected_features)
    n_layers, n_pos = graph.cfg.n_layers, graph.n_pos
    error_end = n_features + n_pos * n_layers
    token_end = error_end + n_pos
    nodes: dict[int, dict] = {}
    for index in node_mask.nonzero().flatten().tolist():
        influence = float(cumulative[index])
        if index < n_features:
            active = int(graph.selected_features[index])
            layer, pos, feature = graph.active_features[active].tolist()
            nodes[index] = {"node_id": f"{layer}_{feature}_{pos}", "kind": "feature", "layer": layer, "pos": pos,
                            "feature": feature, "activation": float(graph.activation_values[active]),
                            "influence": influence, "label": f"L{layer} feature {feature} @ {pos}"}
        elif index < error_end:
            layer, pos = divmod(index - n_features, n_pos)
            nodes[index] = {"node_id": f"0_{layer}_{pos}", "kind": "error", "layer": layer, "pos": pos,
                            "influence": influence, "label": f"L{layer} error @ {pos}"}
        elif index < token_end:
            pos = index - error_end
            token = int(graph.input_tokens[pos])
            nodes[index] = {"node_id": f"E_{token}_{pos}", "kind": "embedding", "layer": -1, "pos": pos,
                            "influence": influence, "label": f"token {decode(token)!r} @ {pos}"}
        else:
            i = index - token_end
            label, vocab_idx = graph.logit_targets[i]
            nodes[index] = {"node_id": f"{n_layers + 1}_{vocab_idx}_{n_pos - 1}", "kind": "logit", "layer": n_layers,
                            "pos": n_pos - 1, "influence": None,
                            "probability": float(graph.logit_probabilities[i]), "label": f"logit {label!r}"}
    for node in nodes.values():  # circuit-tracer's node ids can collide (layer-0 features with error nodes)
        node["id"] = f"{node['kind']}:{node['node_id']}"
    return nodes


def _layer_of(hook: str) -> int | None:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", hook or "")
    return int(match.group(1)) if match else None


def _attach_examples(nodes: list[dict], extraction_dir: str | Path, extraction_saes: Mapping[int, str] | None,
                     n_examples: int, decode: Any) -> None:
    """Add each feature node's top-activating examples (token windows with activations) from the extraction."""
    extraction = Extraction(extraction_dir)
    if extraction_saes is None:
        extraction_saes = {}
        for name in extraction.sae_names:
            layer = _layer_of(str(extraction.sae(name).get("hook", "")))
            if layer is not None:
                extraction_saes.setdefault(layer, name)
    stats: dict[int, dict[str, Any]] = {}
    for node in nodes:
        if node["kind"] != "feature" or node["layer"] not in extraction_saes:
            continue
        layer = node["layer"]
        if layer not in stats:
            stats[layer] = extraction.stats(extraction_saes[layer])
        s = stats[layer]
        if node["feature"] >= s["top_values"].shape[0]:
            raise ValueError(f"The extraction's SAE {extraction_saes[layer]!r} has {s['top_values'].shape[0]} "
                             f"features but the graph has feature {node['feature']} at layer {layer}: it is not "
                             "an extraction of these transcoders.")
        examples = []
        for j in range(s["top_values"].shape[1]):
            if len(examples) == n_examples or not torch.isfinite(s["top_values"][node["feature"], j]):
                break
            tokens = s["top_tokens"][node["feature"], j].tolist()
            acts = s["top_acts"][node["feature"], j].tolist()
            inside = [k for k, t in enumerate(tokens) if t >= 0]
            centre = len(tokens) // 2
            if centre not in inside:
                continue
            examples.append({"tokens": [decode(tokens[k]) for k in inside], "acts": [float(acts[k]) for k in inside],
                             "max": inside.index(centre)})
        node["examples"] = examples
