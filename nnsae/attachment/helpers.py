"""HookedSAETransformer-style helpers on top of `attach`, with SAELens' names, arguments and semantics:
`saes`, `run_with_saes`, `run_with_cache`, `run_with_cache_with_saes`, `run_with_hooks_with_saes`, `steer`,
`feature_attribution`.

Hook names are SAELens': an SAE's points are ``f"{hook_name}.hook_sae_acts_post"`` etc. (a transcoder's at its output
hook), model points are TransformerLens names where the family is known (``blocks.3.hook_resid_post``), else HF
module paths. A hook function is TransformerLens' ``fn(activation, hook)`` (``hook.name`` is the point's name) and may
return a replacement. A temporary SAE at a hook that already has one replaces it for the run, which restores it after.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from nnsae.architectures.base import HOOK_NAMES, SAE
from nnsae.attachment.handle import SAEHandle
from nnsae.attachment.mount import attach, attached, occupants
from nnsae.attachment.splice import first_tensor, replace_first
from nnsae.hooks import HookPoint, resolve_hook, tl_hook_names
from nnsae.seam import is_nnsight, unwrap_model

__all__ = ["Hook", "feature_attribution", "lm_loss", "run_with_cache", "run_with_cache_with_saes", "run_with_hooks_with_saes",
           "run_with_saes", "saes", "steer"]

RETURN_TYPES = ("logits", "loss", "both", "raw", None)
HookFn = Callable[[torch.Tensor, "Hook"], "torch.Tensor | None"]
NameFilter = "str | Sequence[str] | Callable[[str], bool] | None"


@dataclass
class Hook:
    """What a hook function gets as its ``hook`` argument (TransformerLens' HookPoint, reduced to its data)."""

    name: str
    ctx: dict = field(default_factory=dict)

    def layer(self) -> int:
        parts = self.name.split(".")
        if parts[0] != "blocks" or len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"{self.name!r} is not a layer's hook point.")
        return int(parts[1])


@contextlib.contextmanager
def saes(model: Any, saes: SAE | Sequence[SAE] = (), *, reset_saes_end: bool = True,
         use_error_term: bool | None = None, mode: str = "splice", exclude_special_tokens: bool | Sequence[int] = False,
         hook: Any = None) -> Iterator[list[SAEHandle]]:
    """Attach ``saes`` for the duration of the ``with`` block (SAELens ``model.saes(...)``); yields the handles.

    An SAE already attached at the same input hook is suspended for the block and restored after. With
    ``reset_saes_end=False`` the new SAEs stay attached (and replace the old ones for good)."""
    items = [saes] if isinstance(saes, SAE) else list(saes)
    handles: list[SAEHandle] = []
    suspended: list[SAEHandle] = []

    def undo() -> None:
        for handle in reversed(handles):
            handle.detach()
        for old in reversed(suspended):
            old.resume()

    try:
        for sae in items:
            spec = resolve_hook(model, sae if hook is None else hook)
            for old in occupants(model, spec):
                old.suspend()
                suspended.append(old)
            handles.append(attach(model, sae, hook=hook, mode=mode, use_error_term=use_error_term,
                                  exclude_special_tokens=exclude_special_tokens, persistent=True, stack=True))
    except BaseException:  # all or nothing: a failing SAE leaves the model as it was, whatever reset_saes_end says
        undo()
        raise
    try:
        yield handles
    finally:
        if reset_saes_end:
            undo()
        else:
            for old in suspended:
                old.detach()


_with_saes = saes  # for the functions below, whose `saes` argument shadows the context manager


def steer(model: Any, sae: SAE, feature: int | Sequence[int] | torch.Tensor,
          coeff: float | Sequence[float] | torch.Tensor = 1.0, *, hook: Any = None,
          positions: int | slice | Sequence[int] | None = None, persistent: bool | None = None) -> SAEHandle:
    """Add ``coeff * W_dec[feature]`` at the SAE's write hook without running the SAE (``mode="steer"``).

    Scoped like `attach` (this trace inside a trace body, else until ``handle.detach()``)."""
    handle = attach(model, sae, hook=hook, mode="steer", persistent=persistent)
    try:
        return handle.steer(feature, coeff, positions)
    except BaseException:
        handle.detach()
        raise


