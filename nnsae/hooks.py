"""Where an SAE reads and writes in a plain Hugging Face model.

SAELens names hook points the TransformerLens way (``blocks.6.hook_resid_post``); some releases also
give a Hugging Face module path (``hf_hook_name``). This module turns either into a :class:`HookSpec`:
the HF module whose input or output the SAE reads, the one its reconstruction replaces, and the exact
transform between the HF activation and what the SAE was trained on.

Activation convention shared by every :class:`HookPoint` (it matches nnsight's ``.input``/``.output``):

* ``io="output"``: the module's output; if the module returns a tuple, its first element.
* ``io="input"``: the module's first positional argument (``hidden_states``; every supported family
  passes it positionally).

All per-architecture knowledge lives in ``_FAMILIES``.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from nnsae.seam import unwrap_model

__all__ = ["HookPoint", "HookSpec", "hook_label", "is_tl_hook", "mlp_points", "resolve_hook", "tl_hook_names",
           "translate_tl_hook", "get_module"]

NormKind = Literal["layernorm", "rmsnorm"]


@dataclass(frozen=True)
class HookPoint:
    """One place in an HF model, plus the exact transform from its activation to the SAE's input.

    ``module`` is a path as printed by ``hf_model.named_modules()`` (e.g. ``"model.layers.6"``).

    Transforms, applied by :meth:`to_sae` in this order:

    * ``normalize``/``eps``: TransformerLens' ``ln*.hook_normalized``, the norm's input divided by its
      RMS (``"layernorm"``: centred first), *before* the gain. Read-only: :meth:`from_sae` refuses it.
    * ``center``: subtract the mean over the last dim. A TL model loaded with
      ``center_writing_weights=True`` (LayerNorm models only) sees this centred residual stream.

    ``attn.hook_z`` points give the flat ``[batch, pos, n_heads * d_head]`` input of the attention output
    projection (heads are head-major, as TL flattens them); an SAE with ``reshape_activations="hook_z"``
    does the head view itself.
    """

    module: str
    io: Literal["input", "output"] = "output"
    center: bool = False
    normalize: NormKind | None = None
    eps: float = 0.0

    def __post_init__(self) -> None:
        if self.io not in ("input", "output"):
            raise ValueError(f"HookPoint.io must be 'input' or 'output', got {self.io!r}")
        if self.normalize not in (None, "layernorm", "rmsnorm"):
            raise ValueError(f"HookPoint.normalize must be None, 'layernorm' or 'rmsnorm', got {self.normalize!r}")

    def to_sae(self, x: torch.Tensor) -> torch.Tensor:
        """The SAE's input, given the HF activation at this point."""
        if self.normalize is not None:
            x = _normalized(x, self.normalize, self.eps)
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        return x

    def from_sae(self, y: torch.Tensor, original: torch.Tensor | None = None) -> torch.Tensor:
        """The HF activation to write back, given an SAE output in the SAE's space.

        ``original`` is the HF activation that ``y`` replaces; it is needed when ``center`` is set, so
        that the residual keeps the mean component the centred view removed.
        """
        if self.normalize is not None:
            raise ValueError(
                f"{self.module}.{self.io} is read as a normalized activation (TL hook_normalized); "
                "writing there would need the norm's gain, so it can only be a read point (e.g. a transcoder input)."
            )
        if self.center:
            if original is None:
                raise ValueError("from_sae needs `original` to restore the mean removed by center=True")
            y = y + original.mean(-1, keepdim=True)
        return y


@dataclass(frozen=True)
class HookSpec:
    read: HookPoint  # where the SAE input comes from
    write: HookPoint  # where the reconstruction goes (differs from `read` for transcoders)


@dataclass(frozen=True)
class _Family:
    """Where TL's hooks live in one HF architecture.

    ``layers`` and ``embed`` are relative to the ``*ForCausalLM`` model; the rest are relative to a layer.
    """

    layers: str
    embed: str | None  # module whose output is TL's hook_embed; None: the first layer's input (see below)
    ln1: str
    attn: str
    attn_out_proj: str  # its input is TL's attn.hook_z
    mlp: str
    mlp_out_proj: str  # its input is TL's mlp.hook_post
    ln2: str  # the norm in front of the MLP; its input is TL's resid_mid
    attn_out_norm: str | None = None  # norm applied to the attention output before the residual add
    mlp_out_norm: str | None = None
    norm: NormKind = "rmsnorm"
    eps_attr: str = "rms_norm_eps"
    parallel_attr: str | None = None  # config flag: attention and MLP both read the layer input


