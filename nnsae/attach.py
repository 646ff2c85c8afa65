"""Running SAEs inside Hugging Face models wrapped by nnsight: the one place the package splices an SAE.

`attach(model, sae)` mounts a small module (`SAESplice`) on the hooked HF module, so the SAE's hook points are
part of the model tree and readable/editable like any nnsight module::

    with model.trace(prompt):
        h = nnsae.attach(model, sae)                    # attached for this trace only
        feats = h.hook_sae_acts_post.output.save()      # == model.model.layers[6].sae.hook_sae_acts_post.output
        h.hook_sae_acts_post.output[:, :, 3] = 0        # ablate; the model continues from the edited reconstruction
        logits = model.output.logits.save()

    h = nnsae.attach(model, sae, use_error_term=True)   # outside a trace: attached until h.detach()

How the activation is routed through the SAE (no nnsight edits, no greenlets of our own):

* **module outputs** go through an accelerate-style module hook (an object with ``pre_forward``/``post_forward``)
  stored at ``module._hf_hook``. nnsight 0.8's controller (`nnsight.intervention.source.run_body`) runs that hook
  *inside* the module's call, after the module body and before it hands the output to the trace. So the SAE runs
  at every call (every `generate` step), its hook points are reached before the module's ``.output``, and
  ``module.output`` in a trace is the spliced value that the rest of the model sees. An accelerate hook already on
  the module (``device_map=...``) is chained, not replaced. A module nnsight does not wrap (a raw HF model) gets an
  ordinary torch forward hook instead.
* **module inputs** go through a torch forward pre-hook (``with_kwargs=True``), which runs before nnsight reads
  ``.input``: the SAE's hook points come before the module's ``.input``, and ``.input`` is the spliced value.

Ordering rule for trace bodies: read/edit an attached SAE's hook points *before* the hooked module's
``.output`` (output hooks) or ``.input`` (input hooks), and before anything later in the model. Breaking it raises
`SAEOrderError` (a subclass of nnsight's `OutOfOrderError`) with that advice.

Attaching inside a running trace mounts for that trace only: the mount and every hook are removed when the trace
ends, also when it raises (via a one-shot wrapper around the interleaver's `cancel`, which nnsight 0.8.1 always calls
in a ``finally`` when a run ends). Several SAEs at one hook are chained in attach order (each sees the previous
one's output); a transcoder's input capture at its read hook takes part in the same order.

For NDIF (remote) runs, use `splice` inside the trace body instead: it mounts nothing, so only the SAE and the body
travel (nnsae registers itself with `nnsight.register` so its code ships by value).
"""

from __future__ import annotations

import contextlib
import copy
import re
import sys
import warnings
import weakref
from typing import Any, Callable, Iterable, Iterator, Sequence

import nnsight
import torch
from nnsight.intervention.envoy import Envoy
from nnsight.intervention.interleaver import Interleaver, Mediator, OutOfOrderError
from nnsight.intervention.source import Controller
from nnsight.intervention.tracer import InterleavingTracer
from torch import nn

from nnsae.hooks import HookPoint, HookSpec, resolve_hook
from nnsae.architectures.base import HOOK_NAMES, SAE

__all__ = [
    "SAEHandle", "SAEOrderError", "SAESplice", "attach", "attached", "detach", "feature_attribution",
    "run_with_cache_with_saes", "run_with_saes", "saes", "splice", "steer",
]

MODES = ("splice", "observe", "steer")


class SAEOrderError(OutOfOrderError):
    """A trace body asked for an attached SAE's hook point after the model had already run past it."""


