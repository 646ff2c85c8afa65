"""Transcoder sets and cross-layer transcoders inside a trace: one attach per layer, through the one splice.

`layer_saes(transcoders)` turns a `TranscoderSet` or `CrossLayerTranscoder` into one nnsae SAE per layer
(`LayerTranscoder`, sharing the weights), reading the layer's MLP input and writing its MLP output. Everything that
takes SAEs then takes them: `nnsae.attach` (what `attach_transcoders` calls per layer), `run_with_saes`,
`run_with_cache_with_saes`, `saes(...)`, `evaluate`, and the inline `splice()` for remote bodies. Each layer has the
usual hook points (`hook_sae_input`, `hook_sae_acts_pre`, `hook_sae_acts_post`, `hook_sae_recons`,
`hook_sae_error`, `hook_sae_output`) for reading, ablating and steering its features.

A CLT layer L encodes its own MLP input and decodes `Σ_{s ≤ L} a_s W_dec[s][:, L - s] + b_dec[L]`, where `a_s` are
layer s's activations as they left its `hook_sae_acts_post` earlier in the same forward pass (so an edit at layer s
moves every later layer's reconstruction). The layers share a small store of those activations (the edited ones for
the reconstruction, the clean ones for the error term's reference), so a CLT's layers must run together and in
order: attach all of them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from nnsae.architectures.base import SAE
from nnsae.architectures.transcoder import Transcoder
from nnsae.attachment.mount import attach
from nnsae.attachment.splice import splice
from nnsae.circuits.transcoders import CrossLayerTranscoder, TranscoderSet, _activate
from nnsae.config import SAEConfig, dtype_name

__all__ = ["LayerTranscoder", "TranscoderAttachment", "attach_transcoders", "layer_saes", "splice_transcoders"]


class _SourceActivations:
    """A CLT's per-layer activations of the forward pass in progress: `hooked` (after edits at
    `hook_sae_acts_post`, what reconstructions use) and `clean` (the error term's reference)."""

    def __init__(self) -> None:
        self.hooked: dict[int, torch.Tensor] = {}
        self.clean: dict[int, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        return {"hooked": {}, "clean": {}}  # activations are per forward pass: never shipped or pickled


class LayerTranscoder(Transcoder):
    """Layer `layer` of a `TranscoderSet` or `CrossLayerTranscoder` as an nnsae SAE (weights shared, not copied).

    `cfg.metadata` names its read and write points (`blocks.L.<feature_input_hook>` →
    `blocks.L.<feature_output_hook>`), so `nnsae.attach(model, sae)` places it without a hook argument. Its math is
    the set's own (circuit-tracer's activations, SAELens' ReLU where the transcoder came from SAELens files)."""

    param_shapes: ClassVar[dict[str, str]] = {}  # the parameters are the set's, registered in __init__

    def __init__(self, transcoders: TranscoderSet | CrossLayerTranscoder, layer: int,
                 sources: _SourceActivations | None = None):
        clt = isinstance(transcoders, CrossLayerTranscoder)
        if not 0 <= layer < transcoders.n_layers:
            raise ValueError(f"Layer {layer} is out of range for transcoders of {transcoders.n_layers} layers.")
        if clt:
            if sources is None:
                raise ValueError("A CLT layer needs the store its layers share: build them with layer_saes(clt).")
            W_enc, W_dec = transcoders.W_enc[layer], transcoders.W_dec[layer][:, 0]
            b_enc, b_dec = transcoders.b_enc[layer], transcoders.b_dec[layer]
            threshold = None if transcoders.threshold is None else transcoders.threshold[layer]
            W_skip, activation, k, relu_first = None, transcoders.activation, transcoders.k, False
        else:
            t = transcoders[layer]
            W_enc, W_dec, b_enc, b_dec, threshold, W_skip = t.W_enc, t.W_dec, t.b_enc, t.b_dec, t.threshold, t.W_skip
            activation, k, relu_first = t.activation, t.k, t.relu_first
        cfg = SAEConfig(d_in=W_enc.shape[1], d_sae=W_enc.shape[0], d_out=W_dec.shape[1], apply_b_dec_to_input=False,
                        architecture="skip_transcoder" if W_skip is not None else "transcoder",
                        dtype=dtype_name(W_dec.dtype), device=str(W_dec.device))
        cfg.metadata.hook_name = f"blocks.{layer}.{transcoders.feature_input_hook}"
        cfg.metadata.hook_name_out = f"blocks.{layer}.{transcoders.feature_output_hook}"
        Transcoder.__init__(self, cfg)
        self.layer = layer
        self.kind, self.k, self.relu_first = activation, k, relu_first
        self.W_enc = nn.Parameter(W_enc.detach().T, requires_grad=False)  # SAELens' [d_in, d_sae], a view
        self.W_dec = nn.Parameter(W_dec.detach(), requires_grad=False)
        self.b_enc = nn.Parameter(b_enc.detach(), requires_grad=False)
        self.b_dec = nn.Parameter(b_dec.detach(), requires_grad=False)
        self.threshold = None if threshold is None else nn.Parameter(threshold.detach(), requires_grad=False)
        self.W_skip = None if W_skip is None else nn.Parameter(W_skip.detach(), requires_grad=False)
        self.n_sources = layer if clt else 0
        for s in range(self.n_sources):  # earlier layers' decoders into this layer: W_dec[s][:, layer - s]
            setattr(self, f"W_dec_from_{s}", nn.Parameter(transcoders.W_dec[s][:, layer - s].detach(),
                                                          requires_grad=False))
        self.__dict__["_sources"] = sources

    def initialize_weights(self) -> None:
        """Nothing to initialise: the weights are the transcoder set's."""

    def activation(self, pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _activate(pre, self.kind, self.threshold, self.k, self.relu_first)

    def encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_acts = self.encode(x)
        sources = self.__dict__["_sources"]
        if sources is None:
            recons = self.decode(feature_acts)
        else:
            store = sources.hooked if self._hooks_enabled else sources.clean
            store[self.layer] = feature_acts
            total = feature_acts @ self.W_dec
            for s in range(self.n_sources):
                earlier = store.get(s)
                if earlier is None or earlier.shape[:-1] != feature_acts.shape[:-1]:
                    raise RuntimeError(
                        f"nnsae: CLT layer {self.layer} ran before layer {s} in this forward pass; a CLT's layers "
                        "run together and in order (attach all of them, e.g. with attach_transcoders).")
                total = total + earlier @ getattr(self, f"W_dec_from_{s}")
            recons = self._hook("hook_sae_recons", total + self.b_dec)
        if self.W_skip is not None:
            recons = recons + x.to(self.dtype) @ self.W_skip.T
        return feature_acts, recons

    def __repr__(self) -> str:
        return (f"LayerTranscoder(layer={self.layer}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}, "
                f"{self.kind}, {self.cfg.metadata.hook_name} -> {self.cfg.metadata.hook_name_out})")


def layer_saes(transcoders: TranscoderSet | CrossLayerTranscoder, layers: Sequence[int] | None = None
               ) -> list[LayerTranscoder]:
    """One `LayerTranscoder` per layer (all layers, or `layers` of a per-layer set), in layer order."""
    n = transcoders.n_layers
    if isinstance(transcoders, CrossLayerTranscoder):
        if layers is not None and sorted(layers) != list(range(n)):
            raise ValueError("A cross-layer transcoder replaces every MLP (layer L's output sums features of all "
                             f"layers ≤ L): use all {n} layers, not {sorted(layers)}.")
        sources = _SourceActivations()
        return [LayerTranscoder(transcoders, layer, sources) for layer in range(n)]
    if not isinstance(transcoders, TranscoderSet):
        raise TypeError(f"layer_saes needs a TranscoderSet or CrossLayerTranscoder, got {type(transcoders).__name__}.")
    chosen = sorted(set(range(n) if layers is None else layers))
    if any(not 0 <= layer < n for layer in chosen):
        raise ValueError(f"Layers {chosen} are out of range for a set of {n} layers.")
    return [LayerTranscoder(transcoders, layer) for layer in chosen]


class TranscoderAttachment:
    """The attached layers of a transcoder set: `att[L]` is layer L's `SAEHandle` (its `hook_sae_*` points);
    `att.saes[L]` its SAE; `detach()` removes them all."""

    def __init__(self, handles: dict[int, Any]):
        self.handles = handles

    def __getitem__(self, layer: int) -> Any:
        if layer not in self.handles:
            raise KeyError(f"Layer {layer} is not attached (attached layers: {sorted(self.handles)}).")
        return self.handles[layer]

    def __iter__(self):
        return iter(self.handles.values())

    def __len__(self) -> int:
        return len(self.handles)

    @property
    def layers(self) -> list[int]:
        return sorted(self.handles)

    @property
    def saes(self) -> dict[int, SAE]:
        return {layer: handle.sae for layer, handle in self.handles.items()}

    def detach(self) -> None:
        for handle in reversed(list(self.handles.values())):
            handle.detach()


def attach_transcoders(model: Any, transcoders: TranscoderSet | CrossLayerTranscoder | Sequence[SAE], *,
                       layers: Sequence[int] | None = None, use_error_term: bool = False, mode: str = "splice",
                       exclude_special_tokens: bool | Sequence[int] = False, persistent: bool | None = None
                       ) -> TranscoderAttachment:
    """Replace MLP outputs by transcoder reconstructions: every layer of a set (or `layers` of it), or every layer
    of a CLT, each attached with `nnsae.attach` (same scope rules: inside a trace body, for that trace). With
    `use_error_term` the model's output is unchanged until features are edited. `transcoders` may also be a list
    of nnsae transcoder SAEs (SAELens layout, one per layer)."""
    saes = list(transcoders) if isinstance(transcoders, (list, tuple)) else layer_saes(transcoders, layers)
    handles: dict[int, Any] = {}
    try:
        for position, sae in enumerate(saes):
            layer = getattr(sae, "layer", position)
            handles[layer] = attach(model, sae, mode=mode, use_error_term=use_error_term,
                                    exclude_special_tokens=exclude_special_tokens, persistent=persistent)
    except BaseException:
        TranscoderAttachment(handles).detach()
        raise
    return TranscoderAttachment(handles)


def splice_transcoders(model: Any, saes: Sequence[SAE], *, use_error_term: bool = False,
                       edit: dict[int, Any] | None = None) -> dict[int, torch.Tensor]:
    """Inside a trace body (the remote path: nothing is mounted): run every layer SAE of `layer_saes(...)` at its
    points, in layer order, with `edit[L](features)` editing layer L's features; returns each layer's features."""
    out = {}
    for position, sae in enumerate(saes):
        layer = getattr(sae, "layer", position)
        out[layer] = splice(model, sae, use_error_term=use_error_term, edit=(edit or {}).get(layer))
    return out