# ---------------------------------------------------------------------------------------------------------------
# one forward, its result as TransformerLens returns it
# ---------------------------------------------------------------------------------------------------------------


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """TransformerLens' next-token cross-entropy: ``-log p(token[i+1] | ..i)``, per position ``[batch, pos-1]`` or
    its mean."""
    log_probs = logits.log_softmax(dim=-1)
    predicted = log_probs[..., :-1, :].gather(dim=-1, index=tokens[..., 1:, None].to(logits.device))[..., 0]
    return -predicted if per_token else -predicted.mean()


def _empty_input(tokens: Any) -> bool:
    """A token tensor without positions, an empty prompt, or a list of empty prompts."""
    if isinstance(tokens, torch.Tensor):
        return not tokens.is_floating_point() and (tokens.dim() == 0 or tokens.shape[-1] == 0)
    if isinstance(tokens, str):
        return not tokens
    return isinstance(tokens, (list, tuple)) and bool(tokens) and all(isinstance(t, str) and not t for t in tokens)


def _forward(model: Any, args: tuple, kwargs: dict, return_type: str | None, loss_per_token: bool) -> Any:
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}.")
    if _empty_input(args[0] if args else kwargs.get("input_ids")):
        raise ValueError("The input is empty: pass at least one token (a non-empty prompt or token tensor).")
    seen: list[torch.Tensor] = []

    def remember(module: nn.Module, f_args: tuple, f_kwargs: dict) -> None:
        ids = f_kwargs.get("input_ids")
        if ids is None and f_args and isinstance(f_args[0], torch.Tensor) and not f_args[0].is_floating_point():
            ids = f_args[0]
        seen.append(ids)

    handle = unwrap_model(model).register_forward_pre_hook(remember, with_kwargs=True)
    try:
        output = model.trace(*args, trace=False, **kwargs) if is_nnsight(model) else model(*args, **kwargs)
    finally:
        handle.remove()
    if return_type == "raw":
        return output
    if return_type is None:
        return None
    logits = output.logits if hasattr(output, "logits") else output
    if return_type == "logits":
        return logits
    if not seen or seen[0] is None:
        raise ValueError(f"return_type={return_type!r} needs token ids (input_ids); the model was called without.")
    loss = lm_loss(logits, seen[0], loss_per_token)
    return loss if return_type == "loss" else (logits, loss)


def run_with_saes(model: Any, *model_args: Any, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
                  use_error_term: bool | None = None, exclude_special_tokens: bool | Sequence[int] = False,
                  mode: str = "splice", return_type: str | None = "logits", loss_per_token: bool = False,
                  **model_kwargs: Any) -> Any:
    """One forward pass with ``saes`` attached (SAELens ``run_with_saes``). ``return_type``: ``"logits"``,
    ``"loss"`` (TransformerLens' mean next-token loss, or per token with ``loss_per_token``), ``"both"``, None, or
    ``"raw"`` (the model's output object). ``reset_saes_end=False`` leaves them attached."""
    with _with_saes(model, saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term, mode=mode,
                           exclude_special_tokens=exclude_special_tokens):
        return _forward(model, model_args, model_kwargs, return_type, loss_per_token)


# ---------------------------------------------------------------------------------------------------------------
# named points: the model's (TL names / HF paths) and every attached SAE's
# ---------------------------------------------------------------------------------------------------------------


def _sae_points(model: Any) -> dict[str, tuple[SAEHandle, str]]:
    points: dict[str, tuple[SAEHandle, str]] = {}
    for handle in attached(model):
        for hook_name in HOOK_NAMES:
            key = f"{handle.cache_prefix}.{hook_name}"
            if key in points:
                raise ValueError(f"Two attached SAEs share the hook name {handle.cache_prefix!r}; attach one with "
                                 "another hook name or stack=False.")
            points[key] = (handle, hook_name)
    return points


