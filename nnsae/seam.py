"""Every use of nnsight's and torch's private internals, in one place (the rest of nnsae uses public APIs only).

nnsight 0.8 has no public API for what attaching an SAE as a traced submodule needs: a hook that runs *inside* a
module's call (so the SAE's hook points come before the module's ``.output``), an end-of-run callback (so an SAE
attached inside a trace is removed when the trace ends, also on error), friendlier ordering errors, and "are we in a
trace body?". Each use below is named in `INTERNALS` with what it is for and the nnsight version it was written
against; `missing_internals()` checks that each still exists (tests/test_seam.py fails naming the one that changed).
Torch's private hook dictionaries are read here too (`module_observed`, `fresh_hook_view`).
"""

from __future__ import annotations

import copy
import re
import sys
import warnings
from typing import Any, Callable

import nnsight
import torch
from nnsight import Envoy
from nnsight.intervention.interleaver import Interleaver, Mediator, OutOfOrderError
from nnsight.intervention.source import Controller
from nnsight.intervention.tracer import InterleavingTracer
from packaging.version import Version
from torch import nn
from torch.nn.modules import module as torch_module

__all__ = ["INTERNALS", "NNSIGHT_TESTED", "SAEOrderError", "already_ran_past", "as_nnsight", "at_run_end",
           "envoy_of", "explain_order_errors", "fresh_hook_view", "cpu_has_amx", "row_dots", "in_trace_body", "install_output_hook",
           "is_nnsight", "missing_internals", "module_observed", "refresh_envoy", "tensor_version", "stop_explaining_order_errors",
           "unwrap_model"]

NNSIGHT_TESTED = "0.8.1"

# name -> what nnsae uses it for. Each entry is checked by `missing_internals`.
INTERNALS: dict[str, str] = {
    "Envoy._module": "the HF module an nnsight wrapper holds (unwrap_model)",
    "Envoy._update": "rebuild an envoy's children after a module is removed (refresh_envoy)",
    "Interleaver.envoys": "the envoy nnsight made for a module (envoy_of)",
    "Interleaver.interleaving": "whether a run is in progress (in_trace_body)",
    "Interleaver.cancel": "wrapped once per run: nnsight calls it in a `finally` when a run ends (at_run_end)",
    "Interleaver.check_dangling_mediators": "wrapped to add advice to OutOfOrderError (explain_order_errors)",
    "InterleavingTracer.execute": "its frame marks the outer body of an invoke-mode trace (in_trace_body)",
    "Mediator.current": "the running trace body's mediator (already_ran_past)",
    "Mediator.occurrence": "how often the body has seen a location (already_ran_past)",
    "OutOfOrderError": "the ordering error SAEOrderError refines",
    "Controller": "nnsight's module forward, which calls `module._hf_hook` inside the module call (install_output_hook)",
    "torch.nn.Module._forward_hooks": "hook dictionaries read by module_observed and reset by fresh_hook_view",
    "torch.nn.modules.module._global_forward_hooks": "global module hooks (module_observed)",
    "torch.Tensor._version": "the in-place version counter: was a tensor edited? (tensor_version)",
    "torch.ops.aten._embedding_bag_per_sample_weights_backward": "sparse row·weight dot products without an (nnz, d) "
    "tensor (row_dots; a chunked gather without it)",
    "torch._C._cpu._init_amx": "whether the CPU has AMX tiles, where bf16 GEMMs are fast (cpu_has_amx)",
}


