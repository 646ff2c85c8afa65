"""The one splice computation, and the inline (remote-friendly) `splice`.

`splice_activation` maps the activation at an SAE's write hook to the one the model continues with:
read → (centre, hook_z head view) → encode → (edits at the hook points) → decode → (flatten heads) → error term →
write back. The mounted splice (`nnsae.attach`) and the inline `splice()` both call it, so every architecture and
every `reshape_activations` behave the same in a local trace, a persistent attach and a remote body.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from nnsae.hooks import HookPoint, HookSpec, resolve_hook
from nnsae.seam import tensor_version, unwrap_model

__all__ = ["first_tensor", "hook_z_heads", "replace_first", "sae_input", "splice", "splice_activation"]


def first_tensor(value: Any) -> torch.Tensor:
    """A module's activation: its output (or input), or the first element when it is a tuple/list."""
    return value[0] if isinstance(value, (tuple, list)) else value


def replace_first(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    return new


def hook_z_heads(sae: Any, config: Any) -> int | None:
    """The head count to view a flat ``attn.hook_z`` activation as ``[..., n_heads, d_head]`` for an SAE that
    reshapes its input (``reshape_activations="hook_z"``); None for every other SAE."""
    if getattr(sae.cfg, "reshape_activations", "none") != "hook_z" or not getattr(sae, "reshapes_input", True):
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = getattr(text_config, "num_attention_heads", None)
    if not isinstance(n_heads, int):
        raise ValueError("A hook_z SAE needs the model config's num_attention_heads to view heads; it has none.")
    return n_heads


def _snapshot(t: torch.Tensor) -> tuple[torch.Tensor, Any]:
    return (t, t.clone()) if t.is_inference() else (t, tensor_version(t))


def _untouched(snapshot: tuple[torch.Tensor, Any], after: torch.Tensor) -> bool:
    """Whether a hook returned the very tensor it was given, unmodified (no assignment, no in-place edit)."""
    before, ref = snapshot
    if after is not before:
        return False
    if isinstance(ref, int):
        return tensor_version(before) == ref
    return torch.equal(before, ref)


def sae_input(sae: Any, source: torch.Tensor, read: HookPoint, n_heads: int | None, label: str) -> torch.Tensor:
    """The SAE's input from the HF activation at its read point: the point's transform, the SAE's device, the
    hook_z head view; the width is checked against ``d_in``."""
    x = read.to_sae(source)
    if x.device != sae.W_dec.device:
        x = x.to(sae.W_dec.device)
    if n_heads is not None:
        x = x.unflatten(-1, (n_heads, -1))
        width = x.shape[-1] * x.shape[-2]
    else:
        width = x.shape[-1]
    if width != sae.cfg.d_in:
        raise ValueError(
            f"nnsae: the SAE at {label!r} expects width d_in={sae.cfg.d_in}, but the activation at "
            f"{read.module}.{read.io} has width {width} (shape {tuple(source.shape)})."
        )
    return x


def splice_activation(sae: Any, source: torch.Tensor, act: torch.Tensor, spec: HookSpec, *, use_error_term: bool,
                      n_heads: int | None, label: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The activation the model continues with at the write point, given ``source`` (the HF activation at the read
    point; ``act`` itself unless a transcoder) and ``act`` (the HF activation at the write point).

    The reconstruction passes the SAE's hook points, where traces and torch hooks may read or edit. With
    ``use_error_term`` the clean, detached error ``act - clean reconstruction`` (0 at masked positions) is added
    through ``hook_sae_error``; while nothing is edited the result is ``act`` bit for bit, with SAELens' gradient
    (through the reconstruction only). ``mask`` ([..., 1] bool, True = pass ``act`` through) marks excluded
    positions (special tokens).
    """
    read, write = spec.read, spec.write
    x = sae_input(sae, source, read, n_heads, label)

    def flat(y: torch.Tensor) -> torch.Tensor:
        return y.flatten(-2) if n_heads is not None and y.dim() >= 2 else y

    recon = flat(sae.reconstruct(x))
    target = write.to_sae(act)
    if target.device != recon.device:
        target = target.to(recon.device)
    delta = None
    if use_error_term:
        clean = flat(sae.clean_reconstruct(x))
        with torch.no_grad():
            error = target.to(clean.dtype) - clean
            if mask is not None:
                error = error.masked_fill(mask.to(error.device), 0)
        snap = _snapshot(error)
        error_out = sae._hook("hook_sae_error", error)
        out = recon + error_out
        if _untouched(snap, error_out):
            # Error term unedited: write `act + (recon - clean)`, bit-identical to `act` while the features are
            # unedited (and with SAELens' gradient: only through the reconstruction).
            delta = recon - clean
    else:
        out = recon
    if mask is not None:
        out = torch.where(mask.to(out.device), target.to(out.dtype), out)
    snap = _snapshot(out)
    out_h = sae._hook("hook_sae_output", out)
    if delta is not None and _untouched(snap, out_h):
        if mask is not None:
            delta = delta.masked_fill(mask.to(delta.device), 0)
        new = act.detach() + delta.to(device=act.device, dtype=act.dtype)
        if write.center:
            mean = act.mean(-1, keepdim=True)
            new = new + (mean - mean.detach())  # exactly 0; keeps the mean's gradient like from_sae does
        return new
    new = write.from_sae(out_h.to(act.device), act).to(act.dtype)
    return new if mask is None else torch.where(mask, act, new)


def _value(envoy: Any, io: str) -> Any:
    return envoy.output if io == "output" else envoy.input


def _put(envoy: Any, io: str, value: Any) -> None:
    if io == "output":
        envoy.output = value
    else:
        envoy.input = value


def splice(model: Any, sae: Any, *, hook: Any = None, hook_out: Any = None, use_error_term: bool = False,
           edit: Callable[[torch.Tensor], torch.Tensor | None] | None = None, mode: str = "splice") -> torch.Tensor:
    """Inside a trace body: run ``sae`` at its hook without mounting anything; returns the feature activations.

    Where: ``hook`` (anything `nnsae.resolve_hook` takes; default the SAE's metadata, which also gives a
    transcoder's write point) and ``hook_out`` (a transcoder's write point, when ``hook`` is given). ``edit(features)``
    may modify the features (in place, or by returning new ones) before they are decoded; the model continues from
    the (edited) reconstruction, plus the clean error with ``use_error_term``. ``mode="observe"`` only encodes.

    This is the remote (NDIF) path: nothing is mounted, so only the SAE and the body travel (nnsae's code ships by
    value). Resolving a `HookPoint` before the trace keeps the body small. Reads happen at the hook's ``.output`` /
    ``.input``, so call it in execution order with your other reads.
    """
    if mode not in ("splice", "observe"):
        raise ValueError(f"nnsae.splice: mode must be 'splice' or 'observe', got {mode!r}.")
    spec = resolve_hook(model, sae if hook is None else hook)
    if hook_out is not None:
        spec = HookSpec(read=spec.read, write=resolve_hook(model, hook_out).read)
    elif hook is not None:
        spec = HookSpec(read=spec.read, write=spec.read)
    if mode == "splice" and spec.write.normalize is not None:
        raise ValueError(f"nnsae.splice: {spec.write.module}.{spec.write.io} is a read-only (normalized) point.")
    root = unwrap_model(model)
    n_heads = hook_z_heads(sae, root.config) if hasattr(root, "config") else None
    label = f"{spec.read.module}.{spec.read.io}"

    def envoy(path: str) -> Any:
        return model.get(path) if path else model

    read_envoy = envoy(spec.read.module)
    read_value = _value(read_envoy, spec.read.io)
    source = first_tensor(read_value)
    features: list[torch.Tensor] = []

    def capture(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        edited = edit(output) if edit is not None else None
        features.append(output if edited is None else edited)
        return edited

    handle = sae.hook_sae_acts_post.register_forward_hook(capture)
    try:
        if mode == "observe":
            sae.encode(sae_input(sae, source, spec.read, n_heads, label))
            return features[0]
        write_envoy = read_envoy if spec.write == spec.read else envoy(spec.write.module)
        value = read_value if spec.write == spec.read else _value(write_envoy, spec.write.io)
        new = splice_activation(sae, source, first_tensor(value), spec, use_error_term=use_error_term,
                                n_heads=n_heads, label=label)
    finally:
        handle.remove()
    _put(write_envoy, spec.write.io, replace_first(value, new))
    return features[0]
