"""Attribution graphs on a plain Hugging Face model (circuit-tracer's definitions, no edits to the model's code).

The local replacement model of a prompt is the true model with
* attention patterns frozen (the softmax output is detached: eager attention directly, SDPA recomputed by hand),
* every normalisation's scale frozen (the norm's output keeps its value and gets the Jacobian `gain · P · scale`
  with the scale detached; P centres for LayerNorm, is the identity for RMSNorm),
* each MLP output cut from its input (its value kept; only a transcoder skip connection stays live).
It is linear in the residual stream, so one backward pass that injects a target's input vector (an encoder row at
an MLP input, or a demeaned unembedding column at the final norm's output) and reads the gradient at every MLP
output and at the token embeddings gives that target's row of direct effects. Rows are computed in batches over
copies of the prompt (one target per copy) on a graph kept from one frozen forward pass.

Both runs go through nnsight: the clean run reads MLP inputs/outputs, embeddings and logits as envoy values of a
trace; the frozen run is a second trace that rewrites norm outputs, MLP inputs/outputs and embeddings as envoy
values (in the execution order the clean run recorded), then runs every batched backward pass inside the same
trace body with nnsight's `tensor.backward()` context, reading `.grad` at the MLP-output and embedding sites, and
stops the model before its unembedding. Attention stays frozen by a torch function mode around the trace: the
softmax sits inside each family's attention function (or is fused into SDPA), where only nnsight's per-operation
`.source` names could reach it, and those differ by family and attention implementation; the mode also replaces
the product with the values so that the copies share one pattern.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from nnsae.circuits.graph import Graph, GraphConfig, LogitTarget
from nnsae.circuits.transcoders import CrossLayerTranscoder, TranscoderSet
from nnsae.hooks import HookPoint, resolve_hook
from nnsae.seam import as_nnsight, unwrap_model

__all__ = ["attribute"]

logger = logging.getLogger("nnsae.circuits")

Transcoders = TranscoderSet | CrossLayerTranscoder
_CHUNK_ELEMENTS = 1 << 25  # elements of a temporary |rows| chunk in the influence estimate (128 MiB in float32)
_SOFTMAXES = (F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax)
_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


def attribute(model: Any, inputs: str | torch.Tensor | Sequence[int], transcoders: Transcoders,
              max_n_logits: int = 10, desired_logit_prob: float = 0.95, max_feature_nodes: int | None = None,
              batch_size: int = 256, attribution_targets: torch.Tensor | Sequence[Any] | None = None,
              update_interval: int = 4, verbose: bool = False, *, tokenizer: Any = None) -> Graph:
    """The attribution graph of `inputs` through `transcoders` in `model` (an HF causal LM or an nnsight wrapper).

    `inputs`: a string or token ids, tokenized as circuit-tracer does (strings without the tokenizer's special
    tokens; then a special token is prepended unless the first token already is one; token ids without any
    tokenizer are used as given). `attribution_targets`: None
    (the most likely next tokens, by descending probability, until `desired_logit_prob` is covered or
    `max_n_logits` reached), token ids, single-token strings, or `(label, weight, vector)` tuples.
    `max_feature_nodes`: keep at most this many features, chosen by their logit influence, re-estimated every
    `update_interval * batch_size` attributed rows. `tokenizer`: needed for string inputs when `model` has none.
    """
    hf = unwrap_model(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if verbose:
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler())
    text_config = hf.config.get_text_config()
    if transcoders.n_layers != text_config.num_hidden_layers:
        raise ValueError(
            f"The transcoders cover {transcoders.n_layers} layers but the model has {text_config.num_hidden_layers}: "
            "attribution needs a transcoder for every layer."
        )
    attn = getattr(hf.config, "_attn_implementation", "eager")
    if attn not in ("eager", "sdpa"):
        raise ValueError(
            f"Attention implementation {attn!r} cannot be frozen; load the model with attn_implementation='eager' "
            "(or 'sdpa')."
        )
    device = next(hf.parameters()).device
    tc_device = next(transcoders.parameters()).device
    if tc_device != device:
        raise ValueError(f"The transcoders are on {tc_device} but the model is on {device}: "
                         f"move them with transcoders.to({str(device)!r}).")
    tokens = _tokenize(inputs, tokenizer, getattr(hf.config, "name_or_path", "") or "").to(device)
    zero_positions = _zero_positions(hf.config)
    with _inference_state(hf):
        replacement = _ReplacementModel(model, transcoders, tokens, zero_positions)
        targets = _logit_targets(attribution_targets, replacement.logits, hf.get_output_embeddings().weight,
                                 tokenizer, max_n_logits, desired_logit_prob)
        return _run(replacement, tokens, targets, tokenizer, transcoders, max_feature_nodes, batch_size,
                    update_interval)


# ---- tokens and targets ---------------------------------------------------------------------------------------


def _tokenize(inputs: Any, tokenizer: Any, model_name: str) -> torch.Tensor:
    """circuit-tracer's `ensure_tokenized`: strings without the tokenizer's own special tokens; then, for strings and
    token ids alike, Gemma 3 -it prompts must start with its chat prefix, and anything else gets a special token
    prepended unless it starts with one. Token ids without a tokenizer are used as given (nothing tells which ids
    are special)."""
    if isinstance(inputs, str):
        if tokenizer is None:
            raise ValueError("A string prompt needs a tokenizer: pass tokenizer= or an nnsight LanguageModel.")
        tokens = tokenizer(inputs, return_tensors="pt", add_special_tokens=False).input_ids.squeeze(0)
    else:
        tokens = torch.as_tensor(inputs, dtype=torch.long)
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise ValueError(f"Token ids must be one sequence (1-D, or [1, n_pos]), got shape {tuple(tokens.shape)}.")
    if not len(tokens):
        raise ValueError("The prompt is empty: attribution needs at least one token.")
    if tokenizer is None:
        return tokens
    if _is_gemma3_it(model_name):
        prefix = torch.tensor([2, 105, 2364, 107])
        if len(tokens) < 4 or not torch.equal(tokens[:4].cpu(), prefix):
            raise ValueError("Gemma 3 instruction-tuned prompts must start with <bos><start_of_turn>user\\n.")
        return tokens
    if int(tokens[0]) in tokenizer.all_special_ids:
        return tokens
    # circuit-tracer's choice of the token to prepend: the first truthy id among these (an id of 0 is skipped).
    candidates = [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, *tokenizer.all_special_ids]
    first = next(filter(None, candidates), None)
    if first is None:
        raise ValueError("The tokenizer has no special token to prepend; pass token ids starting with one.")
    return torch.cat([torch.tensor([first], dtype=tokens.dtype, device=tokens.device), tokens])


def _is_gemma3_it(model_name: str) -> bool:
    return "gemma-3" in model_name and model_name.endswith("-it")


def _zero_positions(config: Any) -> slice:
    """Positions whose features and errors are zeroed: BOS (and Gemma 3 -it's chat prefix, as circuit-tracer)."""
    return slice(0, 4) if _is_gemma3_it(getattr(config, "name_or_path", "") or "") else slice(0, 1)


def _logit_targets(spec: Any, logits: torch.Tensor, unembed: torch.Tensor, tokenizer: Any, max_n_logits: int,
                   desired_logit_prob: float) -> tuple[list[LogitTarget], torch.Tensor, torch.Tensor]:
    """(targets, probabilities, demeaned unembedding vectors [n, d_model]); `unembed` is [d_vocab, d_model]."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    d_vocab = logits.shape[0]
    unembed = unembed.detach().float()

    def decode(index: int) -> str:
        return tokenizer.decode(index) if tokenizer is not None else str(index)

    if spec is not None and not isinstance(spec, torch.Tensor) and len(spec) and isinstance(spec[0], tuple):
        labels, weights, vectors = zip(*spec)
        targets = [LogitTarget(str(label), d_vocab + i) for i, label in enumerate(labels)]
        return targets, torch.tensor(weights, dtype=torch.float32), torch.stack(vectors).float().to(unembed.device)
    if spec is None:
        top_p, top_idx = torch.topk(probs, min(max_n_logits, d_vocab))
        cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), desired_logit_prob)) + 1
        indices = top_idx[:cutoff]
    elif isinstance(spec, torch.Tensor) or (len(spec) and not isinstance(spec[0], str)):
        indices = torch.as_tensor(spec, dtype=torch.long, device=logits.device).flatten()
    else:
        if tokenizer is None:
            raise ValueError("String attribution targets need a tokenizer.")
        ids = []
        for text in spec:
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"Attribution target {text!r} is {len(encoded)} tokens; each must be exactly one.")
            ids.append(encoded[0])
        indices = torch.tensor(ids, dtype=torch.long, device=logits.device)
    if len(indices) == 0:
        raise ValueError("attribution_targets is empty.")
    if (indices < 0).any() or (indices >= d_vocab).any():
        raise ValueError(f"Attribution target ids must be in [0, {d_vocab}), got {indices.tolist()}.")
    vectors = unembed[indices.to(unembed.device)] - unembed.mean(dim=0, keepdim=True)
    targets = [LogitTarget(decode(i), i) for i in indices.tolist()]
    return targets, probs[indices].cpu(), vectors


# ---- the frozen model -----------------------------------------------------------------------------------------


@contextmanager
def _inference_state(hf: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients while attributing; restored afterwards."""
    training = hf.training
    flags = [(p, p.requires_grad) for p in hf.parameters()]
    hf.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        hf.train(training)


def _register(module: nn.Module, io: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Any:
    """A hook calling `fn` on the module's output (first element of a tuple) or first input, replacing it with
    what `fn` returns unless None (the `HookPoint` convention)."""
    if io == "output":
        def hook(mod: nn.Module, args: Any, output: Any) -> Any:
            value = output[0] if isinstance(output, tuple) else output
            new = fn(value)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return module.register_forward_hook(hook)

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})
    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _norm_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    name = type(module).__name__
    if name.endswith("RMSNorm"):
        return "rmsnorm"
    if name.endswith("LayerNorm"):
        return "layernorm"
    return None