_LLAMA = _Family(
    layers="model.layers",
    embed="model.embed_tokens",
    ln1="input_layernorm",
    attn="self_attn",
    attn_out_proj="self_attn.o_proj",
    mlp="mlp",
    mlp_out_proj="mlp.down_proj",
    ln2="post_attention_layernorm",
)
# TL's Gemma hook_embed includes the x sqrt(d_model) scaling. transformers >= 5 applies it inside
# embed_tokens (GemmaTextScaledWordEmbedding, with the scale cast to the weight dtype), 4.x applied it in
# the model's forward after embed_tokens. Layer 0's input is the scaled embedding in both, and nothing
# else is added before layer 0, so it is TL's hook_embed exactly.
_GEMMA = replace(_LLAMA, embed=None)
# Gemma 2/3 norm the attention and MLP outputs before adding them to the residual; TL's hook_attn_out
# and hook_mlp_out are after those norms. Here "post_attention_layernorm" is the attention-output norm.
_GEMMA2 = replace(
    _GEMMA,
    ln2="pre_feedforward_layernorm",
    attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
)

_FAMILIES: dict[str, _Family] = {
    "gpt2": _Family(
        layers="transformer.h",
        embed="transformer.wte",
        ln1="ln_1",
        attn="attn",
        attn_out_proj="attn.c_proj",
        mlp="mlp",
        mlp_out_proj="mlp.c_proj",
        ln2="ln_2",
        norm="layernorm",
        eps_attr="layer_norm_epsilon",
    ),
    "gpt_neox": _Family(
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        ln1="input_layernorm",
        attn="attention",
        attn_out_proj="attention.dense",
        mlp="mlp",
        mlp_out_proj="mlp.dense_4h_to_h",
        ln2="post_attention_layernorm",
        norm="layernorm",
        eps_attr="layer_norm_eps",
        parallel_attr="use_parallel_residual",
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
}

_LAYER_HOOKS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "hook_mlp_in",
    "attn.hook_z",
    "mlp.hook_in",
    "mlp.hook_post",
    "ln1.hook_normalized",
    "ln2.hook_normalized",
)
_TL_HOOK = re.compile(r"blocks\.(\d+)\.(" + "|".join(re.escape(h) for h in _LAYER_HOOKS) + r")")
# TL hooks on values written to (or copied from) the residual stream: the ones center_writing_weights centres.
_RESIDUAL_HOOKS = frozenset(
    {"hook_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
     "hook_mlp_in"}
)
_SUPPORTED_HOOKS = "hook_embed, " + ", ".join(f"blocks.L.{h}" for h in _LAYER_HOOKS)
_EXPLICIT_HINT = (
    "pass the HF module explicitly instead, e.g. hook='model.layers.6' (module output) "
    "or hook='model.layers.6.self_attn.o_proj.input'"
)


def get_module(model: Any, path: str) -> torch.nn.Module:
    """The submodule at ``path`` (relative to the HF model root; ``""`` is the root itself).

    ``model`` may be an HF model or an nnsight wrapper. A path written for a ``*ForCausalLM`` model also works on its
    bare base model (``model.layers.3`` on a ``LlamaModel``) and on a multimodal wrapper of the same text model
    (``model.language_model.layers.3`` on ``Gemma3ForConditionalGeneration``).
    """
    root = unwrap_model(model)
    return root.get_submodule(_locate(root, path))


