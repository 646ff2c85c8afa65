"""Neuronpedia graph files: `{slug}.json` and the `graph-metadata.json` index, as circuit-tracer writes them.

Node encodings (circuit-tracer's `create_graph_files`): a feature (layer L, position p, feature f) is
`node_id "L_f_p"`, `feature` the Cantor pairing of (L, f), `jsNodeId "L_f-0"`; an error node is `"0_L_p"` with
feature -1 and `jsNodeId "L_p-0"`; a token node is `"E_{token id}_p"` with feature p, layer "E",
`jsNodeId "E_{token id}-p"`; a logit node sits at layer n_layers + 1 and the last position, `"{n_layers+1}_{v}_{p}"`,
feature v, `jsNodeId "L_v-p"`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from nnsae.circuits.graph import Graph
from nnsae.circuits.prune import prune_graph

__all__ = ["create_graph_files", "sanitize_slug"]


def sanitize_slug(slug: str) -> str:
    """`slug` reduced to letters, digits, '.', '_' and '-' (others become '-'), never starting with '.'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", slug).lstrip(".")
    if not cleaned:
        raise ValueError(f"Slug {slug!r} has no usable characters; use letters, digits, '.', '_' or '-'.")
    return cleaned


def _node(node_id: str, feature: int, layer: str, ctx_idx: int, feature_type: str, js_node_id: str,
          influence: float | None = None, activation: float | None = None, token_prob: float = 0.0,
          is_target_logit: bool = False, clerp: str = "") -> dict[str, Any]:
    """A node with circuit-tracer's `graph_models.Node` fields, in its order."""
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": ctx_idx, "feature_type": feature_type,
            "token_prob": token_prob, "is_target_logit": is_target_logit, "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": js_node_id, "clerp": clerp, "influence": influence, "activation": activation}


def _nodes(graph: Graph, node_mask: torch.Tensor, cumulative_scores: torch.Tensor) -> dict[int, dict[str, Any]]:
    n_features = len(graph.selected_features)
    n_layers = graph.cfg.n_layers
    error_end = n_features + graph.n_pos * n_layers
    token_end = error_end + graph.n_pos
    nodes = {}
    for index in node_mask.nonzero().flatten().tolist():
        influence = float(cumulative_scores[index])
        if index < n_features:
            active = int(graph.selected_features[index])
            layer, pos, feature = graph.active_features[active].tolist()
            nodes[index] = _node(f"{layer}_{feature}_{pos}", (layer + feature) * (layer + feature + 1) // 2 + feature,
                                 str(layer), pos, "cross layer transcoder", f"{layer}_{feature}-0", influence,
                                 float(graph.activation_values[active]))
        elif index < error_end:
            layer, pos = divmod(index - n_features, graph.n_pos)
            nodes[index] = _node(f"0_{layer}_{pos}", -1, str(layer), pos, "mlp reconstruction error",
                                 f"{layer}_{pos}-0", influence)
        elif index < token_end:
            pos = index - error_end
            token = int(graph.input_tokens[pos])
            nodes[index] = _node(f"E_{token}_{pos}", pos, "E", pos, "embedding", f"E_{token}-{pos}", influence)
        else:
            i = index - token_end
            label, vocab_idx = graph.logit_targets[i]
            prob = float(graph.logit_probabilities[i])
            layer, pos = str(n_layers + 1), graph.n_pos - 1
            nodes[index] = _node(f"{layer}_{vocab_idx}_{pos}", vocab_idx, layer, pos, "logit", f"L_{vocab_idx}-{pos}",
                                 token_prob=prob, is_target_logit=i == 0, clerp=f'Output "{label}" (p={prob:.3f})')
    return nodes


def create_graph_files(graph: Graph | str | Path, slug: str, output_path: str | Path,
                       scan: str | list[str] | None = None, node_threshold: float = 0.8,
                       edge_threshold: float = 0.98, tokenizer: Any = None) -> Path:
    """Prune `graph` (or a `Graph.to_pt` file) and write `{slug}.json` plus the `graph-metadata.json` index into
    `output_path`. `tokenizer` decodes the prompt tokens; by default the graph's `cfg.tokenizer_name` is loaded.
    Returns the graph file's path."""
    if not isinstance(graph, Graph):
        graph = Graph.from_pt(graph)
    slug = sanitize_slug(slug)
    scan = graph.scan if scan is None else scan
    if scan is None:
        raise ValueError("Neither scan= nor graph.scan is set: one must name the transcoders the graph used.")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(graph.cfg.tokenizer_name)
    output = Path(output_path)
    output.mkdir(parents=True, exist_ok=True)

    node_mask, edge_mask, cumulative_scores = (t.cpu() for t in prune_graph(graph, node_threshold, edge_threshold))
    nodes = _nodes(graph, node_mask, cumulative_scores)
    targets, sources = edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency_matrix.cpu()[targets, sources].tolist()
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": w}
             for s, t, w in zip(sources.tolist(), targets.tolist(), weights) if s in nodes and t in nodes]
    connected = {link["source"] for link in links} | {link["target"] for link in links}
    used = [node for node in nodes.values()
            if node["node_id"] in connected or node["feature_type"] in ("embedding", "logit")]

    if isinstance(scan, list):
        transcoder_list = list(scan)
        # circuit-tracer names a list of transcoders by Python's (per-process) str hash; a stable digest here.
        scan = "custom-" + str(int(hashlib.sha256("-".join(scan).encode()).hexdigest()[:15], 16))
    else:
        transcoder_list = []
    metadata = {"slug": slug, "scan": scan, "transcoder_list": transcoder_list,
                "prompt_tokens": [tokenizer.decode(int(t)) for t in graph.input_tokens],
                "prompt": graph.input_string, "node_threshold": node_threshold, "schema_version": 1}
    model = {"metadata": metadata,
             "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
             "nodes": used, "links": links}
    path = output / f"{slug}.json"
    path.write_text(json.dumps(model, indent=2))

    index_path = output / "graph-metadata.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"graphs": []}
    index["graphs"] = [g for g in index["graphs"] if g.get("slug") != slug] + [metadata]
    index_path.write_text(json.dumps(index, indent=2))
    return path