def _norm_linear(module: nn.Module, kind: str, x: torch.Tensor, gemma_gain: bool) -> torch.Tensor:
    """The norm's output with its scale detached: gain · P(x) · scale (float32 for low precision inputs)."""
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    eps = getattr(module, "variance_epsilon", None)
    eps = getattr(module, "eps", 1e-5) if eps is None else eps
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    scale = torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + eps)
    out = x * scale
    weight = getattr(module, "weight", None)
    if weight is not None:
        out = out * ((1.0 + weight.to(out.dtype)) if gemma_gain else weight.to(out.dtype))
    bias = getattr(module, "bias", None)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


class _FreezeAttention(TorchFunctionMode):
    """Detach every softmax (eager attention's pattern); replace SDPA by the same product with a detached pattern.

    Used only on a batch of identical copies of one prompt: a pattern is kept for the first copy and expanded (a
    stride-0 view), and a product of such a view with the values is done as one [heads, n, n] @ [heads, n,
    copies·d_head] product, so the backward pass keeps one pattern per layer instead of one per copy."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _SOFTMAXES:
            out = func(*args, **kwargs).detach()
            return out[:1].expand_as(out) if out.dim() == 4 and out.shape[0] > 1 else out
        if func is F.scaled_dot_product_attention:
            return _frozen_sdpa(*args, **kwargs)
        if func in _MATMULS and not kwargs and len(args) == 2 and _is_shared_pattern(args[0]):
            return _apply_pattern(args[0][0], args[1])
        return func(*args, **kwargs)


def _is_shared_pattern(t: Any) -> bool:
    return (isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] > 1 and t.stride(0) == 0
            and not t.requires_grad)


def _apply_pattern(pattern: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[heads, n, s] pattern (the same for every copy) applied to values [copies, heads, s, d_head]."""
    copies, heads, s, d_head = value.shape
    flat = value.permute(1, 2, 0, 3).reshape(heads, s, copies * d_head)
    return (pattern.to(value.dtype) @ flat).view(heads, -1, copies, d_head).permute(2, 0, 1, 3)