def missing_internals() -> list[str]:
    """The entries of `INTERNALS` this nnsight/torch no longer has, each as 'name: what it is for'."""
    probe = nn.Identity()
    checks: dict[str, Callable[[], bool]] = {
        "Envoy._module": lambda: "_module" in nnsight.NNsight(probe).__dict__,
        "Envoy._update": lambda: callable(getattr(Envoy, "_update", None)),
        "Interleaver.envoys": lambda: callable(getattr(getattr(nnsight.NNsight(probe).interleaver, "envoys", None), "get", None)),
        "Interleaver.interleaving": lambda: hasattr(nnsight.NNsight(probe).interleaver, "interleaving"),
        "Interleaver.cancel": lambda: callable(getattr(Interleaver, "cancel", None)),
        "Interleaver.check_dangling_mediators": lambda: callable(getattr(Interleaver, "check_dangling_mediators",
                                                                         None)),
        "InterleavingTracer.execute": lambda: hasattr(getattr(InterleavingTracer, "execute", None), "__code__"),
        "Mediator.current": lambda: callable(getattr(Mediator, "current", None)),
        "Mediator.occurrence": lambda: callable(getattr(Mediator, "occurrence", None)),
        "OutOfOrderError": lambda: issubclass(OutOfOrderError, Exception),
        "Controller": lambda: isinstance(nnsight.NNsight(nn.Linear(1, 1))._module.__dict__.get("forward"), Controller),
        "torch.nn.Module._forward_hooks": lambda: all(isinstance(probe.__dict__.get(name), dict)
                                                      for name in _HOOK_DICTS),
        "torch.nn.modules.module._global_forward_hooks": lambda: hasattr(torch_module, "_global_forward_hooks")
        and hasattr(torch_module, "_global_forward_pre_hooks"),
        "torch.Tensor._version": lambda: isinstance(torch.zeros(1)._version, int),
        "torch.ops.aten._embedding_bag_per_sample_weights_backward": lambda: _per_sample_weights_op() is not None,
        "torch._C._cpu._init_amx": lambda: callable(getattr(torch._C._cpu, "_init_amx", None)),
    }
    missing = []
    for name, check in checks.items():
        try:
            ok = check()
        except Exception:  # noqa: BLE001 - any failure means the internal changed
            ok = False
        if not ok:
            missing.append(f"{name}: {INTERNALS[name]}")
    return missing


if Version(nnsight.__version__).release[:2] != Version(NNSIGHT_TESTED).release[:2]:
    warnings.warn(f"nnsae was written against nnsight {NNSIGHT_TESTED}; this is nnsight {nnsight.__version__}. "
                  "If attaching SAEs fails, run nnsae.seam.missing_internals() to see which internal changed.",
                  stacklevel=2)


class SAEOrderError(OutOfOrderError):
    """A trace body asked for an attached SAE's hook point after the model had already run past it."""


# ---------------------------------------------------------------------------------------------------------------
# Models and envoys
# ---------------------------------------------------------------------------------------------------------------


def is_nnsight(model: Any) -> bool:
    return isinstance(model, Envoy)


def unwrap_model(model: Any) -> nn.Module:
    """The HF module inside an nnsight wrapper (``NNsight``, ``LanguageModel``, ``TransformersModel``), or the model."""
    return model._module if isinstance(model, Envoy) else model


def as_nnsight(model: Any) -> Envoy:
    """An nnsight wrapper of ``model`` (returned unchanged when it already is one)."""
    return model if isinstance(model, Envoy) else nnsight.NNsight(model)


def envoy_of(model: Envoy, module: nn.Module, path: str) -> Envoy:
    envoy = model.interleaver.envoys.get(id(module))
    if envoy is None:
        envoy = model.get(path) if path else model
    return envoy


def refresh_envoy(envoy: Envoy, module: nn.Module) -> None:
    """Make ``envoy`` forget children removed from ``module``."""
    envoy._update(module)


# ---------------------------------------------------------------------------------------------------------------
# Running inside a module's call
# ---------------------------------------------------------------------------------------------------------------


def _runs_module_hook(module: nn.Module) -> bool:
    """Whether something calls ``module._hf_hook`` around the module body: nnsight's controller or accelerate."""
    if isinstance(module.__dict__.get("forward"), Controller):
        return True
    return "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__


class _OutputHook:
    """Accelerate's ModelHook protocol (``pre_forward``/``post_forward``) passing a module's output through ``run``.
    Chains an existing accelerate hook (device alignment), whose attributes it forwards."""

    def __init__(self, run: Callable[[Any], Any], previous: Any):
        self.run: Callable[[Any], Any] | None = run
        self.previous = previous

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.previous is not None:
            return self.previous.pre_forward(module, *args, **kwargs)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.previous is not None:
            output = self.previous.post_forward(module, output)
        return output if self.run is None else self.run(output)

    def __getattr__(self, name: str) -> Any:
        previous = self.__dict__.get("previous")
        if previous is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(previous, name)


