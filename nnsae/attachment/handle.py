"""`SAEHandle`: one attached SAE, its hook points as traceable envoys, steering, and removal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from nnsae.architectures.base import HOOK_NAMES, SAE
from nnsae.hooks import HookSpec
from nnsae.seam import is_nnsight, refresh_envoy, stop_explaining_order_errors

if TYPE_CHECKING:
    from nnsae.attachment.mount import ModelState, SAESplice

__all__ = ["SAEHandle"]


class SAEHandle:
    """One attached SAE. Its hook points (``h.hook_sae_acts_post`` …) are the model-tree envoys of the mount, so
    inside a trace ``h.hook_sae_acts_post.output`` reads or edits the live feature activations.

    Attributes: ``sae`` (the SAE you passed), ``module`` (the mounted `SAESplice`), ``envoy`` (its nnsight
    envoy, or the module itself on a plain torch model), ``path`` (its path in the nnsight tree), ``spec``
    (the resolved read/write `HookSpec`), ``hook_name`` (the SAELens-style name used for cache keys),
    ``mode``, ``use_error_term``, ``scope`` (``"trace"`` or ``"persistent"``).
    """

    def __init__(self, model: Any, sae: SAE, module: SAESplice, spec: HookSpec, name: str, hook_name: str,
                 scope: str, state: ModelState):
        self.model = model
        self.sae = sae
        self.module = module
        self.spec = spec
        self.name = name
        self.hook_name = hook_name
        self.scope = scope
        self._state = state
        self._write_module: nn.Module | None = None
        self._write_envoy: Any = None
        self._ops: list[tuple[nn.Module, str, Callable]] = []
        self._token_user = False
        self.envoy: Any = module
        self.attached = False
        self.suspended = False

    # -- access ----------------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self.module.mode

    @property
    def use_error_term(self) -> bool:
        return self.module.use_error_term

    @property
    def path(self) -> str | None:
        return self.envoy.path if is_nnsight(self.envoy) else None

    @property
    def cache_prefix(self) -> str:
        """The prefix of this SAE's points in caches and hook names, as SAELens' HookedSAETransformer names them:
        ``{hook_name}.hook_sae_acts_post``; a transcoder's points sit at its output hook (``hook_name_out``)."""
        out = self.sae.cfg.metadata.hook_name_out
        return out if self.module.transcoder and out else self.hook_name

    @property
    def read_path(self) -> str:
        return self.spec.read.module

    @property
    def write_path(self) -> str:
        return self.spec.write.module

    def __getattr__(self, name: str) -> Any:
        if name in HOOK_NAMES:
            return getattr(self.__dict__["envoy"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def input(self) -> Any:
        """In a trace: the activation going into the SAE at the write hook (the mount's ``.input``)."""
        return self.envoy.input

    @property
    def output(self) -> Any:
        """In a trace: what the model continues with at the write hook (the mount's ``.output``)."""
        return self.envoy.output

    @output.setter
    def output(self, value: Any) -> None:
        self.envoy.output = value

    def __repr__(self) -> str:
        where = self.path or self.write_path
        state = "attached" if self.attached else "detached"
        return (f"SAEHandle({where}, hook_name={self.hook_name!r}, mode={self.mode!r}, "
                f"use_error_term={self.use_error_term}, scope={self.scope!r}, {state})")

    def __enter__(self) -> SAEHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def order_advice(self, location: str) -> str | None:
        """Advice for an ordering error at ``location`` (an nnsight envoy path), when it is one of this SAE's."""
        mount = self.path
        if not mount or not (location == mount or location.startswith(mount + ".")):
            return None
        envoy = self._write_envoy
        site = f"{envoy.path if envoy is not None else self.write_path}.{self.spec.write.io}"
        return (f"nnsae: {location!r} belongs to the SAE attached at {site}. An attached SAE runs inside the hooked "
                f"module's call, so its hook points are reached before `{site}` and before any later module. Read "
                f"or edit the SAE's hook points (h.hook_sae_*) before `{site}` and before anything later in the "
                f"model, and attach before the model reaches {self.read_path}.")

    # -- steering ----------------------------------------------------------------------------------------------

    def steer(self, feature: int | Sequence[int] | torch.Tensor, coeff: float | Sequence[float] | torch.Tensor = 1.0,
              positions: int | slice | Sequence[int] | None = None) -> SAEHandle:
        """Add ``coeff * W_dec[feature]`` (summed over several features) to what the model continues with at the
        write hook, at every call (every generation step), at ``positions`` of the sequence (default: all).

        Works in every mode (with the splice, with ``mode="observe"``, or alone via `steer`). Calls accumulate;
        `clear_steering` removes them.
        """
        sae = self.sae
        features = torch.as_tensor(feature, dtype=torch.long).reshape(-1)
        coeffs = torch.as_tensor(coeff, dtype=sae.W_dec.dtype).reshape(-1)
        if coeffs.numel() == 1:
            coeffs = coeffs.expand(features.numel())
        if coeffs.numel() != features.numel():
            raise ValueError(f"steer: {features.numel()} features but {coeffs.numel()} coefficients.")
        if features.numel() and (features.min() < 0 or features.max() >= sae.cfg.d_sae):
            raise ValueError(f"steer: feature indices must be in [0, {sae.cfg.d_sae}), got {features.tolist()}.")
        with torch.no_grad():
            vector = (coeffs.to(sae.W_dec.device)[:, None] * sae.W_dec[features.to(sae.W_dec.device)]).sum(0)
        if self.module.n_heads is not None:
            vector = vector.reshape(-1)
        self.module.steering.append((vector.detach(), positions))
        return self

    def clear_steering(self) -> SAEHandle:
        self.module.steering.clear()
        return self

    # -- removal -----------------------------------------------------------------------------------------------

    def suspend(self) -> None:
        """Stop running the SAE (its mount stays) until `resume`; what a temporary SAE at the same hook does to this
        one (SAELens' ``saes()`` context replaces, then restores)."""
        if self.attached and not self.suspended:
            for module, io, op in reversed(self._ops):
                self._state.remove_op(module, io, op)
            self.suspended = True

    def resume(self) -> None:
        if self.attached and self.suspended:
            for module, io, op in self._ops:
                self._state.add_op(module, io, op)
            self.suspended = False

    def detach(self) -> None:
        """Remove the SAE: hooks, mount and bookkeeping. Idempotent; safe inside or outside a trace."""
        if not self.attached:
            return
        self.attached = False
        state = self._state
        for module, io, op in reversed(self._ops):
            if not self.suspended:
                state.remove_op(module, io, op)
        self._ops = []
        if self._token_user:
            state.release_tokens()
            self._token_user = False
        module = self._write_module
        if module is not None and getattr(module, self.name, None) is self.module:
            delattr(module, self.name)
            if self._write_envoy is not None:
                refresh_envoy(self._write_envoy, module)
        if is_nnsight(self.model):
            stop_explaining_order_errors(self.model, self)
        state.handles = [h for h in state.handles if h is not self]
        self.module.captured = None
        state.drop_if_empty()