def _frozen_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                 enable_gqa: bool = False) -> torch.Tensor:
    if dropout_p:
        raise ValueError("Attention dropout is active; attribution needs the model in eval mode.")
    if key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeats, -3), value.repeat_interleave(repeats, -3)
    # Every copy of the prompt has the same pattern: compute it once, and apply it to all copies' values in one
    # product that keeps only the [heads, n, n] pattern for the backward pass.
    query, key = query[:1], key[:1]
    scores = (query @ key.transpose(-2, -1)) * (1 / math.sqrt(query.shape[-1]) if scale is None else scale)
    if is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        mask = attn_mask[:1] if attn_mask.dim() == 4 else attn_mask
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return _apply_pattern(torch.softmax(scores, dim=-1).detach()[0], value)


def _read_value(point: HookPoint, x: torch.Tensor) -> torch.Tensor:
    """The transcoder input at a read point; a TL `hook_normalized` read keeps its scale frozen."""
    if point.normalize is not None:
        centred = x - x.mean(-1, keepdim=True) if point.normalize == "layernorm" else x
        x = centred * torch.rsqrt(centred.detach().pow(2).mean(-1, keepdim=True) + point.eps)
    if point.center:
        x = x - x.mean(-1, keepdim=True)
    return x


class _ReplacementModel:
    """Clean-run records (transcoder activations, errors, token vectors, logits) and the frozen batched graph, both
    read and written as envoy values inside traces of the nnsight wrapper `model`."""

    def __init__(self, model: Any, transcoders: Transcoders, tokens: torch.Tensor, zero_positions: slice):
        self.model = as_nnsight(model)
        self.hf = hf = unwrap_model(self.model)
        self.transcoders = transcoders
        self.tokens = tokens
        self.n_layers = transcoders.n_layers
        self.n_pos = len(tokens)
        self.read_points = [transcoders.read_point(hf, layer) for layer in range(self.n_layers)]
        self.write_points = [transcoders.write_point(hf, layer) for layer in range(self.n_layers)]
        for point in self.write_points:
            if point.normalize is not None or point.center:
                raise ValueError(f"{point.module}.{point.io} cannot be a transcoder output point (a normalized view).")
        self.norms = {name: kind for name, m in hf.named_modules() if (kind := _norm_kind(m)) is not None}
        self.gemma_gain: dict[str, bool] = {}
        names = {id(module): name for name, module in hf.named_modules()}
        self.embed_name = names[id(hf.get_input_embeddings())]
        self.unembed_name = names[id(hf.get_output_embeddings())]
        self._clean_run(zero_positions)

    # -- the clean run --

    def _value(self, name: str, io: str) -> torch.Tensor:
        """Inside a trace: the module's output (first element of a tuple) or first input."""
        envoy = self.model.get(name)
        value = envoy.output if io == "output" else envoy.input
        return value[0] if isinstance(value, tuple) else value

    def _clean_run(self, zero_positions: slice) -> None:
        hf, n_layers = self.hf, self.n_layers
        mlp_in: list[torch.Tensor] = []
        mlp_out: list[torch.Tensor] = []
        ends: list[torch.Tensor] = []  # the token embeddings, then the last position's logits
        with ExitStack() as stack, torch.no_grad():
            for name, kind in self.norms.items():
                module = hf.get_submodule(name)
                stack.callback(module.register_forward_hook(self._norm_checker(name, kind)).remove)
            self.events = self._record_order(stack)
            with self.model.trace(self.tokens[None]):
                ends.append(self._value(self.embed_name, "output").save())
                for layer in range(n_layers):
                    read, write = self.read_points[layer], self.write_points[layer]
                    mlp_in.append(_read_value(read, self._value(read.module, read.io)).save())
                    mlp_out.append(self._value(write.module, write.io).save())
                ends.append(self.model.output.logits[0, -1].save())
        self.token_vectors = ends[0][0].float()
        self.logits = ends[1].detach()
        self._encode([x[0] for x in mlp_in], [y[0] for y in mlp_out], zero_positions)

    def _record_order(self, stack: ExitStack) -> list[tuple[str, str]]:
        """Plain observing hooks that record the order in which the frozen run's envoy values are produced (nnsight
        serves them in execution order); a module run twice in one forward could not be frozen and is refused."""
        wanted = {(name, io) for name in self.norms for io in ("input", "output")}
        wanted |= {(self.embed_name, "output"), (self.unembed_name, "input")}
        wanted |= {(p.module, p.io) for p in (*self.read_points, *self.write_points)}
        wanted |= {(mlp, "input") for mlp in self._mlp_modules()}
        events: list[tuple[str, str]] = []

        def note(event: tuple[str, str]) -> None:
            if event in events:
                raise ValueError(f"{event[0]} runs more than once in a forward pass; attribution cannot freeze it.")
            events.append(event)

        for name, io in sorted(wanted):
            module = self.hf.get_submodule(name)
            if io == "input":
                handle = module.register_forward_pre_hook(lambda m, a, e=(name, io): note(e))
            else:
                handle = module.register_forward_hook(lambda m, a, o, e=(name, io): note(e))
            stack.callback(handle.remove)
        return events

    def _norm_checker(self, name: str, kind: str) -> Callable:
        """Check that the frozen-scale formula reproduces the norm's output, and learn its gain convention."""
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            x = args[0]
            out = (output[0] if isinstance(output, tuple) else output).float()
            tolerance = 1e-4 if x.dtype in (torch.float32, torch.float64) else 2e-2
            for gemma_gain in ((False, True) if kind == "rmsnorm" else (False,)):
                ref = _norm_linear(module, kind, x, gemma_gain).float()
                if (ref - out).abs().max() <= tolerance * (1 + out.abs().max()):
                    self.gemma_gain[name] = gemma_gain
                    return
            raise ValueError(
                f"Cannot freeze normalisation {name} ({type(module).__name__}): its output is not "
                "gain·x/rms(x) (RMSNorm, gain w or 1+w) or LayerNorm's; attribution does not support it."
            )
        return hook

    def _encode(self, mlp_in: list[torch.Tensor], mlp_out: list[torch.Tensor], zero_positions: slice) -> None:
        """Active features (sorted by layer, position, feature), their scaled decoder rows, and the error vectors."""
        tc = self.transcoders
        n_layers, n_pos = self.n_layers, self.n_pos
        dtype = torch.float32
        reconstruction = [tc.b_dec_layer(layer).to(dtype).expand(n_pos, -1).clone() for layer in range(n_layers)]
        layers, positions, features, values = [], [], [], []
        self.decoders: list[tuple[torch.Tensor, torch.Tensor]] = []  # per source layer, see _by_position
        start = 0
        for layer in range(n_layers):
            acts = tc.encode_layer(mlp_in[layer], layer).to(dtype)
            acts[zero_positions] = 0
            pos, feat = acts.nonzero(as_tuple=True)
            vals = acts[pos, feat]
            scaled = tc.decoder_vectors(layer, feat).to(dtype) * vals[:, None, None]  # [m, n_out, d_model]
            for j, out_layer in enumerate(tc.output_layers(layer)):
                reconstruction[out_layer].index_add_(0, pos, scaled[:, j])
            cols = torch.arange(start, start + len(pos), device=pos.device)
            self.decoders.append(_by_position(cols, pos, scaled, n_pos))
            start += len(pos)
            layers.append(torch.full_like(pos, layer))
            positions.append(pos)
            features.append(feat)
            values.append(vals)
        if tc.skip_connection:
            for layer in range(n_layers):
                reconstruction[layer] += tc.compute_skip(layer, mlp_in[layer]).to(dtype)
        errors = torch.stack([mlp_out[layer].to(dtype) - reconstruction[layer] for layer in range(n_layers)])
        errors[:, zero_positions] = 0
        self.errors = errors
        self.active_features = torch.stack([torch.cat(layers), torch.cat(positions), torch.cat(features)], dim=1)
        self.activation_values = torch.cat(values)
        self.n_active = start
        spare = start + (n_layers + 1) * n_pos
        for columns, _ in self.decoders:
            columns[columns < 0] = spare

    # -- the frozen batched forward --

    def run_frozen(self, copies: int, body: Callable[[], None]) -> None:
        """Trace one frozen forward over `copies` copies of the prompt and call `body` inside the trace, where
        `rows` runs its backward passes on the kept graph; the model stops before its unembedding."""
        self.copies = copies
        self.sites: list[torch.Tensor | None] = [None] * (self.n_layers + 1)  # MLP inputs, then the final norm output
        self.outputs: list[torch.Tensor | None] = [None] * self.n_layers  # MLP outputs (gradients read here)
        self.leaves: list[torch.Tensor] = []
        with _FreezeAttention():
            with self.model.trace(self.tokens[None].expand(copies, -1)) as tracer:
                self._frozen_forward()
                body()
                tracer.stop()
        self.sites, self.outputs, self.leaves, self.embeds = [], [], [], None

    def _frozen_forward(self) -> None:
        """Inside the trace: freeze every norm's scale, read the MLP inputs, cut the MLP outputs from their inputs
        (each becomes one copy's value, expanded), and make the token embeddings a gradient site."""
        actions = self._actions()
        norm_inputs: dict[str, torch.Tensor] = {}
        for name, io in self.events:
            envoy = self.model.get(name)
            value = envoy.output if io == "output" else envoy.input
            first = value[0] if isinstance(value, tuple) else value
            new = first
            for action in actions[name, io]:
                new = action(name, new, norm_inputs)
            if new is not first:
                if io == "input":
                    envoy.input = new
                else:
                    envoy.output = (new, *value[1:]) if isinstance(value, tuple) else new

    def _actions(self) -> dict[tuple[str, str], list[Callable]]:
        """What the frozen run does at each envoy value, in this order: norms, embeddings, reads, MLP cuts, writes."""
        actions: dict[tuple[str, str], list[Callable]] = {event: [] for event in self.events}
        tc = self.transcoders

        def norm_input(name: str, x: torch.Tensor, norm_inputs: dict) -> torch.Tensor:
            norm_inputs[name] = x
            return x

        def norm_output(name: str, out: torch.Tensor, norm_inputs: dict) -> torch.Tensor:
            module = self.hf.get_submodule(name)
            linear = _norm_linear(module, self.norms[name], norm_inputs.pop(name), self.gemma_gain[name])
            return out.detach() + (linear - linear.detach()).to(out.dtype)

        def embed(name: str, out: torch.Tensor, norm_inputs: dict) -> torch.Tensor:
            self.embeds = self._gradient_site(out)
            return self.embeds

        def read(layer: int) -> Callable:
            def fn(name: str, x: torch.Tensor, norm_inputs: dict) -> torch.Tensor:
                self.sites[layer] = x if layer == self.n_layers else _read_value(self.read_points[layer], x)
                return x
            return fn

        def cut(name: str, x: torch.Tensor, norm_inputs: dict) -> torch.Tensor:
            return x[:1]  # the MLP's output is a constant: compute it for one copy only

        def write(layer: int) -> Callable:
            def fn(name: str, out: torch.Tensor, norm_inputs: dict) -> torch.Tensor:
                if tc.skip_connection:
                    skip = tc.compute_skip(layer, self.sites[layer]).to(out.dtype)
                    new = skip + (out - skip[:1]).detach()
                else:
                    new = self._gradient_site(out)
                self.outputs[layer] = new
                return new
            return fn

        for name in self.norms:
            actions[name, "input"].append(norm_input)
            actions[name, "output"].append(norm_output)
        actions[self.embed_name, "output"].append(embed)
        for layer, point in enumerate(self.read_points):
            actions[point.module, point.io].append(read(layer))
        actions[self.unembed_name, "input"].append(read(self.n_layers))
        for mlp in self._mlp_modules():
            actions[mlp, "input"].append(cut)
        for layer, point in enumerate(self.write_points):
            actions[point.module, point.io].append(write(layer))
        return actions

    def _gradient_site(self, value: torch.Tensor) -> torch.Tensor:
        """A constant (one copy's value) seen by every copy: a view whose gradient is read per copy, with no
        batch-sized buffer kept."""
        leaf = value[:1].detach().requires_grad_(True)
        self.leaves.append(leaf)
        return leaf.expand(self.copies, *value.shape[1:])

    def _mlp_modules(self) -> list[str]:
        """The MLP modules whose whole output reaches the residual only through the write points (TL's
        `hook_mlp_out` of a family in the hook table); empty when that is not known."""
        if self.transcoders.feature_output_hook != "hook_mlp_out":
            return []
        try:
            points = [resolve_hook(self.hf, hook_name=f"blocks.{layer}.mlp.hook_in").read
                      for layer in range(self.n_layers)]
        except ValueError:
            return []
        return [point.module for point in points if point.io == "input" and not point.normalize]

    # -- rows of the adjacency --

    def rows(self, layers: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor, rows: torch.Tensor) -> None:
        """Fill `rows` [n, n_active + (n_layers + 1) * n_pos + 1] (zeros; the last column is spare) with the direct
        effects on the targets `vectors[i]`·(site at `layers[i]`, `positions[i]`); layer n_layers is the final norm
        output. `rows` is a slice of the caller's edge matrix, filled in place (no batch-sized copy)."""
        n, n_pos, n_layers = len(layers), self.n_pos, self.n_layers
        sites, grads = [], []
        for layer in layers.unique().tolist():
            mask = layers == layer
            site = self.sites[layer]
            grad = torch.zeros_like(site)
            grad[mask.nonzero().squeeze(1), positions[mask]] = vectors[mask].to(site)
            sites.append(site)
            grads.append(grad)
        got = self._gradients(_Inject.apply(grads, *sites), min(int(layers.max()), n_layers))
        # The spare column absorbs the padding of `_by_position`.
        for layer, (cols, padded) in enumerate(self.decoders):
            for j, out_layer in enumerate(self.transcoders.output_layers(layer)):
                grad = got[out_layer]
                if grad is None or cols.numel() == 0:
                    continue
                # [n_pos, n, d] @ [n_pos, d, max_m]: every position's gradient against its features' decoders.
                effects = torch.bmm(grad[:n].float().transpose(0, 1), padded[:, :, j].transpose(1, 2))
                rows.index_add_(1, cols.flatten(), effects.permute(1, 0, 2).reshape(n, -1))
        error_start = self.n_active
        for layer in range(n_layers):
            if got[layer] is not None:
                block = slice(error_start + layer * n_pos, error_start + (layer + 1) * n_pos)
                rows[:, block] = torch.einsum("bpd,pd->bp", got[layer][:n].float(), self.errors[layer])
        if got[-1] is not None:
            token_start = error_start + n_layers * n_pos
            rows[:, token_start:-1] = torch.einsum("bpd,pd->bp", got[-1][:n].float(), self.token_vectors)

    def _gradients(self, objective: torch.Tensor, reached: int) -> list[torch.Tensor | None]:
        """One backward pass from `objective`, in nnsight's backward session: the gradients at the MLP outputs
        below layer `reached` (the only ones a target reaches) and at the embeddings, else None. nnsight serves
        them in the order the pass produces them (latest layer first, embeddings last)."""
        got: list[torch.Tensor | None] = [None] * (self.n_layers + 1)
        with objective.backward(retain_graph=True):
            for layer in range(reached - 1, -1, -1):
                got[layer] = self.outputs[layer].grad.save()
            got[-1] = self.embeds.grad.save()
        for leaf in self.leaves:  # the expanded sites' bases accumulate gradients nobody reads
            leaf.grad = None
        return got