def install_output_hook(module: nn.Module, run: Callable[[Any], Any]) -> Callable[[], None]:
    """Pass ``module``'s output through ``run`` inside the module's call; returns the uninstaller.

    nnsight 0.8's controller runs ``module._hf_hook`` (accelerate's protocol) after the module body and before it
    hands the output to the trace, so ``module.output`` in a trace is ``run``'s result and anything ``run`` reaches
    (an SAE's hook points) comes before it. A module nnsight does not wrap gets a plain torch forward hook.
    """
    if not _runs_module_hook(module):
        return module.register_forward_hook(lambda mod, args, output: run(output)).remove
    previous = module.__dict__.get("_hf_hook")
    hook = _OutputHook(run, previous)
    module.__dict__["_hf_hook"] = hook

    def uninstall() -> None:
        if module.__dict__.get("_hf_hook") is hook:
            if previous is None:
                del module.__dict__["_hf_hook"]
            else:
                module.__dict__["_hf_hook"] = previous
        else:  # something chained on top of us: leave a pass-through
            hook.run = None

    return uninstall


# ---------------------------------------------------------------------------------------------------------------
# Trace state: end of run, ordering errors, "inside a body?"
# ---------------------------------------------------------------------------------------------------------------

_RUN_END_KEY = "_nnsae_run_end"
_EXPLAIN_KEY = "_nnsae_order_explainers"


def at_run_end(model: Envoy, callback: Callable[[], None]) -> None:
    """Run ``callback`` when the current run of ``model``'s interleaver ends, normally or by an exception (a one-shot
    wrapper of ``interleaver.cancel``, which `Envoy.interleave` and `InterleavingTracer.execute` call in a
    ``finally``). Callbacks run in reverse order of registration; their errors become warnings."""
    interleaver = model.interleaver
    callbacks = interleaver.__dict__.get(_RUN_END_KEY)
    if callbacks is not None:
        callbacks.append(callback)
        return
    callbacks = interleaver.__dict__[_RUN_END_KEY] = [callback]
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
            interleaver.__dict__.pop(_RUN_END_KEY, None)
            for cb in reversed(callbacks):
                try:
                    cb()
                except Exception as error:  # noqa: BLE001 - never hide the error that ended the run
                    warnings.warn(f"nnsae: cleaning up a trace-scoped SAE failed: {error!r}", stacklevel=2)

    interleaver.__dict__["cancel"] = cancel


_LOCATION = re.compile(r"'(.+?)\.(?:output|input|inputs|skip)(?:\.i\d+)?' was requested")


def explain_order_errors(model: Envoy, key: Any, explain: Callable[[str], str | None]) -> None:
    """While ``key`` is registered, an OutOfOrderError in a trace of ``model`` whose location ``explain(location)``
    recognises gets that advice appended and becomes an `SAEOrderError`."""
    interleaver = model.interleaver
    explainers = interleaver.__dict__.get(_EXPLAIN_KEY)
    if explainers is not None:
        explainers[key] = explain
        return
    explainers = interleaver.__dict__[_EXPLAIN_KEY] = {key: explain}
    original = interleaver.check_dangling_mediators

    def check_dangling_mediators() -> None:
        try:
            original()
        except OutOfOrderError as error:
            match = _LOCATION.search(str(error))
            for advise in list(explainers.values()):
                advice = advise(match.group(1)) if match else None
                if advice:
                    error.args = (f"{error.args[0] if error.args else error}\n\n{advice}",)
                    error.__class__ = SAEOrderError
                    break
            raise

    interleaver.__dict__["check_dangling_mediators"] = check_dangling_mediators


def stop_explaining_order_errors(model: Envoy, key: Any) -> None:
    interleaver = model.interleaver
    explainers = interleaver.__dict__.get(_EXPLAIN_KEY)
    if explainers is None:
        return
    explainers.pop(key, None)
    if not explainers:
        del interleaver.__dict__[_EXPLAIN_KEY]
        interleaver.__dict__.pop("check_dangling_mediators", None)