def translate_tl_hook(hook_name: str, config: Any) -> HookPoint:
    """The HF :class:`HookPoint` equal to the TransformerLens hook ``hook_name`` of an unprocessed TL model.

    ``config`` is the HF model's config (``model.config``); module paths are relative to the
    ``*ForCausalLM`` model. Weight-processing options (``center_writing_weights``…) are applied by
    :func:`resolve_hook`, not here.
    """
    text_config = _text_config(config)  # multimodal configs nest the decoder's config
    family = _family(text_config)
    if hook_name == "hook_embed":
        return HookPoint(family.embed, "output") if family.embed else HookPoint(f"{family.layers}.0", "input")
    match = _TL_HOOK.fullmatch(hook_name)
    if match is None:
        raise ValueError(
            f"Unsupported TransformerLens hook {hook_name!r}. Supported: {_SUPPORTED_HOOKS}; or {_EXPLICIT_HINT}."
        )
    index, hook = int(match.group(1)), match.group(2)
    n_layers = text_config.num_hidden_layers
    if index >= n_layers:
        raise ValueError(
            f"{hook_name!r}: layer {index} is out of range; the model has {n_layers} layers (0..{n_layers - 1})."
        )
    layer = f"{family.layers}.{index}"
    parallel = family.parallel_attr is not None and bool(getattr(text_config, family.parallel_attr, False))
    eps = getattr(text_config, family.eps_attr)

    if hook == "hook_resid_pre":
        return HookPoint(layer, "input")
    if hook == "hook_resid_post":
        return HookPoint(layer, "output")
    if hook == "hook_resid_mid":
        if parallel:
            raise ValueError(
                f"{hook_name!r} does not exist: this {config.model_type} model uses a parallel residual "
                "(attention and MLP both read resid_pre), so there is no residual between them."
            )
        return HookPoint(f"{layer}.{family.ln2}", "input")
    if hook == "hook_mlp_in":  # TL: the residual the pre-MLP norm reads (resid_pre when parallel)
        return HookPoint(f"{layer}.{family.ln2}", "input")
    if hook == "hook_attn_out":
        return HookPoint(f"{layer}.{family.attn_out_norm or family.attn}", "output")
    if hook == "hook_mlp_out":
        return HookPoint(f"{layer}.{family.mlp_out_norm or family.mlp}", "output")
    if hook == "attn.hook_z":
        return HookPoint(f"{layer}.{family.attn_out_proj}", "input")
    if hook == "mlp.hook_in":  # added by SAELens' HookedSAETransformer: the MLP's (normed) input
        return HookPoint(f"{layer}.{family.mlp}", "input")
    if hook == "mlp.hook_post":
        return HookPoint(f"{layer}.{family.mlp_out_proj}", "input")
    norm = family.ln1 if hook == "ln1.hook_normalized" else family.ln2
    return HookPoint(f"{layer}.{norm}", "input", normalize=family.norm, eps=eps)


MLP_IN_HOOK, MLP_OUT_HOOK = "mlp.hook_in", "hook_mlp_out"  # the TL names of a transcoder's read and write points


def mlp_points(model: Any, layer: int) -> HookSpec:
    """Where a transcoder of ``layer`` reads (the MLP's input) and writes (the MLP's output) in ``model``.

    Per family: GPT-2 ``ln_2`` output / ``mlp`` output; Llama, Qwen, Mistral ``post_attention_layernorm`` output /
    ``mlp`` output; Gemma 2/3 ``pre_feedforward_layernorm`` output / ``post_feedforward_layernorm`` output (where
    SAELens' Gemma Scope transcoders read and write). These are TL's ``blocks.L.mlp.hook_in`` and
    ``blocks.L.hook_mlp_out``, so the names `resolve_hook` translates give the same points.
    """
    return HookSpec(read=resolve_hook(model, f"blocks.{layer}.{MLP_IN_HOOK}").read,
                    write=resolve_hook(model, f"blocks.{layer}.{MLP_OUT_HOOK}").read)


HookTarget = Any  # str (HF path or TL name) | HookPoint | HookSpec | SAE


