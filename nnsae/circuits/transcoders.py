"""Transcoder sets for attribution: per-layer transcoders (`TranscoderSet`) and a `CrossLayerTranscoder`.

Both use circuit-tracer's conventions: the encoder is stored `[d_transcoder, d_model]`, a feature of layer `l`
reads the MLP input of layer `l` (``feature_input_hook``, a TransformerLens name such as ``mlp.hook_in``) and writes
to MLP outputs (``feature_output_hook``, e.g. ``hook_mlp_out``): its own layer for a per-layer transcoder, every
layer `l..n_layers-1` for a cross-layer transcoder. The attribution code only needs the small interface both
classes share: `encode_layer`, `encoder_vectors`, `decoder_vectors`, `output_layers`, `b_dec_layer`,
`compute_skip`, and the read/write points in an HF model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nnsae.hooks import HookPoint, resolve_hook

__all__ = ["ACTIVATIONS", "CrossLayerTranscoder", "SingleLayerTranscoder", "TranscoderSet"]

ACTIVATIONS = ("relu", "jumprelu", "topk")


def _activate(pre: torch.Tensor, kind: str, threshold: torch.Tensor | None, k: int | None,
              relu_first: bool) -> torch.Tensor:
    """circuit-tracer's activations: ReLU; JumpReLU `pre·1[pre > θ]`; TopK keeps the k largest (no ReLU).
    `relu_first` adds the ReLU SAELens-style transcoders apply before JumpReLU's gate or after TopK's selection."""
    if kind == "relu":
        return torch.relu(pre)
    if kind == "jumprelu":
        gated = pre * (pre > threshold).to(pre.dtype)
        return torch.relu(gated) if relu_first else gated
    values, indices = pre.topk(k, dim=-1)
    if relu_first:
        values = torch.relu(values)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def _check_activation(kind: str, threshold: torch.Tensor | None, k: int | None) -> None:
    if kind not in ACTIVATIONS:
        raise ValueError(f"Unknown transcoder activation {kind!r}; use one of {ACTIVATIONS}.")
    if kind == "jumprelu" and threshold is None:
        raise ValueError("A JumpReLU transcoder needs a threshold tensor.")
    if kind == "topk" and (k is None or k < 1):
        raise ValueError(f"A TopK transcoder needs k >= 1, got k={k}.")


class SingleLayerTranscoder(nn.Module):
    """One layer's transcoder: `recon(x) = act(x W_encᵀ + b_enc) W_dec + b_dec (+ x W_skipᵀ)`.

    Shapes (circuit-tracer's): W_enc, W_dec [d_transcoder, d_model]; b_enc [d_transcoder]; b_dec [d_model];
    W_skip [d_model, d_model] (out, in); threshold [d_transcoder] for JumpReLU.
    """

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                 activation: str = "relu", threshold: torch.Tensor | None = None, k: int | None = None,
                 W_skip: torch.Tensor | None = None, relu_first: bool = False):
        super().__init__()
        _check_activation(activation, threshold, k)
        d_transcoder, d_model = W_enc.shape
        if W_dec.shape[0] != d_transcoder or b_enc.shape != (d_transcoder,) or W_dec.shape[1] != b_dec.shape[0]:
            raise ValueError(
                f"Inconsistent transcoder shapes: W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)}, "
                f"b_enc {tuple(b_enc.shape)}, b_dec {tuple(b_dec.shape)} (expected W_enc and W_dec "
                "[d_transcoder, d_model], b_enc [d_transcoder], b_dec [d_model])."
            )
        self.W_enc = nn.Parameter(W_enc, requires_grad=False)
        self.W_dec = nn.Parameter(W_dec, requires_grad=False)
        self.b_enc = nn.Parameter(b_enc, requires_grad=False)
        self.b_dec = nn.Parameter(b_dec, requires_grad=False)
        self.threshold = None if threshold is None else nn.Parameter(threshold, requires_grad=False)
        self.W_skip = None if W_skip is None else nn.Parameter(W_skip, requires_grad=False)
        self.activation = activation
        self.k = k
        self.relu_first = relu_first

    @property
    def d_transcoder(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: torch.Tensor, apply_activation_function: bool = True) -> torch.Tensor:
        pre = x.to(self.W_enc.dtype) @ self.W_enc.T + self.b_enc
        return self.apply_activation_function(pre) if apply_activation_function else pre

    def apply_activation_function(self, pre: torch.Tensor) -> torch.Tensor:
        return _activate(pre, self.activation, self.threshold, self.k, self.relu_first)

    def compute_skip(self, x: torch.Tensor) -> torch.Tensor:
        if self.W_skip is None:
            raise ValueError("This transcoder has no skip connection (W_skip).")
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def decode(self, acts: torch.Tensor, input_acts: torch.Tensor | None = None) -> torch.Tensor:
        out = acts @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if input_acts is None:
                raise ValueError("This transcoder has a skip connection: decode() needs input_acts.")
            out = out + self.compute_skip(input_acts)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)


class _Points:
    """Where the set reads and writes in an HF model: TL names translated by nnsae's hook resolver."""

    feature_input_hook: str
    feature_output_hook: str
    n_layers: int

    def read_point(self, model: Any, layer: int) -> HookPoint:
        """The HF point whose activation layer `layer`'s features encode (the MLP input)."""
        return resolve_hook(model, hook_name=f"blocks.{layer}.{self.feature_input_hook}").read

    def write_point(self, model: Any, layer: int) -> HookPoint:
        """The HF point whose activation layer `layer`'s reconstruction replaces (the MLP output)."""
        return resolve_hook(model, hook_name=f"blocks.{layer}.{self.feature_output_hook}").read


class TranscoderSet(nn.Module, _Points):
    """One `SingleLayerTranscoder` per layer 0..n_layers-1, all reading `feature_input_hook` and writing
    `feature_output_hook` of their layer."""

    def __init__(self, transcoders: Mapping[int, SingleLayerTranscoder] | Sequence[SingleLayerTranscoder],
                 feature_input_hook: str = "mlp.hook_in", feature_output_hook: str = "hook_mlp_out",
                 scan: str | list[str] | None = None):
        super().__init__()
        if not isinstance(transcoders, Mapping):
            transcoders = dict(enumerate(transcoders))
        if not transcoders or set(transcoders) != set(range(len(transcoders))):
            raise ValueError(
                f"A TranscoderSet needs one transcoder for every layer 0..n-1; got layers {sorted(transcoders)}."
            )
        self.transcoders = nn.ModuleList([transcoders[i] for i in range(len(transcoders))])
        widths = {t.d_transcoder for t in self.transcoders}
        if len(widths) != 1:
            raise ValueError(f"All transcoders of a set must have the same d_transcoder, got {sorted(widths)}.")
        skips = {t.W_skip is not None for t in self.transcoders}
        if len(skips) != 1:
            raise ValueError("Either every transcoder of the set has a skip connection (W_skip) or none has.")
        self.feature_input_hook = feature_input_hook
        self.feature_output_hook = feature_output_hook
        self.scan = scan

    @classmethod
    def from_saes(cls, saes: Mapping[int, Any] | Sequence[Any], feature_input_hook: str = "mlp.hook_in",
                  feature_output_hook: str = "hook_mlp_out", scan: str | list[str] | None = None) -> TranscoderSet:
        """A set from nnsae transcoder SAEs (`transcoder`, `skip_transcoder`, `jumprelu_transcoder`,
        `jumprelu_skip_transcoder`, or any SAE with `d_out` and SAELens' `W_enc` [d_in, d_sae]), one per layer.
        The weights are shared with the SAEs, not copied (only transposed views)."""
        if not isinstance(saes, Mapping):
            saes = dict(enumerate(saes))
        return cls({layer: _from_sae(sae) for layer, sae in saes.items()}, feature_input_hook,
                   feature_output_hook, scan)

    @property
    def n_layers(self) -> int:
        return len(self.transcoders)

    @property
    def d_transcoder(self) -> int:
        return self.transcoders[0].d_transcoder

    @property
    def d_model(self) -> int:
        return self.transcoders[0].d_model

    @property
    def skip_connection(self) -> bool:
        return self.transcoders[0].W_skip is not None

    def __len__(self) -> int:
        return self.n_layers

    def __getitem__(self, layer: int) -> SingleLayerTranscoder:
        return self.transcoders[layer]

    def __iter__(self) -> Iterator[SingleLayerTranscoder]:
        return iter(self.transcoders)

    def encode_layer(self, x: torch.Tensor, layer: int, apply_activation_function: bool = True) -> torch.Tensor:
        return self.transcoders[layer].encode(x, apply_activation_function)

    def apply_activation_function(self, layer: int, pre: torch.Tensor) -> torch.Tensor:
        return self.transcoders[layer].apply_activation_function(pre)

    def encoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.transcoders[layer].W_enc[features]

    def output_layers(self, layer: int) -> range:
        """The layers whose MLP output layer `layer`'s features write to."""
        return range(layer, layer + 1)

    def decoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """[n, len(output_layers(layer)), d_model] decoder rows of `features` of `layer`."""
        return self.transcoders[layer].W_dec[features].unsqueeze(1)

    def b_dec_layer(self, layer: int) -> torch.Tensor:
        return self.transcoders[layer].b_dec

    def compute_skip(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.transcoders[layer].compute_skip(x)


class CrossLayerTranscoder(nn.Module, _Points):
    """Features of layer `i` read layer i's MLP input and write to the MLP outputs of layers i..n_layers-1.

    Shapes (circuit-tracer's): W_enc [n_layers, d_transcoder, d_model]; b_enc [n_layers, d_transcoder];
    b_dec [n_layers, d_model] (layer i's output bias); W_dec[i] [d_transcoder, n_layers - i, d_model], where
    W_dec[i][:, j] writes to layer i + j; threshold [n_layers, d_transcoder] for JumpReLU. Layer i's
    reconstruction is `Σ_{s ≤ i} a_s W_dec[s][:, i - s] + b_dec[i]`.
    """

    def __init__(self, W_enc: torch.Tensor, W_dec: Sequence[torch.Tensor], b_enc: torch.Tensor, b_dec: torch.Tensor,
                 activation: str = "relu", threshold: torch.Tensor | None = None, k: int | None = None,
                 feature_input_hook: str = "hook_resid_mid", feature_output_hook: str = "hook_mlp_out",
                 scan: str | list[str] | None = None):
        super().__init__()
        _check_activation(activation, threshold, k)
        n_layers, d_transcoder, d_model = W_enc.shape
        expected = [(d_transcoder, n_layers - i, d_model) for i in range(n_layers)]
        got = [tuple(w.shape) for w in W_dec]
        if got != expected or b_enc.shape != (n_layers, d_transcoder) or b_dec.shape != (n_layers, d_model):
            raise ValueError(
                f"Inconsistent CLT shapes: W_enc {tuple(W_enc.shape)}, W_dec {got} (expected {expected}), "
                f"b_enc {tuple(b_enc.shape)}, b_dec {tuple(b_dec.shape)}."
            )
        if threshold is not None and threshold.shape != (n_layers, d_transcoder):
            raise ValueError(f"CLT threshold must be [n_layers, d_transcoder]={(n_layers, d_transcoder)}, "
                             f"got {tuple(threshold.shape)}.")
        self.W_enc = nn.Parameter(W_enc, requires_grad=False)
        self.W_dec = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in W_dec])
        self.b_enc = nn.Parameter(b_enc, requires_grad=False)
        self.b_dec = nn.Parameter(b_dec, requires_grad=False)
        self.threshold = None if threshold is None else nn.Parameter(threshold, requires_grad=False)
        self.activation = activation
        self.k = k
        self.feature_input_hook = feature_input_hook
        self.feature_output_hook = feature_output_hook
        self.scan = scan
        self.skip_connection = False

    @property
    def n_layers(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_transcoder(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[2]

    def encode_layer(self, x: torch.Tensor, layer: int, apply_activation_function: bool = True) -> torch.Tensor:
        pre = x.to(self.W_enc.dtype) @ self.W_enc[layer].T + self.b_enc[layer]
        return self.apply_activation_function(layer, pre) if apply_activation_function else pre

    def apply_activation_function(self, layer: int, pre: torch.Tensor) -> torch.Tensor:
        threshold = None if self.threshold is None else self.threshold[layer]
        return _activate(pre, self.activation, threshold, self.k, relu_first=False)

    def encoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.W_enc[layer][features]

    def output_layers(self, layer: int) -> range:
        return range(layer, self.n_layers)

    def decoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.W_dec[layer][features]

    def b_dec_layer(self, layer: int) -> torch.Tensor:
        return self.b_dec[layer]

    def compute_skip(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("CrossLayerTranscoder has no skip connection.")

    def decode(self, acts: Sequence[torch.Tensor]) -> torch.Tensor:
        """[n_layers, ..., d_model] reconstructions from per-source-layer activations `acts[i]` [..., d_transcoder]."""
        return torch.stack([
            sum(acts[s] @ self.W_dec[s][:, i - s] for s in range(i + 1)) + self.b_dec[i]
            for i in range(self.n_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [n_layers, ..., d_model] MLP inputs → [n_layers, ..., d_model] reconstructions."""
        return self.decode([self.encode_layer(x[i], i) for i in range(self.n_layers)])


def _from_sae(sae: Any) -> SingleLayerTranscoder:
    """Wrap an nnsae transcoder SAE (SAELens layout) as a SingleLayerTranscoder sharing its weights."""
    cfg = sae.cfg
    if getattr(cfg, "d_out", None) is None:
        raise ValueError(f"{type(sae).__name__} ({cfg.architecture!r}) is not a transcoder: it has no d_out.")
    if cfg.normalize_activations not in ("none", None) or getattr(cfg, "apply_b_dec_to_input", False):
        raise ValueError(
            f"Transcoder with normalize_activations={cfg.normalize_activations!r} / apply_b_dec_to_input: fold the "
            "normalisation into the weights first (SAE.fold_activation_norm_scaling_factor)."
        )
    architecture = cfg.architecture
    threshold = getattr(sae, "threshold", None)
    k = getattr(cfg, "k", None)
    if "abs" in architecture:
        raise ValueError(f"Unsupported transcoder architecture {architecture!r} for circuits (signed activations).")
    if "jumprelu" in architecture:
        activation = "jumprelu"
    elif "topk" in architecture and k is not None:
        if getattr(cfg, "rescale_acts_by_decoder_norm", False):
            raise ValueError("TopK transcoders with rescale_acts_by_decoder_norm are not supported in circuits.")
        activation = "topk"
    elif architecture in ("transcoder", "skip_transcoder"):
        activation = "relu"
    else:
        raise ValueError(f"Unsupported transcoder architecture {architecture!r} for circuits.")
    return SingleLayerTranscoder(
        W_enc=sae.W_enc.detach().T, W_dec=sae.W_dec.detach(), b_enc=sae.b_enc.detach(), b_dec=sae.b_dec.detach(),
        activation=activation, threshold=None if threshold is None else threshold.detach(), k=k,
        W_skip=None if getattr(sae, "W_skip", None) is None else sae.W_skip.detach(), relu_first=True,
    )
