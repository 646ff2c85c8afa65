"""HookedSAETransformer-style helpers on top of `attach`: `saes`, `steer`, `run_with_saes`, `run_with_cache_with_saes`,
`feature_attribution`."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from nnsae.architectures.base import HOOK_NAMES, SAE
from nnsae.attach.handle import SAEHandle
from nnsae.attach.mount import attach
from nnsae.seam import is_nnsight

__all__ = ["feature_attribution", "run_with_cache_with_saes", "run_with_saes", "saes", "steer"]


@contextlib.contextmanager
def saes(model: Any, saes: SAE | Sequence[SAE] = (), *, use_error_term: bool | None = None, mode: str = "splice",
         exclude_special_tokens: bool | Sequence[int] = False, hook: Any = None) -> Iterator[list[SAEHandle]]:
    """Attach ``saes`` for the duration of the ``with`` block (SAELens ``model.saes(...)``); yields the handles."""
    items = [saes] if isinstance(saes, SAE) else list(saes)
    handles: list[SAEHandle] = []
    try:
        for sae in items:
            handles.append(attach(model, sae, hook=hook, mode=mode, use_error_term=use_error_term,
                                  exclude_special_tokens=exclude_special_tokens, persistent=True))
        yield handles
    finally:
        for handle in reversed(handles):
            handle.detach()


def steer(model: Any, sae: SAE, feature: int | Sequence[int] | torch.Tensor,
          coeff: float | Sequence[float] | torch.Tensor = 1.0, *, hook: Any = None,
          positions: int | slice | Sequence[int] | None = None, persistent: bool | None = None) -> SAEHandle:
    """Add ``coeff * W_dec[feature]`` at the SAE's write hook without running the SAE (``mode="steer"``).

    Scoped like `attach` (this trace inside a trace body, else until ``handle.detach()``)."""
    handle = attach(model, sae, hook=hook, mode="steer", persistent=persistent)
    return handle.steer(feature, coeff, positions)


def _forward(model: Any, args: tuple, kwargs: dict) -> Any:
    if is_nnsight(model):
        return model.trace(*args, trace=False, **kwargs)
    return model(*args, **kwargs)


def _logits(output: Any, return_type: str | None) -> Any:
    if return_type is None or return_type == "raw":
        return output
    if return_type == "logits":
        return output.logits if hasattr(output, "logits") else output
    raise ValueError(f"return_type must be 'logits', 'raw' or None, got {return_type!r}.")


def run_with_saes(model: Any, *model_args: Any, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
                  use_error_term: bool | None = None, exclude_special_tokens: bool | Sequence[int] = False,
                  mode: str = "splice", return_type: str | None = "logits", **model_kwargs: Any) -> Any:
    """One forward pass with ``saes`` attached (SAELens ``HookedSAETransformer.run_with_saes``); returns the logits
    (``return_type="raw"``: the model's output object). ``reset_saes_end=False`` leaves them attached."""
    items = [saes] if isinstance(saes, SAE) else list(saes)
    handles = [attach(model, s, mode=mode, use_error_term=use_error_term,
                      exclude_special_tokens=exclude_special_tokens, persistent=True) for s in items]
    try:
        return _logits(_forward(model, model_args, model_kwargs), return_type)
    finally:
        if reset_saes_end:
            for handle in reversed(handles):
                handle.detach()


def run_with_cache_with_saes(model: Any, *model_args: Any, saes: SAE | Sequence[SAE] = (),
                             reset_saes_end: bool = True, use_error_term: bool | None = None,
                             exclude_special_tokens: bool | Sequence[int] = False, mode: str = "splice",
                             names_filter: str | Sequence[str] | Callable[[str], bool] | None = None,
                             remove_batch_dim: bool = False, return_type: str | None = "logits",
                             **model_kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Like `run_with_saes`, also returning the SAE hook activations keyed SAELens-style:
    ``f"{hook_name}.hook_sae_acts_post"`` etc., where ``hook_name`` is the SAE's ``cfg.metadata.hook_name`` (else
    its HF path). Values are detached; ``remove_batch_dim`` drops a batch dimension of 1."""
    if isinstance(names_filter, str):
        keep: Callable[[str], bool] = lambda key: key == names_filter  # noqa: E731
    elif callable(names_filter):
        keep = names_filter
    elif names_filter is not None:
        allowed = set(names_filter)
        keep = lambda key: key in allowed  # noqa: E731
    else:
        keep = lambda key: True  # noqa: E731
    items = [saes] if isinstance(saes, SAE) else list(saes)
    cache: dict[str, torch.Tensor] = {}
    torch_hooks = []
    handles = []
    try:
        for sae in items:
            handle = attach(model, sae, mode=mode, use_error_term=use_error_term,
                            exclude_special_tokens=exclude_special_tokens, persistent=True)
            handles.append(handle)
            for hook_name in HOOK_NAMES:
                key = f"{handle.hook_name}.{hook_name}"
                if not keep(key):
                    continue
                if any(key.startswith(f"{h.hook_name}.") for h in handles[:-1]):
                    raise ValueError(f"run_with_cache_with_saes: two SAEs share the hook name {handle.hook_name!r}.")

                def record(module: nn.Module, args: tuple, output: torch.Tensor, key: str = key) -> None:
                    value = output.detach()
                    cache[key] = value[0] if remove_batch_dim and value.shape[0] == 1 else value

                torch_hooks.append(getattr(handle.module, hook_name).register_forward_hook(record))
        output = _forward(model, model_args, model_kwargs)
    finally:
        for torch_hook in torch_hooks:
            torch_hook.remove()
        if reset_saes_end:
            for handle in reversed(handles):
                handle.detach()
    return _logits(output, return_type), cache


def feature_attribution(model: Any, sae: SAE, *model_args: Any, metric_fn: Callable[[Any], torch.Tensor],
                        hook: Any = None, use_error_term: bool = True, **model_kwargs: Any) -> torch.Tensor:
    """Attribution of ``metric_fn(output)`` to each feature at each position: ``acts * d metric / d acts``.

    ``metric_fn`` gets the model's logits (or its raw output when it has none) and returns a scalar. The SAE is
    attached with the error term by default, so the forward pass is the clean model's. Returns
    ``[pos, d_sae]`` for a batch of one, else ``[batch, pos, d_sae]``. Model and SAE parameter gradients are not
    touched (`torch.autograd.grad`).
    """
    captured: list[torch.Tensor] = []
    with saes(model, [sae], use_error_term=use_error_term, hook=hook) as (handle,):
        def leaf(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            value = output.detach().requires_grad_(True)
            captured.append(value)
            return value

        torch_hook = handle.module.hook_sae_acts_post.register_forward_hook(leaf)
        try:
            with torch.enable_grad():
                output = _forward(model, model_args, model_kwargs)
                metric = metric_fn(_logits(output, "logits"))
                if metric.numel() != 1:
                    raise ValueError(f"metric_fn must return a scalar, got shape {tuple(metric.shape)}.")
                (grad,) = torch.autograd.grad(metric.reshape(()), captured[0])
        finally:
            torch_hook.remove()
    attribution = (captured[0] * grad).detach()
    return attribution[0] if attribution.dim() == 3 and attribution.shape[0] == 1 else attribution