def resolve_hook(
    model: Any,
    target: HookTarget = None,
    *,
    hook: str | HookPoint | HookSpec | None = None,
    hook_name: str | None = None,
    hf_hook_name: str | None = None,
    hf_hook_name_out: str | None = None,
    hook_name_out: str | None = None,
    model_from_pretrained_kwargs: dict[str, Any] | None = None,
) -> HookSpec:
    """Where something reads and writes in ``model`` (an HF model or an nnsight wrapper): the one hook resolver.

    ``target`` (or ``hook=``) is whatever a user or an SAE gives: an HF module path with an optional
    ``.input``/``.output`` suffix (bare path: the output), a TransformerLens name (``blocks.6.hook_resid_post``,
    translated by the model family's table), a `HookPoint`/`HookSpec`, or an SAE. For an SAE the names come from
    ``sae.cfg.metadata``: ``hf_hook_name``, then ``hook_name`` (a TL name, or a module path as nnsae and SAELens'
    HookedProxyLM write for HF models); the write side of a transcoder from
    ``hf_hook_name_out``/``hook_name_out`` (only where they differ from the input hook). Keyword names override the
    SAE's. When the model wraps a text model (``Gemma3ForConditionalGeneration``, Llava-style wrappers), paths written
    for the ``*ForCausalLM`` model and TL names resolve against the text model. TL weight-processing options
    (``model_from_pretrained_kwargs``, else the SAE's) adjust translated TL hooks; HF paths are used as they are.
    Unknown names raise one ValueError listing the closest real module paths.
    """
    sae = None
    if isinstance(target, (str, HookPoint, HookSpec)):
        if hook is not None:
            raise ValueError("resolve_hook: give the hook once, as `target` or as `hook=`, not both.")
        hook = target
    elif target is not None:
        sae = target
    if isinstance(hook, HookSpec):
        return hook
    if isinstance(hook, HookPoint):
        return HookSpec(read=hook, write=hook)
    hf_model = unwrap_model(model)
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)

    def saved(key: str) -> Any:
        return getattr(metadata, key, None)

    if model_from_pretrained_kwargs is None:
        model_from_pretrained_kwargs = saved("model_from_pretrained_kwargs")
    processing = model_from_pretrained_kwargs or {}
    # An SAE's *_out metadata only names a separate write point when it differs from its input hook.
    saved_hf_out = saved("hf_hook_name_out") if saved("hf_hook_name_out") != saved("hf_hook_name") else None
    saved_tl_out = saved("hook_name_out") if saved("hook_name_out") != saved("hook_name") else None

    read = _first_point(
        hf_model,
        processing,
        [("any", hook), ("hf", hf_hook_name), ("any", hook_name), ("hf", saved("hf_hook_name")),
         ("any", saved("hook_name"))],
    )
    if read is None:
        raise ValueError(
            "No hook point: pass an HF module path ('model.layers.6', 'model.layers.6.input'), a TransformerLens "
            "name ('blocks.6.hook_resid_post'), or an SAE whose cfg.metadata has hf_hook_name or hook_name."
        )
    write = _first_point(
        hf_model,
        processing,
        [("hf", hf_hook_name_out), ("any", hook_name_out), ("hf", saved_hf_out), ("any", saved_tl_out)],
    )
    return HookSpec(read=read, write=write or read)


def tl_hook_names(model: Any) -> list[str]:
    """Every TransformerLens hook name `resolve_hook` translates on ``model``, in forward order (empty for a model
    family without a table)."""
    root = unwrap_model(model)
    config = getattr(root, "config", None)
    text_config = _text_config(config)
    if getattr(text_config, "model_type", None) not in _FAMILIES:
        return []
    names = ["hook_embed"]
    per_layer = ("hook_resid_pre", "ln1.hook_normalized", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
                 "hook_mlp_in", "ln2.hook_normalized", "mlp.hook_in", "mlp.hook_post", "hook_mlp_out",
                 "hook_resid_post")
    for layer in range(text_config.num_hidden_layers):
        for hook in per_layer:
            try:
                translate_tl_hook(f"blocks.{layer}.{hook}", config)
            except ValueError:  # e.g. resid_mid of a parallel-residual model
                continue
            names.append(f"blocks.{layer}.{hook}")
    return names


def hook_label(point: HookPoint) -> str:
    """How a point is written back as a string that `resolve_hook` reads: ``module`` or ``module.input``."""
    return point.module if point.io == "output" else f"{point.module}.input"


def _first_point(
    hf_model: torch.nn.Module, processing: dict[str, Any], names: list[tuple[str, str | None]]
) -> HookPoint | None:
    """The point named by the first given name: an HF module path ("hf"), a TL hook name ("tl"), or either ("any":
    a path that exists in the model wins; otherwise a TL-shaped name is translated)."""
    for kind, name in names:
        if name is None:
            continue
        if not isinstance(name, str):
            raise TypeError(f"A hook name must be a string, a HookPoint or a HookSpec, got {type(name).__name__}.")
        if kind == "any":
            kind = "tl" if is_tl_hook(hf_model, name) else "hf"
        if kind == "hf":
            module, io = _split_io_suffix(name)
            return HookPoint(_locate(hf_model, module), io)
        point = _with_processing(name, translate_tl_hook(name, hf_model.config), hf_model.config, processing)
        return replace(point, module=_locate(hf_model, point.module))
    return None


def is_tl_hook(model: Any, name: Any) -> bool:
    """Whether `resolve_hook` reads ``name`` as a TransformerLens hook name (``hook_…``, ``blocks.L.…``,
    ``ln_final.…``) rather than as an HF module path (a path that exists in the model wins)."""
    if not isinstance(name, str) or not name.startswith(("hook_", "blocks.", "ln_final.")):
        return False
    return _find(unwrap_model(model), _split_io_suffix(name)[0]) is None


