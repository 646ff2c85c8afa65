"""Feature interventions through transcoders, with the error term kept (circuit-tracer's `feature_intervention`).

Each intervention `(layer, position, feature, value)` sets a transcoder feature to `value`: at that layer's MLP
output point the difference `(value - current activation) · W_dec[feature]` is added (for a cross-layer
transcoder, to every layer the feature writes to). The MLPs themselves keep running, so everything the
transcoders do not explain (the error) is kept, and effects propagate through later layers. With
`freeze_attention` (the default, as circuit-tracer) attention patterns are those of the clean run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F

from torch.overrides import TorchFunctionMode

from nnsae.circuits.attribution import _SOFTMAXES, _inference_state, _read_value, _register, _tokenize
from nnsae.circuits.transcoders import CrossLayerTranscoder, TranscoderSet
from nnsae.seam import unwrap_model

__all__ = ["intervene"]

Intervention = tuple[int, int | slice, int, float]


class _Patterns(TorchFunctionMode):
    """Record every attention pattern (softmax output, in call order) or replay recorded ones in their place."""

    def __init__(self, replay: list[torch.Tensor] | None = None):
        super().__init__()
        self.recorded: list[torch.Tensor] = []
        self.replay = replay

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _SOFTMAXES:
            out = func(*args, **kwargs)
            self.recorded.append(out)
            return out if self.replay is None else self.replay[len(self.recorded) - 1].to(out.dtype)
        if func is F.scaled_dot_product_attention:
            raise ValueError("freeze_attention needs eager attention: load the model with attn_implementation='eager'.")
        return func(*args, **kwargs)


@torch.no_grad()
def intervene(model: Any, transcoders: TranscoderSet | CrossLayerTranscoder, inputs: str | torch.Tensor | Sequence[int],
              interventions: Sequence[Intervention], freeze_attention: bool = True, *, tokenizer: Any = None
              ) -> torch.Tensor:
    """Logits [n_pos, d_vocab] of `model` on `inputs` with the features set as `interventions` say.

    `inputs` are tokenized as in `attribute`. A position may be an int or a slice.
    """
    hf = unwrap_model(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    tokens = _tokenize(inputs, tokenizer, getattr(hf.config, "name_or_path", "") or "")
    tokens = tokens.to(next(hf.parameters()).device)[None]
    by_layer: dict[int, list[tuple[int | slice, int, float]]] = defaultdict(list)
    for layer, pos, feature, value in interventions:
        if not 0 <= layer < transcoders.n_layers:
            raise ValueError(f"Intervention layer {layer} is outside 0..{transcoders.n_layers - 1}.")
        by_layer[layer].append((pos, feature, value))
    read = [transcoders.read_point(hf, layer) for layer in range(transcoders.n_layers)]
    write = [transcoders.write_point(hf, layer) for layer in range(transcoders.n_layers)]
    if freeze_attention and getattr(hf.config, "_attn_implementation", "eager") != "eager":
        raise ValueError("freeze_attention needs eager attention: load the model with attn_implementation='eager'.")

    with _inference_state(hf):
        replay = None
        if freeze_attention and interventions:
            with _Patterns() as recorder:
                hf(input_ids=tokens)
            replay = recorder.recorded
        deltas: dict[int, torch.Tensor] = {}  # MLP output layer -> [n_pos, d_model] to add

        def on_read(layer: int):
            def fn(x: torch.Tensor) -> None:
                acts = transcoders.encode_layer(_read_value(read[layer], x)[0], layer)
                change = torch.zeros_like(acts)
                for pos, feature, value in by_layer[layer]:
                    change[pos, feature] = value - acts[pos, feature]
                positions, features = change.nonzero(as_tuple=True)
                if len(features) == 0:
                    return
                vectors = transcoders.decoder_vectors(layer, features) * change[positions, features][:, None, None]
                for j, out_layer in enumerate(transcoders.output_layers(layer)):
                    delta = deltas.setdefault(out_layer, torch.zeros_like(x[0], dtype=vectors.dtype))
                    delta.index_add_(0, positions, vectors[:, j])
            return fn

        def on_write(layer: int):
            def fn(out: torch.Tensor) -> torch.Tensor | None:
                delta = deltas.pop(layer, None)
                return None if delta is None else out + delta.to(out.dtype)
            return fn

        with ExitStack() as stack:
            for layer in range(transcoders.n_layers):
                if layer in by_layer:
                    reader = hf.get_submodule(read[layer].module)
                    stack.callback(_register(reader, read[layer].io, on_read(layer)).remove)
                writer = hf.get_submodule(write[layer].module)
                stack.callback(_register(writer, write[layer].io, on_write(layer)).remove)
            if replay is not None:
                stack.enter_context(_Patterns(replay))
            logits = hf(input_ids=tokens).logits[0]
    return logits