def _model_points(model: Any, replaced: set[str]) -> list[str]:
    """TL model points, but not those an attached SAE sits at (in SAELens its wrapper takes their place)."""
    return [name for name in tl_hook_names(model) if name not in replaced]


def _filter(names_filter: Any) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    allowed = set(names_filter)
    return lambda name: name in allowed


def _on_point(model: Any, name: str, sae_points: dict[str, tuple[SAEHandle, str]],
              fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable[[], None]:
    """Call ``fn(activation)`` at the point ``name`` in every forward; a returned tensor replaces the activation.
    Returns the remover."""
    if name in sae_points:
        handle, hook_name = sae_points[name]

        def sae_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            return fn(output)

        return getattr(handle.module, hook_name).register_forward_hook(sae_hook).remove
    point: HookPoint = resolve_hook(model, name).read
    module = unwrap_model(model).get_submodule(point.module)

    def run(act: torch.Tensor) -> torch.Tensor | None:
        new = fn(point.to_sae(act))
        return None if new is None else point.from_sae(new, act).to(act.dtype)

    if point.io == "output":
        def out_hook(mod: nn.Module, args: tuple, output: Any) -> Any:
            new = run(first_tensor(output))
            return None if new is None else replace_first(output, new)

        return module.register_forward_hook(out_hook).remove

    def in_hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        key = None if args else ("hidden_states" if "hidden_states" in kwargs else next(iter(kwargs)))
        new = run(args[0] if args else kwargs[key])
        if new is None:
            return None
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, key: new})

    return module.register_forward_pre_hook(in_hook, with_kwargs=True).remove


def _expand(model: Any, hooks: Sequence[tuple[Any, HookFn]], sae_points: dict) -> list[tuple[str, HookFn]]:
    """(name or name filter, fn) pairs → (name, fn), a filter standing for every known point it accepts."""
    known = list(sae_points) + _model_points(model, set())
    out = []
    for name, fn in hooks:
        if callable(name):
            out += [(point, fn) for point in known if name(point)]
        else:
            out.append((name, fn))
    return out


def run_with_hooks_with_saes(model: Any, *model_args: Any, saes: SAE | Sequence[SAE] = (),
                             fwd_hooks: Sequence[tuple[Any, HookFn]] = (), bwd_hooks: Sequence[tuple[Any, HookFn]] = (),
                             reset_saes_end: bool = True, use_error_term: bool | None = None,
                             exclude_special_tokens: bool | Sequence[int] = False, return_type: str | None = "logits",
                             loss_per_token: bool = False, **model_kwargs: Any) -> Any:
    """One forward pass with ``saes`` attached and TransformerLens-style hooks (SAELens ``run_with_hooks_with_saes``).

    ``fwd_hooks``/``bwd_hooks``: ``(name, fn)`` pairs, ``name`` an SAE point
    (``blocks.8.hook_resid_pre.hook_sae_acts_post``), a model point (a TL name, or an HF module path with an
    optional ``.input``/``.output``) or a filter ``name -> bool``. ``fn(activation, hook)`` may return a replacement.
    A backward hook gets the gradient at its point (after you call ``.backward()`` on the result) and may return a
    replacement gradient."""
    with _with_saes(model, saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term,
                           exclude_special_tokens=exclude_special_tokens):
        sae_points = _sae_points(model)
        removers = []
        try:
            for name, fn in _expand(model, fwd_hooks, sae_points):
                removers.append(_on_point(model, name, sae_points, lambda act, fn=fn, name=name: fn(act, Hook(name))))
            for name, fn in _expand(model, bwd_hooks, sae_points):
                def grad_hook(act: torch.Tensor, fn: HookFn = fn, name: str = name) -> None:
                    if act.requires_grad:
                        act.register_hook(lambda grad: fn(grad, Hook(name)))

                removers.append(_on_point(model, name, sae_points, grad_hook))
            return _forward(model, model_args, model_kwargs, return_type, loss_per_token)
        finally:
            for remove in reversed(removers):
                remove()