def in_trace_body(model: Any) -> bool:
    """True while a trace body of ``model`` (an nnsight wrapper) is running: interleaving, or the outer body of an
    invoke-mode trace (``with model.trace() as t:`` + ``t.invoke``), which runs before interleaving starts."""
    if not isinstance(model, Envoy):
        return False
    interleaver = model.interleaver
    if interleaver.interleaving:
        return True
    code = InterleavingTracer.execute.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            envoy = getattr(frame.f_locals.get("self"), "envoy", None)
            if envoy is not None and envoy.interleaver is interleaver:
                return True
        frame = frame.f_back
    return False


def already_ran_past(envoy: Envoy, io: str) -> bool:
    """Inside a running trace body: whether the model has already produced ``envoy``'s ``io`` in this run."""
    try:
        mediator = Mediator.current("nnsae.attach")
    except ValueError:
        return False  # invoke-mode outer body: the model has not started
    return mediator.occurrence(f"{envoy.path}.{io}") > 0


# ---------------------------------------------------------------------------------------------------------------
# torch module hooks
# ---------------------------------------------------------------------------------------------------------------

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def tensor_version(t: torch.Tensor) -> int:
    """torch's in-place version counter of ``t`` (it grows with every in-place edit)."""
    return t._version


def module_observed(module: nn.Module) -> bool:
    """Whether anything could see or edit ``module``'s output: a global module hook, a hook on it, a module other
    than a plain `nn.Identity`, or a replaced ``forward`` (nnsight installs one on every module it wraps)."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return (type(module) is not nn.Identity or bool(module._forward_hooks) or bool(module._forward_pre_hooks)
            or "forward" in module.__dict__)


def fresh_hook_view(module: nn.Module, fresh: dict[str, nn.Module], device: torch.device | None = None) -> nn.Module:
    """A shallow copy of ``module`` whose children named in ``fresh`` are replaced, with no torch hooks of its own.

    Parameters are shared with ``module``; with ``device`` (different from theirs) the copy holds its own
    parameters and buffers on that device and ``module`` is left where it is."""
    view = copy.copy(module)
    view.__dict__["_modules"] = {**module._modules, **fresh}
    for name in _HOOK_DICTS:
        if name in view.__dict__:
            view.__dict__[name] = type(view.__dict__[name])()
    if device is not None:
        view.__dict__["_parameters"] = {
            name: None if p is None else nn.Parameter(p.detach().to(device, copy=True), requires_grad=p.requires_grad)
            for name, p in module._parameters.items()}
        view.__dict__["_buffers"] = {name: None if b is None else b.to(device, copy=True)
                                     for name, b in module._buffers.items()}
    return view


# ---- torch ------------------------------------------------------------------------------------------------------


def _per_sample_weights_op() -> Any:
    try:
        return torch.ops.aten._embedding_bag_per_sample_weights_backward
    except (AttributeError, RuntimeError):
        return None


def row_dots(rows: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor, offsets: torch.Tensor,
             row_of: torch.Tensor) -> torch.Tensor:
    """(nnz,): e ↦ rows[row_of[e]] · weight[cols[e]] for contiguous `rows` (n, d) and `weight` (m, d), by
    embedding_bag's per-sample-weight gradient kernel (no (nnz, d) tensor; `offsets` are the bags' starts); where
    torch lacks that op, by a gather in chunks."""
    op = _per_sample_weights_op()
    if op is not None:
        try:
            return op(rows, weight, cols, offsets, row_of, 0, -1)
        except RuntimeError:
            pass
    out = torch.empty(cols.numel(), dtype=weight.dtype, device=weight.device)
    for start in range(0, cols.numel(), 1 << 16):
        part = slice(start, start + (1 << 16))
        out[part] = (rows.index_select(0, row_of[part]) * weight.index_select(0, cols[part])).sum(-1)
    return out


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (torch's own probe; False where torch has none)."""
    probe = getattr(torch._C._cpu, "_init_amx", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False