# ---------------------------------------------------------------------------------------------------------------
# Where activations are intercepted: one `_Site` per (HF module, "input" | "output")
# ---------------------------------------------------------------------------------------------------------------


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _replace_first(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    return new


class _Site:
    """The nnsae operations at one module's input or output, run in attach order."""

    def __init__(self, module: nn.Module, io: str):
        self.module = module
        self.io = io
        self.ops: list[Callable[[torch.Tensor], torch.Tensor]] = []
        self._uninstall: Callable[[], None] | None = None

    def run(self, act: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            act = op(act)
        return act

    # -- the three ways to intercept -------------------------------------------------------------------------

    def install(self) -> None:
        module = self.module
        if self.io == "input":
            def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
                if args:
                    if not isinstance(args[0], torch.Tensor):
                        raise TypeError(f"nnsae: the first input of {type(mod).__name__} is not a tensor")
                    return (self.run(args[0]), *args[1:]), kwargs
                if not kwargs:
                    raise TypeError(f"nnsae: {type(mod).__name__} was called without inputs to hook")
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                return args, {**kwargs, key: self.run(kwargs[key])}

            handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
            self._uninstall = handle.remove
        elif _runs_module_hook(module):
            previous = module.__dict__.get("_hf_hook")
            hook = _OutputHook(self, previous)
            module.__dict__["_hf_hook"] = hook

            def uninstall() -> None:
                if module.__dict__.get("_hf_hook") is hook:
                    if previous is None:
                        del module.__dict__["_hf_hook"]
                    else:
                        module.__dict__["_hf_hook"] = previous
                else:  # something chained on top of us: leave a pass-through
                    hook.site = None

            self._uninstall = uninstall
        else:
            def fwd_hook(mod: nn.Module, args: tuple, output: Any) -> Any:
                return _replace_first(output, self.run(_first(output)))

            handle = module.register_forward_hook(fwd_hook)
            self._uninstall = handle.remove

    def uninstall(self) -> None:
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None


def _runs_module_hook(module: nn.Module) -> bool:
    """Whether something calls ``module._hf_hook`` around the module body: nnsight's controller or accelerate."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, Controller):
        return True
    return "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__


class _OutputHook:
    """Accelerate's ModelHook protocol (``pre_forward``/``post_forward``) routing a module's output through a site.

    Chains an existing accelerate hook (device alignment), whose attributes it forwards.
    """

    def __init__(self, site: _Site, previous: Any):
        self.site: _Site | None = site
        self.previous = previous

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.previous is not None:
            return self.previous.pre_forward(module, *args, **kwargs)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.previous is not None:
            output = self.previous.post_forward(module, output)
        if self.site is None:
            return output
        return _replace_first(output, self.site.run(_first(output)))

    def __getattr__(self, name: str) -> Any:
        previous = self.__dict__.get("previous")
        if previous is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(previous, name)


# ---------------------------------------------------------------------------------------------------------------
# Per-model bookkeeping
# ---------------------------------------------------------------------------------------------------------------


class _ModelState:
    """Attachments of one HF model, its intercept sites and the token ids of the call in progress."""

    def __init__(self, root: nn.Module):
        self.root = weakref.ref(root)
        self.handles: list[SAEHandle] = []
        self.sites: dict[tuple[int, str], _Site] = {}
        self.tokens: torch.Tensor | None = None
        self._token_users = 0
        self._token_hook: Any = None

    def site(self, module: nn.Module, io: str) -> _Site:
        key = (id(module), io)
        site = self.sites.get(key)
        if site is None:
            site = self.sites[key] = _Site(module, io)
        return site

    def add_op(self, module: nn.Module, io: str, op: Callable) -> None:
        site = self.site(module, io)
        site.ops.append(op)
        if len(site.ops) == 1:
            site.install()

    def remove_op(self, module: nn.Module, io: str, op: Callable) -> None:
        key = (id(module), io)
        site = self.sites.get(key)
        if site is None:
            return
        site.ops = [o for o in site.ops if o is not op]
        if not site.ops:
            site.uninstall()
            del self.sites[key]

    def use_tokens(self) -> None:
        self._token_users += 1
        if self._token_hook is None:
            def remember(module: nn.Module, args: tuple, kwargs: dict) -> None:
                ids = kwargs.get("input_ids")
                if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
                    ids = args[0]
                self.tokens = ids

            self._token_hook = self.root().register_forward_pre_hook(remember, with_kwargs=True)

    def release_tokens(self) -> None:
        self._token_users -= 1
        if self._token_users == 0 and self._token_hook is not None:
            self._token_hook.remove()
            self._token_hook = None
            self.tokens = None


# Bookkeeping lives on the objects it is about (no module-level registries), so that this module's functions can be
# shipped by value in a remote payload: a `_ModelState` at `root.__dict__[_STATE_KEY]` while anything is attached,
# trace-end callbacks and ordering-hint handles on the interleaver while a run or attachment needs them.
_STATE_KEY = "_nnsae_state"
_TRACE_END_KEY = "_nnsae_trace_end"
_ORDER_KEY = "_nnsae_order_handles"


def _state(root: nn.Module, create: bool = True) -> _ModelState | None:
    state = root.__dict__.get(_STATE_KEY)
    if state is None and create:
        state = root.__dict__[_STATE_KEY] = _ModelState(root)
    return state


def _drop_state_if_empty(state: _ModelState) -> None:
    root = state.root()
    if root is not None and not state.handles and not state.sites and root.__dict__.get(_STATE_KEY) is state:
        del root.__dict__[_STATE_KEY]


def _unwrap(model: Any) -> nn.Module:
    return model._module if isinstance(model, Envoy) else model


# ---------------------------------------------------------------------------------------------------------------
# nnsight integration points: trace end, friendlier ordering errors, "are we inside a trace body?"
# ---------------------------------------------------------------------------------------------------------------

def _at_trace_end(interleaver: Interleaver, callback: Callable[[], None]) -> None:
    """Run ``callback`` when the current run of ``interleaver`` ends, normally or by an exception.

    nnsight 0.8.1 has no public end-of-trace callback; `Envoy.interleave` and `InterleavingTracer.execute` both call
    ``interleaver.cancel()`` in a ``finally``, so a one-shot instance attribute wrapping it is the hook point.
    """
    callbacks = interleaver.__dict__.get(_TRACE_END_KEY)
    if callbacks is not None:
        callbacks.append(callback)
        return
    callbacks = interleaver.__dict__[_TRACE_END_KEY] = [callback]
    had_instance_attr = "cancel" in interleaver.__dict__
    previous = interleaver.__dict__.get("cancel")
    original = interleaver.cancel

    def cancel() -> None:
        try:
            original()
        finally:
            if had_instance_attr:
                interleaver.__dict__["cancel"] = previous
            else:
                interleaver.__dict__.pop("cancel", None)
            interleaver.__dict__.pop(_TRACE_END_KEY, None)
            for cb in reversed(callbacks):
                try:
                    cb()
                except Exception as error:  # noqa: BLE001 - never hide the error that ended the run
                    warnings.warn(f"nnsae: cleaning up a trace-scoped SAE failed: {error!r}", stacklevel=2)

    interleaver.__dict__["cancel"] = cancel


def _hint_order_errors(interleaver: Interleaver, handle: SAEHandle) -> None:
    """Turn nnsight's OutOfOrderError on an SAE hook point into an SAEOrderError that says what to do."""
    handles = interleaver.__dict__.get(_ORDER_KEY)
    if handles is not None:
        handles.append(handle)
        return
    handles = interleaver.__dict__[_ORDER_KEY] = [handle]
    original = interleaver.check_dangling_mediators

    def check_dangling_mediators() -> None:
        try:
            original()
        except OutOfOrderError as error:
            _explain_order_error(error, list(handles))
            raise

    interleaver.__dict__["check_dangling_mediators"] = check_dangling_mediators


def _unhint_order_errors(interleaver: Interleaver, handle: SAEHandle) -> None:
    handles = interleaver.__dict__.get(_ORDER_KEY)
    if handles is None:
        return
    handles[:] = [h for h in handles if h is not handle]
    if not handles:
        del interleaver.__dict__[_ORDER_KEY]
        interleaver.__dict__.pop("check_dangling_mediators", None)


_LOCATION = re.compile(r"'(.+?)\.(?:output|input|inputs|skip)(?:\.i\d+)?' was requested")


def _explain_order_error(error: OutOfOrderError, handles: list[SAEHandle]) -> None:
    match = _LOCATION.search(str(error))
    if match is None:
        return
    location = match.group(1)
    for handle in handles:
        mount = handle.path
        if mount and (location == mount or location.startswith(mount + ".")):
            envoy = handle._write_envoy
            site = f"{envoy.path if envoy is not None else handle.write_path}.{handle.spec.write.io}"
            error.args = (
                f"{error.args[0] if error.args else error}\n\n"
                f"nnsae: {location!r} belongs to the SAE attached at {site}. An attached SAE runs inside the "
                f"hooked module's call, so its hook points are reached before `{site}` and before any later module. "
                f"Read or edit the SAE's hook points (h.hook_sae_*) before `{site}` and before anything later in "
                f"the model, and attach before the model reaches {handle.read_path}.",
            )
            error.__class__ = SAEOrderError
            return


def _in_trace_body(interleaver: Interleaver) -> bool:
    """True while a trace body of this interleaver is running: interleaving, or the outer body of an invoke-mode
    trace (``with model.trace() as t:`` + ``t.invoke``), which runs before interleaving starts."""
    if interleaver.interleaving:
        return True
    code = InterleavingTracer.execute.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            tracer = frame.f_locals.get("self")
            envoy = getattr(tracer, "envoy", None)
            if envoy is not None and envoy.interleaver is interleaver:
                return True
        frame = frame.f_back
    return False


# ---------------------------------------------------------------------------------------------------------------
# The mounted module
# ---------------------------------------------------------------------------------------------------------------


def _clone_sae(sae: SAE) -> SAE:
    """A view of ``sae`` sharing its parameters and config, with fresh hook modules (so each attachment has its own
    traceable hook points and the user's SAE object is never instrumented)."""
    clone = copy.copy(sae)
    modules = dict(sae._modules)
    for name in HOOK_NAMES:
        if name in modules:
            modules[name] = nn.Identity()
    clone.__dict__["_modules"] = modules
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs",
                 "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs", "_backward_pre_hooks",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks"):
        if attr in clone.__dict__:
            clone.__dict__[attr] = type(clone.__dict__[attr])()
    return clone


def _untouched(snapshot: tuple[torch.Tensor, Any], after: torch.Tensor) -> bool:
    """Whether a hook returned the very tensor it was given, unmodified (no assignment, no in-place edit)."""
    before, ref = snapshot
    if after is not before:
        return False
    if isinstance(ref, int):
        return before._version == ref
    return torch.equal(before, ref)


def _snapshot(t: torch.Tensor) -> tuple[torch.Tensor, Any]:
    return (t, t.clone()) if t.is_inference() else (t, t._version)


class SAESplice(nn.Module):
    """The module `attach` mounts on the hooked HF module (default name ``sae``).

    Its children are the SAE's hook points (``hook_sae_input`` … ``hook_sae_output``), so in a trace they are
    ``model.<path>.sae.hook_sae_acts_post`` etc. Its forward maps the HF activation at the write hook to the
    activation the model continues with. The SAE itself is held outside the module tree (its weights are not
    parameters of the HF model).
    """

    def __init__(self, sae: SAE, spec: HookSpec, mode: str, use_error_term: bool, special_ids: list[int] | None,
                 state: _ModelState, hook_label: str, n_heads: int | None):
        nn.Module.__init__(self)
        self.__dict__["_sae"] = sae
        for name in HOOK_NAMES:
            self.add_module(name, sae._modules[name])
        self.read = spec.read
        self.write = spec.write
        self.mode = mode
        self.use_error_term = use_error_term
        self.hook_label = hook_label
        self._transcoder = spec.read != spec.write
        self._special = None if special_ids is None else torch.tensor(sorted(special_ids), dtype=torch.long)
        self._state = weakref.ref(state)
        self._captured: torch.Tensor | None = None
        self._steering: list[tuple[torch.Tensor, Any]] = []
        self._hook_z_heads = n_heads if sae.cfg.reshape_activations == "hook_z" and sae.reshapes_input else None

    @property
    def sae(self) -> SAE:
        return self.__dict__["_sae"]

    def extra_repr(self) -> str:
        return (f"{type(self.sae).__name__}(d_in={self.sae.cfg.d_in}, d_sae={self.sae.cfg.d_sae}), "
                f"hook={self.hook_label!r}, mode={self.mode!r}, use_error_term={self.use_error_term}")

    # -- pieces ------------------------------------------------------------------------------------------------

    def capture(self, act: torch.Tensor) -> torch.Tensor:
        """Op at a transcoder's read hook: remember its input for the write hook."""
        self._captured = act
        return act

    def _mask(self, act: torch.Tensor) -> torch.Tensor | None:
        if self._special is None:
            return None
        state = self._state()
        tokens = None if state is None else state.tokens
        if tokens is None:
            raise ValueError(
                f"nnsae: exclude_special_tokens is set for the SAE at {self.hook_label!r}, but the model was called "
                "without input_ids (e.g. with inputs_embeds), so special-token positions are unknown."
            )
        if tuple(tokens.shape) != tuple(act.shape[:-1]):
            raise ValueError(
                f"nnsae: exclude_special_tokens needs activations shaped like the input ids; at {self.hook_label!r} "
                f"the activation is {tuple(act.shape)} and the input ids {tuple(tokens.shape)}."
            )
        special = self._special.to(tokens.device)
        return torch.isin(tokens, special).to(act.device).unsqueeze(-1)

    def _sae_input(self, source: torch.Tensor) -> torch.Tensor:
        sae = self.sae
        x = self.read.to_sae(source)
        if x.device != sae.W_dec.device:
            x = x.to(sae.W_dec.device)
        if self._hook_z_heads is not None:
            x = x.unflatten(-1, (self._hook_z_heads, -1))
            width = x.shape[-1] * x.shape[-2]
        else:
            width = x.shape[-1]
        if width != sae.cfg.d_in:
            raise ValueError(
                f"nnsae: the SAE at {self.hook_label!r} expects width d_in={sae.cfg.d_in}, but the activation at "
                f"{self.read.module}.{self.read.io} has width {width} (shape {tuple(source.shape)})."
            )
        return x

    def _flat(self, y: torch.Tensor) -> torch.Tensor:
        return y.flatten(-2) if self._hook_z_heads is not None and y.dim() >= 2 else y

    def _add_steering(self, act: torch.Tensor) -> torch.Tensor:
        for vector, positions in self._steering:
            vector = vector.to(device=act.device, dtype=act.dtype)
            if positions is None:
                act = act + vector
            else:
                scale = torch.zeros(act.shape[-2], 1, dtype=act.dtype, device=act.device)
                scale[positions] = 1
                act = act + scale * vector
        return act

    # -- the splice --------------------------------------------------------------------------------------------

    def forward(self, act: torch.Tensor) -> torch.Tensor:
        sae = self.sae
        if not isinstance(act, torch.Tensor):
            raise TypeError(f"nnsae: the activation at {self.hook_label!r} is a {type(act).__name__}, not a tensor; "
                            "hook a module whose output (or first output) is a tensor.")
        if self.mode == "steer":
            return self._add_steering(act)
        if self._transcoder:
            source, self._captured = self._captured, None
            if source is None:
                raise RuntimeError(
                    f"nnsae: the transcoder at {self.hook_label!r} reached its write hook "
                    f"{self.write.module}.{self.write.io} before its read hook {self.read.module}.{self.read.io} ran."
                )
        else:
            source = act
        x = self._sae_input(source)
        if self.mode == "observe":
            sae.encode(x)
            return self._add_steering(act) if self._steering else act

        mask = self._mask(act)
        recon = self._flat(sae.reconstruct(x))
        target = self.write.to_sae(act)
        if target.device != recon.device:
            target = target.to(recon.device)
        delta = None
        if self.use_error_term:
            clean = self._flat(sae.clean_reconstruct(x))
            with torch.no_grad():
                error = target.to(clean.dtype) - clean
                if mask is not None:
                    error = error.masked_fill(mask.to(error.device), 0)
            snap = _snapshot(error)
            error_out = sae._hook("hook_sae_error", error)
            out = recon + error_out
            if _untouched(snap, error_out):
                # Error term unedited: write `act + (recon - clean)`, which is bit-identical to `act` while the
                # features are unedited (and has SAELens' gradient: only through the reconstruction).
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
            if self.write.center:
                mean = act.mean(-1, keepdim=True)
                new = new + (mean - mean.detach())  # exactly 0; keeps the mean's gradient like from_sae does
        else:
            new = self.write.from_sae(out_h.to(act.device), act).to(act.dtype)
            if mask is not None:
                new = torch.where(mask, act, new)
        if self._steering:
            new = self._add_steering(new)
        return new


# ---------------------------------------------------------------------------------------------------------------
# The handle
# ---------------------------------------------------------------------------------------------------------------


class SAEHandle:
    """One attached SAE. Its hook points (``h.hook_sae_acts_post`` …) are the model-tree envoys of the mount, so
    inside a trace ``h.hook_sae_acts_post.output`` reads or edits the live feature activations.

    Attributes: ``sae`` (the SAE you passed), ``module`` (the mounted `SAESplice`), ``envoy`` (its nnsight
    envoy, or the module itself on a plain torch model), ``path`` (its path in the nnsight tree), ``spec``
    (the resolved read/write `HookSpec`), ``hook_name`` (the SAELens-style name used for cache keys),
    ``mode``, ``use_error_term``, ``scope`` (``"trace"`` or ``"persistent"``).
    """

    def __init__(self, model: Any, sae: SAE, module: SAESplice, spec: HookSpec, name: str, hook_name: str,
                 scope: str, state: _ModelState):
        self.model = model
        self.sae = sae
        self.module = module
        self.spec = spec
        self.name = name
        self.hook_name = hook_name
        self.scope = scope
        self._state = state
        self._write_module: nn.Module | None = None
        self._write_envoy: Envoy | None = None
        self._ops: list[tuple[nn.Module, str, Callable]] = []
        self._token_user = False
        self.envoy: Any = module
        self.attached = False

    # -- access ----------------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self.module.mode

    @property
    def use_error_term(self) -> bool:
        return self.module.use_error_term

    @property
    def path(self) -> str | None:
        return self.envoy.path if isinstance(self.envoy, Envoy) else None

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
        if self.module._hook_z_heads is not None:
            vector = vector.reshape(-1)
        self.module._steering.append((vector.detach(), positions))
        return self

    def clear_steering(self) -> SAEHandle:
        self.module._steering.clear()
        return self

    # -- removal -----------------------------------------------------------------------------------------------

    def detach(self) -> None:
        """Remove the SAE: hooks, mount and bookkeeping. Idempotent; safe inside or outside a trace."""
        if not self.attached:
            return
        self.attached = False
        state = self._state
        for module, io, op in reversed(self._ops):
            state.remove_op(module, io, op)
        self._ops = []
        if self._token_user:
            state.release_tokens()
            self._token_user = False
        module = self._write_module
        if module is not None and module._modules.get(self.name) is self.module:
            del module._modules[self.name]
            if self._write_envoy is not None:
                self._write_envoy._update(module)
        if isinstance(self.model, Envoy):
            _unhint_order_errors(self.model.interleaver, self)
        state.handles = [h for h in state.handles if h is not self]
        self.module._captured = None
        _drop_state_if_empty(state)


# ---------------------------------------------------------------------------------------------------------------
# attach / detach
# ---------------------------------------------------------------------------------------------------------------


def _resolve_spec(model: Any, sae: SAE, hook: str | HookPoint | HookSpec | None) -> HookSpec:
    if isinstance(hook, HookSpec):
        return hook
    if isinstance(hook, HookPoint):
        return HookSpec(read=hook, write=hook)
    return resolve_hook(model, sae, hook=hook)


def _hook_label(sae: SAE, spec: HookSpec, hook: Any) -> str:
    if isinstance(hook, str):
        return hook
    metadata = sae.cfg.metadata
    if hook is None and (metadata.hook_name or metadata.hf_hook_name):
        return metadata.hook_name or metadata.hf_hook_name
    point = spec.read
    return point.module if point.io == "output" else f"{point.module}.input"


def _text_config(root: nn.Module) -> Any:
    config = getattr(root, "config", None)
    if config is None:
        return None
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _expected_width(root: nn.Module, point: HookPoint) -> int | None:
    """The activation width at a hook point when it can be told from the module alone (else None)."""
    module = root.get_submodule(point.module)
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return module.in_features if point.io == "input" else module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim if point.io == "output" else None
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0] if point.io == "input" else weight.shape[1]
    if isinstance(weight, torch.Tensor) and weight.dim() == 1 and not list(module.children()):
        return weight.shape[0]  # norms
    parent_path, _, last = point.module.rpartition(".")
    if last.isdigit() and isinstance(root.get_submodule(parent_path), nn.ModuleList):
        config = _text_config(root)
        width = getattr(config, "hidden_size", None)
        return width if isinstance(width, int) else None
    return None


def _module_device(root: nn.Module, module: nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    for tensor in root.parameters():
        return tensor.device
    return None


def _special_token_ids(model: Any, root: nn.Module, exclude: bool | Sequence[int]) -> list[int] | None:
    if exclude is False or exclude is None:
        return None
    if exclude is not True:
        return [int(i) for i in exclude]
    ids: set[int] = set()
    attrs = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")
    tokenizer = getattr(model, "tokenizer", None) if isinstance(model, Envoy) else None
    sources = [tokenizer] if tokenizer is not None else [getattr(root, "generation_config", None),
                                                         getattr(root, "config", None)]
    for source in sources:
        for attr in attrs:
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("exclude_special_tokens=True but no special token ids were found on the model's tokenizer "
                         "or config; pass a list of token ids instead.")
    return sorted(ids)


def _envoy_of(model: Envoy, module: nn.Module, path: str) -> Envoy:
    envoy = model.interleaver.envoys.get(id(module))
    if envoy is None:
        envoy = model.get(path) if path else model
    return envoy


def _check_not_passed(model: Envoy, spec: HookSpec) -> None:
    """Inside a running trace: refuse to attach at a hook the model has already run past."""
    try:
        mediator = Mediator.current("nnsae.attach")
    except ValueError:
        return  # invoke-mode outer body: the model has not started
    for point in {spec.read, spec.write}:
        envoy = _envoy_of(model, _unwrap(model).get_submodule(point.module), point.module)
        location = f"{envoy.path}.{point.io}"
        if mediator.occurrence(location) > 0:
            raise ValueError(
                f"nnsae.attach: the model already ran past {point.module}.{point.io} in this trace, so the SAE would "
                "never run. Attach before reading any value at or after the hooked module."
            )


def attach(model: Any, sae: SAE, *, hook: str | HookPoint | HookSpec | None = None, mode: str = "splice",
           use_error_term: bool | None = None, exclude_special_tokens: bool | Sequence[int] = False,
           name: str | None = None, persistent: bool | None = None) -> SAEHandle:
    """Attach ``sae`` to ``model`` (an nnsight `LanguageModel` / `TransformersModel` / `NNsight`, or a plain HF
    module) and return its `SAEHandle`.

    Args:
        hook: where it reads/writes: an HF module path (``"model.layers.6"``, ``"model.layers.6.input"``), a TL
            hook name, a `HookPoint`/`HookSpec`, or None for the SAE's ``cfg.metadata`` (see `nnsae.hooks`).
        mode: ``"splice"`` (replace the activation by the reconstruction), ``"observe"`` (encode only; the model is
            untouched and the features readable) or ``"steer"`` (no SAE computation; only `SAEHandle.steer`).
        use_error_term: add the clean, detached error ``activation - reconstruction`` (SAELens semantics): the model
            output is unchanged (bit for bit) until features are edited. None means the SAE's ``use_error_term``
            attribute if it has one, else False.
        exclude_special_tokens: True (the tokenizer's BOS/EOS/PAD/SEP/decoder-start ids) or a list of token ids:
            those positions pass the original activation through (error term 0 there), as SAELens does.
        name: attribute name of the mount on the hooked module (default ``"sae"``, then ``"sae_1"``, …).
        persistent: None (default) attaches for the current trace when called inside a trace body, else until
            `SAEHandle.detach`; True/False force it.

    Several SAEs at the same hook are chained in attach order. A transcoder (different read and write hooks) captures
    its input at the read hook and replaces the activation at the write hook; its error term is the activation at
    the write hook minus the clean reconstruction.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if use_error_term is None:
        use_error_term = bool(getattr(sae, "use_error_term", False))
    if use_error_term and mode != "splice":
        raise ValueError(f"use_error_term=True only applies to mode='splice', not {mode!r}.")
    if not isinstance(sae, SAE):
        raise TypeError(f"nnsae.attach needs an nnsae SAE, got {type(sae).__name__}.")
    if isinstance(model, Envoy) and getattr(model, "dispatched", True) is False and hasattr(model, "dispatch"):
        model.dispatch()  # modules mounted on a meta model would be dropped at dispatch
    root = _unwrap(model)
    spec = _resolve_spec(model, sae, hook)
    if spec.write.normalize is not None:
        raise ValueError(f"nnsae.attach: {spec.write.module}.{spec.write.io} is a read-only (normalized) hook point; "
                         "an SAE can only write where the activation can be put back.")
    label = _hook_label(sae, spec, hook)
    in_trace = isinstance(model, Envoy) and _in_trace_body(model.interleaver)
    scope = "persistent" if (persistent if persistent is not None else not in_trace) else "trace"
    if scope == "trace" and not in_trace:
        raise ValueError("persistent=False needs a trace: call nnsae.attach inside a `with model.trace(...)` body.")
    if in_trace and model.interleaver.interleaving:
        _check_not_passed(model, spec)

    # widths, checked now where the module tells us, else at the first call
    expected = _expected_width(root, spec.read)
    d_in = sae.cfg.d_in
    if expected is not None and expected != d_in:
        raise ValueError(f"nnsae.attach: the SAE has d_in={d_in} but the activation at "
                         f"{spec.read.module}.{spec.read.io} has width {expected} (hook {label!r}).")
    if mode != "observe":
        out_width = _expected_width(root, spec.write)
        d_out = sae.cfg.output_dim
        if out_width is not None and out_width != d_out:
            raise ValueError(f"nnsae.attach: the SAE writes width {d_out} but the activation at "
                             f"{spec.write.module}.{spec.write.io} has width {out_width} (hook {label!r}).")

    write_module = root.get_submodule(spec.write.module)
    read_module = root.get_submodule(spec.read.module)
    device = _module_device(root, write_module)
    if device is not None and device.type != "meta" and sae.W_dec.device != device:
        sae.to(device)

    special = _special_token_ids(model, root, exclude_special_tokens)
    if name is None:
        name, i = "sae", 0
        while name in write_module._modules or hasattr(write_module, name):
            i += 1
            name = f"sae_{i}"
    elif name in write_module._modules or hasattr(write_module, name):
        raise ValueError(f"nnsae.attach: {spec.write.module or type(root).__name__} already has an attribute {name!r}.")
    n_heads = getattr(_text_config(root), "num_attention_heads", None)

    state = _state(root)
    module = SAESplice(_clone_sae(sae), spec, mode, bool(use_error_term), special, state, label, n_heads)
    handle = SAEHandle(model, sae, module, spec, name, label, scope, state)
    handle._write_module = write_module
    handle.attached = True  # from here on, detach() undoes whatever part of the attachment exists
    try:
        if isinstance(model, Envoy):
            envoy = handle._write_envoy = _envoy_of(model, write_module, spec.write.module)
            setattr(envoy, name, module)  # mounts on the HF module and builds the child envoys
            handle.envoy = getattr(envoy, name)
        else:
            write_module.add_module(name, module)
        if special is not None:
            state.use_tokens()
            handle._token_user = True
        if module._transcoder:
            capture = module.capture  # one bound-method object, so removal finds it by identity
            handle._ops.append((read_module, spec.read.io, capture))
            state.add_op(read_module, spec.read.io, capture)
        handle._ops.append((write_module, spec.write.io, module))
        state.add_op(write_module, spec.write.io, module)
        state.handles.append(handle)
        if isinstance(model, Envoy):
            _hint_order_errors(model.interleaver, handle)
            if scope == "trace":
                _at_trace_end(model.interleaver, handle.detach)
    except BaseException:
        handle.detach()
        raise
    return handle


def attached(model: Any) -> list[SAEHandle]:
    """The SAEs currently attached to ``model``, in attach order."""
    state = _state(_unwrap(model), create=False)
    return [] if state is None else list(state.handles)


def detach(model: Any, saes: SAE | SAEHandle | Iterable[SAE | SAEHandle] | None = None) -> None:
    """Detach every SAE from ``model`` (like SAELens ``reset_saes``), or only the given SAEs / handles."""
    handles = attached(model)
    if saes is not None:
        wanted = [saes] if isinstance(saes, (SAE, SAEHandle)) else list(saes)
        handles = [h for h in handles if any(h is w or h.sae is w for w in wanted)]
    for handle in reversed(handles):
        handle.detach()


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


# ---------------------------------------------------------------------------------------------------------------
# HookedSAETransformer-style conveniences
# ---------------------------------------------------------------------------------------------------------------


def _forward(model: Any, args: tuple, kwargs: dict) -> Any:
    if isinstance(model, Envoy):
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


# ---------------------------------------------------------------------------------------------------------------
# Remote-friendly inline splice: nothing mounted, so only the SAE and the trace body travel to the server
# ---------------------------------------------------------------------------------------------------------------


def _inline_point(model: Any, sae: Any, hook: Any) -> tuple[str, str, bool]:
    """(module path, io, center) without importing anything beyond torch when the hook is given explicitly."""
    if isinstance(hook, str):
        head, _, last = hook.rpartition(".")
        if last in ("input", "output") and head:
            return head, last, False
        return hook, "output", False
    if hook is not None and hasattr(hook, "module") and hasattr(hook, "io"):
        if getattr(hook, "normalize", None) is not None:
            raise ValueError("nnsae.splice: normalized (read-only) hook points are not supported inline.")
        return hook.module, hook.io, bool(getattr(hook, "center", False))
    hf_name = sae.cfg.metadata.hf_hook_name
    if hf_name:
        return _inline_point(model, sae, hf_name)
    from nnsae.hooks import resolve_hook as resolve  # imported here so payloads don't carry nnsae.hooks

    return _inline_point(model, sae, resolve(model, sae).read)


def splice(model: Any, sae: Any, *, hook: Any = None, hook_out: Any = None, use_error_term: bool = False,
           edit: Callable[[torch.Tensor], torch.Tensor | None] | None = None, mode: str = "splice") -> torch.Tensor:
    """Inside a trace body: run ``sae`` at its hook without mounting anything; returns the feature activations.

    ``edit(features)`` may modify the features (in place, or by returning new ones) before they are decoded; the
    model continues from the (edited) reconstruction, plus the clean error with ``use_error_term``. A transcoder
    reads at ``hook`` and writes at ``hook_out``. ``mode="observe"`` only encodes.

    This is the remote (NDIF) path: pass ``hook="model.layers.6"`` (or a `HookPoint` resolved before the trace) so
    the server needs nothing but torch; the SAE's code ships by value. Reads happen at the hook's ``.output`` /
    ``.input``, so call it in execution order with your other reads.
    """
    path, io, center = _inline_point(model, sae, hook)
    envoy = model.get(path) if path else model
    value = envoy.output if io == "output" else envoy.input
    act = value[0] if isinstance(value, (tuple, list)) else value
    x = act - act.mean(-1, keepdim=True) if center else act
    x = x.to(sae.W_dec.device)
    features = sae.encode(x)
    if edit is not None:
        edited = edit(features)
        if edited is not None:
            features = edited
    if mode == "observe":
        return features
    if hook_out is not None:
        path, io, center = _inline_point(model, sae, hook_out)
        envoy = model.get(path) if path else model
        value = envoy.output if io == "output" else envoy.input
        act = value[0] if isinstance(value, (tuple, list)) else value
    recon = sae.decode(features)
    skip = getattr(sae, "W_skip", None)
    if skip is not None:
        recon = recon + x.to(sae.W_dec.dtype) @ skip.T
    if use_error_term:  # act + (recon - clean) == recon + (act - clean): the clean, detached error term
        with torch.no_grad():
            clean = sae.decode(sae.encode(x))
            if skip is not None:
                clean = clean + x.to(sae.W_dec.dtype) @ skip.T
        new = act.detach() + (recon - clean).to(device=act.device, dtype=act.dtype)
    else:
        new = recon
        if center:
            new = new + act.mean(-1, keepdim=True)
        new = new.to(device=act.device, dtype=act.dtype)
    if isinstance(value, tuple):
        new_value: Any = (new, *value[1:])
    elif isinstance(value, list):
        new_value = [new, *value[1:]]
    else:
        new_value = new
    if io == "output":
        envoy.output = new_value
    else:
        envoy.input = new_value
    return features


# Ship nnsae's code by value in remote requests (a pip-installed package is not auto-registered by nnsight).
nnsight.register("nnsae")