def run_with_cache(model: Any, *model_args: Any, names_filter: NameFilter = None, remove_batch_dim: bool = False,
                   return_type: str | None = "logits", loss_per_token: bool = False,
                   **model_kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """One forward pass, returning ``(result, cache)`` (TransformerLens ``run_with_cache``): the activations at every
    model point (TL names where the family is known) and at every point of the SAEs attached to ``model``, under
    SAELens' names, in forward order. Values are detached; ``remove_batch_dim`` drops a batch dimension of 1."""
    keep = _filter(names_filter)
    sae_points = _sae_points(model)
    replaced = {handle.cache_prefix for handle, _ in sae_points.values()}
    names = [n for n in list(sae_points) + _model_points(model, replaced) if keep(n)]
    cache: dict[str, torch.Tensor] = {}

    def record(name: str) -> Callable[[torch.Tensor], None]:
        def store(act: torch.Tensor) -> None:
            value = act.detach()
            cache[name] = value[0] if remove_batch_dim and value.shape[0] == 1 else value
        return store

    removers = [_on_point(model, name, sae_points, record(name)) for name in names]
    try:
        result = _forward(model, model_args, model_kwargs, return_type, loss_per_token)
    finally:
        for remove in reversed(removers):
            remove()
    return result, cache


def run_with_cache_with_saes(model: Any, *model_args: Any, saes: SAE | Sequence[SAE] = (),
                             reset_saes_end: bool = True, use_error_term: bool | None = None,
                             exclude_special_tokens: bool | Sequence[int] = False, mode: str = "splice",
                             names_filter: NameFilter = None, remove_batch_dim: bool = False,
                             return_type: str | None = "logits", loss_per_token: bool = False,
                             **model_kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """`run_with_cache` with ``saes`` attached for the pass (SAELens ``run_with_cache_with_saes``): the cache holds
    the model's points and those of every attached SAE, persistent or passed in."""
    with _with_saes(model, saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term, mode=mode,
                           exclude_special_tokens=exclude_special_tokens):
        return run_with_cache(model, *model_args, names_filter=names_filter, remove_batch_dim=remove_batch_dim,
                              return_type=return_type, loss_per_token=loss_per_token, **model_kwargs)


def feature_attribution(model: Any, sae: SAE, *model_args: Any, metric_fn: Callable[[Any], torch.Tensor],
                        hook: Any = None, use_error_term: bool = True, **model_kwargs: Any) -> torch.Tensor:
    """Attribution of ``metric_fn(output)`` to each feature at each position: ``acts * d metric / d acts``.

    ``metric_fn`` gets the model's logits (or its raw output when it has none) and returns a scalar. The SAE is
    attached with the error term by default, so the forward pass is the clean model's. Returns
    ``[pos, d_sae]`` for a batch of one, else ``[batch, pos, d_sae]``. Model and SAE parameter gradients are not
    touched (`torch.autograd.grad`).
    """
    captured: list[torch.Tensor] = []
    with _with_saes(model, [sae], use_error_term=use_error_term, hook=hook) as (handle,):
        def leaf(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            value = output.detach().requires_grad_(True)
            captured.append(value)
            return value

        torch_hook = handle.module.hook_sae_acts_post.register_forward_hook(leaf)
        try:
            with torch.enable_grad():
                logits = _forward(model, model_args, model_kwargs, "logits", False)
                metric = metric_fn(logits)
                if metric.numel() != 1:
                    raise ValueError(f"metric_fn must return a scalar, got shape {tuple(metric.shape)}.")
                (grad,) = torch.autograd.grad(metric.reshape(()), captured[0])
        finally:
            torch_hook.remove()
    attribution = (captured[0] * grad).detach()
    return attribution[0] if attribution.dim() == 3 and attribution.shape[0] == 1 else attribution