class _Inject(torch.autograd.Function):
    """A scalar whose backward pass hands each site its given gradient (no product with the sites is formed or
    kept): `_Inject.apply(grads, *sites).backward()` is `torch.autograd.backward(sites, grads)` as one tensor."""

    @staticmethod
    def forward(ctx: Any, grads: list[torch.Tensor], *sites: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return sites[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: torch.Tensor) -> tuple[None, ...]:
        grads, ctx.grads = ctx.grads, None
        return (None, *grads)


def _by_position(cols: torch.Tensor, pos: torch.Tensor, scaled: torch.Tensor, n_pos: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's scaled decoder rows grouped by position and zero-padded: (columns [n_pos, max_m], decoders
    [n_pos, max_m, n_out, d_model]); padding slots hold -1 until `_encode` points them at the spare last column."""
    counts = torch.bincount(pos, minlength=n_pos)
    width = int(counts.max()) if len(pos) else 0
    slot = torch.arange(len(pos), device=pos.device) - (counts.cumsum(0) - counts)[pos]  # rank within position
    columns = torch.full((n_pos, width), -1, dtype=torch.long, device=pos.device)
    columns[pos, slot] = cols
    padded = scaled.new_zeros(n_pos, width, *scaled.shape[1:])
    padded[pos, slot] = scaled
    return columns, padded


# ---- the attribution loop --------------------------------------------------------------------------------------


def _partial_influences(rows: torch.Tensor, row_nodes: torch.Tensor, logit_probs: torch.Tensor, n_sources: int,
                        max_iter: int = 128) -> torch.Tensor:
    """circuit-tracer's logit influence of every source node from the rows computed so far: |rows| normalised per
    row, propagated from the logit nodes (weighted by probability) until nothing flows. Chunked over rows so no
    copy of the row matrix is made."""
    n_logits = len(logit_probs)
    step = max(1, _CHUNK_ELEMENTS // max(1, rows.shape[1]))
    row_sums = torch.cat([chunk.abs().sum(1) for chunk in rows.split(step)]).clamp(min=1e-8)
    node_values = torch.zeros(n_sources + n_logits, device=rows.device)
    node_values[n_sources:] = logit_probs.to(rows.device)
    influences = torch.zeros(n_sources, device=rows.device)
    for _ in range(max_iter):
        weights = node_values[row_nodes] / row_sums
        flowed = torch.zeros(n_sources, device=rows.device)
        for s in range(0, len(rows), step):
            flowed += weights[s:s + step] @ rows[s:s + step].abs()
        if not flowed.any():
            return influences
        influences += flowed
        node_values = torch.cat([flowed, torch.zeros(n_logits, device=rows.device)])
    raise RuntimeError("Logit influence did not converge.")


def _run(rm: _ReplacementModel, tokens: torch.Tensor, targets: tuple, tokenizer: Any, transcoders: Transcoders,
         max_feature_nodes: int | None, batch_size: int, update_interval: int) -> Graph:
    logit_targets, logit_probs, logit_vectors = targets
    n_layers, n_pos, n_active = rm.n_layers, rm.n_pos, rm.n_active
    n_logits = len(logit_targets)
    n_sources = n_active + (n_layers + 1) * n_pos  # feature, error and token nodes: the columns rows fill
    max_feature_nodes = min(n_active if max_feature_nodes is None else max_feature_nodes, n_active)
    logger.info("%d active features, %d logit targets, attributing %d features", n_active, n_logits,
                max_feature_nodes)
    device = rm.token_vectors.device
    edges = torch.zeros(n_logits + max_feature_nodes, n_sources + 1, device=device)  # + the rows' spare column
    row_nodes = torch.zeros(n_logits + max_feature_nodes, dtype=torch.long, device=device)
    feature_layers, feature_pos, feature_ids = rm.active_features.T.to(device)
    visited = torch.zeros(n_active, dtype=torch.bool, device=device)
    filled = n_logits

    def attribute_rows() -> None:
        """Inside the frozen trace: logit rows, then feature rows in order of (re-estimated) logit influence."""
        nonlocal filled
        # Row node ids: feature i -> i, logit i -> n_sources + i (the influence vector's layout).
        for start in range(0, n_logits, batch_size):
            batch = logit_vectors[start:start + batch_size]
            rm.rows(torch.full((len(batch),), n_layers, device=device),
                    torch.full((len(batch),), n_pos - 1, device=device), batch, edges[start:start + len(batch)])
            row_nodes[start:start + len(batch)] = n_sources + torch.arange(start, start + len(batch), device=device)
        n_visited = 0
        while n_visited < max_feature_nodes:
            if max_feature_nodes == n_active:
                pending = torch.arange(n_active, device=device)
            else:
                influences = _partial_influences(edges[:filled, :n_sources], row_nodes[:filled], logit_probs,
                                                 n_sources)
                ranking = torch.argsort(influences[:n_active], descending=True, stable=True)
                queue = min(update_interval * batch_size, max_feature_nodes - n_visited)
                pending = ranking[~visited[ranking]][:queue]
            for batch in pending.split(batch_size):
                layers = feature_layers[batch]
                vectors = torch.cat([transcoders.encoder_vectors(int(layer), feature_ids[batch][layers == layer])
                                     for layer in layers.unique()]).float()
                order = torch.cat([(layers == layer).nonzero().squeeze(1) for layer in layers.unique()])
                batch = batch[order]  # grouped by layer, matching `vectors`
                rm.rows(feature_layers[batch], feature_pos[batch], vectors, edges[filled:filled + len(batch)])
                row_nodes[filled:filled + len(batch)] = batch
                visited[batch] = True
                filled += len(batch)
                n_visited += len(batch)
            logger.info("attributed %d/%d features", n_visited, max_feature_nodes)

    rm.run_frozen(max(1, min(batch_size, max(n_logits, max_feature_nodes))), attribute_rows)

    selected = visited.nonzero().squeeze(1)
    columns = torch.cat([selected, torch.arange(n_active, n_sources, device=device)])
    n_selected = len(selected)
    total = n_selected + (n_layers + 1) * n_pos + n_logits
    adjacency = torch.zeros(total, total)
    feature_rows = torch.arange(n_logits, filled, device=device)
    slot = torch.empty(n_active, dtype=torch.long, device=device)
    slot[selected] = torch.arange(n_selected, device=device)
    adjacency[slot[row_nodes[feature_rows]].cpu(), : total - n_logits] = edges[feature_rows][:, columns].cpu()
    adjacency[total - n_logits:, : total - n_logits] = edges[:n_logits][:, columns].cpu()

    hf = rm.hf
    return Graph(
        input_string=tokenizer.decode(tokens.tolist()) if tokenizer is not None else "",
        input_tokens=tokens.cpu(),
        active_features=rm.active_features.cpu(),
        adjacency_matrix=adjacency,
        cfg=GraphConfig.from_hf(hf.config, n_layers, rm.logits.shape[-1]),
        selected_features=selected.cpu(),
        activation_values=rm.activation_values.cpu(),
        logit_targets=logit_targets,
        logit_probabilities=logit_probs.cpu(),
        scan=transcoders.scan,
        vocab_size=getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None,
    )
