"""The attribution graph: circuit-tracer's `Graph` fields and node order, saved with plain types only.

Node order (rows and columns of `adjacency_matrix`, rows are targets): the selected features (indices into
`active_features`, sorted), then the error nodes layer-major (`n_features + layer * n_pos + pos`), then one token
node per position, then the logit nodes in `logit_targets` order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = ["Graph", "GraphConfig", "LogitTarget"]


class LogitTarget(NamedTuple):
    """A logit node: its decoded token and its vocabulary index."""

    token_str: str
    vocab_idx: int


@dataclass
class GraphConfig:
    """The model facts a graph needs (circuit-tracer's `UnifiedConfig` field names)."""

    n_layers: int
    d_model: int
    d_vocab: int
    tokenizer_name: str
    model_name: str
    original_architecture: str
    n_heads: int | None = None
    d_head: int | None = None
    d_mlp: int | None = None
    n_key_value_heads: int | None = None

    @classmethod
    def from_hf(cls, config: Any, n_layers: int, d_vocab: int) -> GraphConfig:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_heads = getattr(text, "num_attention_heads", None)
        d_model = text.hidden_size
        name = getattr(config, "name_or_path", "") or ""
        architectures = getattr(config, "architectures", None) or [type(config).__name__]
        return cls(
            n_layers=n_layers, d_model=d_model, d_vocab=d_vocab, tokenizer_name=name, model_name=name,
            original_architecture=architectures[0], n_heads=n_heads,
            d_head=getattr(text, "head_dim", None) or (d_model // n_heads if n_heads else None),
            d_mlp=getattr(text, "intermediate_size", None),
            n_key_value_heads=getattr(text, "num_key_value_heads", None),
        )


class Graph:
    """Direct effects between the nodes of a prompt's local replacement model (see the module docstring)."""

    def __init__(self, input_string: str, input_tokens: torch.Tensor, active_features: torch.Tensor,
                 adjacency_matrix: torch.Tensor, cfg: GraphConfig | dict[str, Any], selected_features: torch.Tensor,
                 activation_values: torch.Tensor, logit_targets: list[LogitTarget] | list[tuple[str, int]],
                 logit_probabilities: torch.Tensor, scan: str | list[str] | None = None,
                 vocab_size: int | None = None):
        self.input_string = input_string
        self.input_tokens = input_tokens
        self.active_features = active_features
        self.adjacency_matrix = adjacency_matrix
        self.cfg = cfg if isinstance(cfg, GraphConfig) else GraphConfig(**cfg)
        self.selected_features = selected_features
        self.activation_values = activation_values
        self.logit_targets = [LogitTarget(str(t), int(i)) for t, i in logit_targets]
        self.logit_probabilities = logit_probabilities
        self.scan = scan
        self.vocab_size = vocab_size if vocab_size is not None else self.cfg.d_vocab
        self.n_pos = len(input_tokens)

    @property
    def logit_token_ids(self) -> torch.Tensor:
        """The logit nodes' vocabulary indices."""
        return torch.tensor([t.vocab_idx for t in self.logit_targets], dtype=torch.long)

    @property
    def logit_tokens(self) -> torch.Tensor:
        """The logit nodes' vocabulary indices (circuit-tracer's older name for `logit_token_ids`)."""
        return self.logit_token_ids

    def to(self, device: str | torch.device) -> Graph:
        self.adjacency_matrix = self.adjacency_matrix.to(device)
        self.active_features = self.active_features.to(device)
        self.logit_probabilities = self.logit_probabilities.to(device)
        return self

    def to_pt(self, path: str | Path) -> None:
        """Save with tensors and plain Python values only, so `from_pt` can load it with `weights_only=True`."""
        torch.save({
            "input_string": self.input_string,
            "input_tokens": self.input_tokens,
            "active_features": self.active_features,
            "adjacency_matrix": self.adjacency_matrix,
            "cfg": asdict(self.cfg),
            "selected_features": self.selected_features,
            "activation_values": self.activation_values,
            "logit_targets": [tuple(t) for t in self.logit_targets],
            "logit_probabilities": self.logit_probabilities,
            "scan": self.scan,
            "vocab_size": self.vocab_size,
        }, path)

    @staticmethod
    def from_pt(path: str | Path, map_location: str | torch.device = "cpu") -> Graph:
        data = torch.load(path, map_location=map_location, weights_only=True)
        known = {f.name for f in fields(GraphConfig)}
        data["cfg"] = GraphConfig(**{k: v for k, v in data["cfg"].items() if k in known})
        return Graph(**data)