def _split_io_suffix(path: str) -> tuple[str, Literal["input", "output"]]:
    """``"a.b.input"`` → ``("a.b", "input")``; a bare path means the output. (A module literally named
    ``output`` is addressed as ``….output.output``.)"""
    head, _, last = path.rpartition(".")
    if last == "input":
        return head, "input"
    if last == "output":
        return head, "output"
    return path, "output"


def _with_processing(tl_name: str, point: HookPoint, config: Any, processing: dict[str, Any]) -> HookPoint:
    """Adjust a translated TL hook for the weight processing TL applied when the SAE was trained."""
    hook = tl_name.split(".", 2)[-1] if tl_name.startswith("blocks.") else tl_name
    family = _family(_text_config(config))
    # TL centres writing weights only for LayerNorm models (it ignores the flag for RMSNorm ones), which
    # makes every residual-stream value zero-mean over d_model.
    if processing.get("center_writing_weights") and family.norm == "layernorm" and hook in _RESIDUAL_HOOKS:
        point = replace(point, center=True)
    # With folded norms, TL's pre-MLP norm has no gain: the MLP input is the normalized residual.
    if processing.get("fold_ln") and hook == "mlp.hook_in":
        point = translate_tl_hook(tl_name.replace("mlp.hook_in", "ln2.hook_normalized"), config)
    if hook == "attn.hook_z":
        for option, effect in (
            ("fold_value_biases", "moves the value bias b_V out of hook_z"),
            ("refactor_factored_attn_matrices", "changes W_V, so hook_z changes"),
        ):
            if processing.get(option):
                warnings.warn(
                    f"{tl_name}: model_from_pretrained_kwargs {option}=True {effect}; the HF activation read here "
                    "has no such processing, so it may differ from what the SAE was trained on.",
                    stacklevel=4,
                )
    return point


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _family(config: Any) -> _Family:
    """The hook table of a (text) config's model family."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(
            f"No TransformerLens hook mapping for model_type {model_type!r}. "
            f"Supported: {', '.join(sorted(_FAMILIES))}. For other models, {_EXPLICIT_HINT}."
        )
    return _FAMILIES[model_type]


def _locate(root: torch.nn.Module, path: str) -> str:
    """``path`` as it exists in ``root`` (see `_find`), else a ValueError listing the closest module paths."""
    found = _find(root, path)
    if found is not None:
        return found
    close = difflib.get_close_matches(path, sorted(name for name, _ in root.named_modules()), n=5, cutoff=0.5)
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise ValueError(
        f"No module {path!r} in {type(root).__name__} (paths are relative to the HF model root, with an optional "
        f".input/.output suffix; TransformerLens names like 'blocks.0.hook_resid_pre' work for: "
        f"{', '.join(sorted(_FAMILIES))}).{hint}"
    )


def _find(root: torch.nn.Module, path: str) -> str | None:
    """``path`` as it exists in ``root``, or None. A path written for the ``*ForCausalLM`` model is mapped onto a bare
    base model (prefix dropped) and onto a wrapper whose text model sits elsewhere (``model.`` → the decoder's path,
    as ``get_decoder()`` names it: ``model.language_model.`` for Gemma 3 / Llava-style models)."""
    if _has_module(root, path):
        return path
    head, _, rest = path.partition(".")
    prefix = getattr(root, "base_model_prefix", "")
    if rest and head == prefix and getattr(root, "base_model", None) is root and _has_module(root, rest):
        return rest
    decoder_path = _decoder_path(root) if rest and head == prefix else None
    if decoder_path is not None and decoder_path != head:
        candidate = f"{decoder_path}.{rest}" if decoder_path else rest
        if _has_module(root, candidate):
            return candidate
    return None


def _has_module(root: torch.nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _decoder_path(root: torch.nn.Module) -> str | None:
    """Where the text decoder (``get_decoder()``) sits in ``root``, or None when it has none."""
    get_decoder = getattr(root, "get_decoder", None)
    if not callable(get_decoder):
        return None
    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    for name, module in root.named_modules():
        if module is decoder:
            return name
    return None


def _normalized(x: torch.Tensor, kind: NormKind, eps: float) -> torch.Tensor:
    """TL's norm ``hook_normalized``: computed in float32 for low-precision inputs, cast back."""
    x_hi = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if kind == "layernorm":
        x_hi = x_hi - x_hi.mean(-1, keepdim=True)
    return (x_hi / (x_hi.pow(2).mean(-1, keepdim=True) + eps).sqrt()).to(x.dtype)
