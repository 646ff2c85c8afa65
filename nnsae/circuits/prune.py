"""Pruning and scoring of attribution graphs, with circuit-tracer's definitions.

Influence is measured on |A| with each row normalised to sum 1, propagated from the logit nodes (weighted by
their probabilities) through all paths: `w A + w A² + ...` (the graph is acyclic, so the series ends).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nnsae.circuits.graph import Graph

__all__ = ["PruneResult", "compute_graph_scores", "compute_influence", "normalize_matrix", "prune_graph"]


def normalize_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """|matrix| with every row scaled to sum 1 (all-zero rows stay zero)."""
    absolute = matrix.abs()
    return absolute / absolute.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(A: torch.Tensor, logit_weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """`w A + w A² + ...` until a term is exactly zero (an acyclic graph)."""
    current = logit_weights @ A
    influence = current
    for _ in range(max_iter):
        if not current.any():
            return influence
        current = current @ A
        influence = influence + current
    raise RuntimeError(f"Influence did not converge after {max_iter} iterations: is the graph acyclic?")


def _logit_weights(graph: Graph) -> torch.Tensor:
    weights = torch.zeros(graph.adjacency_matrix.shape[0], device=graph.adjacency_matrix.device)
    weights[-len(graph.logit_targets):] = graph.logit_probabilities.to(weights)
    return weights


def _threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The smallest score among the top scores that together hold `fraction` of the total."""
    ordered = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(ordered, dim=0) / ordered.sum()
    index = min(int(torch.searchsorted(cumulative, fraction).item()), len(cumulative) - 1)
    return ordered[index]


class PruneResult(NamedTuple):
    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    cumulative_scores: torch.Tensor


def prune_graph(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the nodes holding `node_threshold` of the cumulative logit influence and the edges holding
    `edge_threshold`; token and logit nodes always stay; then drop feature/error nodes left without outgoing
    edges and features without incoming ones, until nothing changes.

    Returns (node_mask [N], edge_mask [N, N], cumulative_scores [N]: each node's cumulative share of influence
    when nodes are sorted by influence, descending).
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0.0 and 1.0, got {value}.")
    n_tokens = len(graph.input_tokens)
    n_logits = len(graph.logit_targets)
    n_features = len(graph.selected_features)
    fixed = n_logits + n_tokens  # token and logit nodes, at the end
    A = graph.adjacency_matrix
    weights = _logit_weights(graph)

    node_influence = compute_influence(normalize_matrix(A), weights)
    node_mask = node_influence >= _threshold(node_influence, node_threshold)
    node_mask[-fixed:] = True

    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_matrix(pruned)
    edge_influence = compute_influence(normalized, weights) + weights
    edge_scores = normalized * edge_influence[:, None]
    edge_mask = edge_scores >= _threshold(edge_scores.flatten(), edge_threshold)

    previous = node_mask.clone()
    node_mask[:-fixed] &= edge_mask[:, :-fixed].any(0)
    node_mask[:n_features] &= edge_mask[:n_features].any(1)
    while not torch.equal(node_mask, previous):
        previous.copy_(node_mask)
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:-fixed] &= edge_mask[:, :-fixed].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)

    ordered, order = torch.sort(node_influence, descending=True)
    cumulative_scores = torch.zeros_like(node_influence)
    cumulative_scores[order] = torch.cumsum(ordered, dim=0) / ordered.sum()
    return PruneResult(node_mask, edge_mask, cumulative_scores)


def compute_graph_scores(graph: Graph) -> tuple[float, float]:
    """(replacement_score, completeness_score).

    replacement: of the influence reaching the logits from token and error nodes, the token share.
    completeness: the influence-weighted (node influence + logit weight) mean over nodes of the share of each
    node's normalised incoming edges that does not come from error nodes.
    """
    n_tokens = len(graph.input_tokens)
    n_features = len(graph.selected_features)
    error_start = n_features
    error_end = error_start + n_tokens * graph.cfg.n_layers
    token_end = error_end + n_tokens
    weights = _logit_weights(graph)
    normalized = normalize_matrix(graph.adjacency_matrix)
    influence = compute_influence(normalized, weights)
    token_influence = influence[error_end:token_end].sum()
    error_influence = influence[error_start:error_end].sum()
    replacement_score = token_influence / (token_influence + error_influence)
    non_error = 1 - normalized[:, error_start:error_end].sum(dim=-1)
    output_influence = influence + weights
    completeness_score = (non_error * output_influence).sum() / output_influence.sum()
    return replacement_score.item(), completeness_score.item()
