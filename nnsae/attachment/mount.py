"""Mounting an SAE as a traced submodule: `attach`, `attached`, `detach`.

`attach(model, sae)` mounts a small module (`SAESplice`) on the hooked HF module, so the SAE's hook points are part
of the model tree and readable/editable like any nnsight module. The activation is routed through it inside the
module's call (`nnsae.seam.install_output_hook` for outputs, a torch forward pre-hook for inputs), so the SAE runs at
every call (every `generate` step), its hook points come before the module's ``.output``/``.input``, and those are
the spliced values the rest of the model sees.

Ordering rule for trace bodies: read/edit an attached SAE's hook points *before* the hooked module's ``.output``
(output hooks) or ``.input`` (input hooks), and before anything later in the model; breaking it raises
`SAEOrderError` with that advice. Attaching inside a running trace mounts for that trace only (removed when the trace
ends, also when it raises).
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from nnsae.architectures.base import HOOK_NAMES, SAE
from nnsae.attachment.handle import SAEHandle
from nnsae.attachment.splice import first_tensor, hook_z_heads, replace_first, sae_input, splice_activation
from nnsae.data import special_token_ids
from nnsae.hooks import HookPoint, HookSpec, hook_label, resolve_hook
from nnsae.seam import (already_ran_past, at_run_end, envoy_of, explain_order_errors, fresh_hook_view,
                        in_trace_body, install_output_hook, is_nnsight, unwrap_model)

__all__ = ["MODES", "ModelState", "SAESplice", "attach", "attached", "detach", "occupants"]

MODES = ("splice", "observe", "steer")


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

    def install(self) -> None:
        if self.io == "output":
            self._uninstall = install_output_hook(self.module, lambda output: replace_first(
                output, self.run(first_tensor(output))))
            return

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if args:
                if not isinstance(args[0], torch.Tensor):
                    raise TypeError(f"nnsae: the first input of {type(mod).__name__} is not a tensor")
                return (self.run(args[0]), *args[1:]), kwargs
            if not kwargs:
                raise TypeError(f"nnsae: {type(mod).__name__} was called without inputs to hook")
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            return args, {**kwargs, key: self.run(kwargs[key])}

        self._uninstall = self.module.register_forward_pre_hook(pre_hook, with_kwargs=True).remove

    def uninstall(self) -> None:
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None


class ModelState:
    """Attachments of one HF model, its intercept sites and the token ids of the call in progress.

    It lives at ``root.__dict__["_nnsae_state"]`` while anything is attached (no module-level registry), so this
    package's functions can be shipped by value in a remote payload."""

    KEY = "_nnsae_state"

    def __init__(self, root: nn.Module):
        self.root = weakref.ref(root)
        self.handles: list[SAEHandle] = []
        self.sites: dict[tuple[int, str], _Site] = {}
        self.tokens: torch.Tensor | None = None
        self._token_users = 0
        self._token_hook: Any = None

    @classmethod
    def of(cls, root: nn.Module, create: bool = True) -> ModelState | None:
        state = root.__dict__.get(cls.KEY)
        if state is None and create:
            state = root.__dict__[cls.KEY] = cls(root)
        return state

    def drop_if_empty(self) -> None:
        root = self.root()
        if root is not None and not self.handles and not self.sites and root.__dict__.get(self.KEY) is self:
            del root.__dict__[self.KEY]

    def add_op(self, module: nn.Module, io: str, op: Callable) -> None:
        key = (id(module), io)
        site = self.sites.get(key)
        if site is None:
            site = self.sites[key] = _Site(module, io)
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


class SAESplice(nn.Module):
    """The module `attach` mounts on the hooked HF module (default name ``sae``).

    Its children are the SAE's hook points (``hook_sae_input`` … ``hook_sae_output``), so in a trace they are
    ``model.<path>.sae.hook_sae_acts_post`` etc. Its forward maps the HF activation at the write hook to the
    activation the model continues with (`nnsae.attachment.splice.splice_activation`). The SAE itself is held outside
    the module tree (its weights are not parameters of the HF model).
    """

    def __init__(self, sae: SAE, spec: HookSpec, mode: str, use_error_term: bool, special_ids: list[int] | None,
                 state: ModelState, hook_label: str, n_heads: int | None):
        nn.Module.__init__(self)
        self.__dict__["_sae"] = sae
        for name in HOOK_NAMES:
            self.add_module(name, getattr(sae, name))
        self.spec = spec
        self.mode = mode
        self.use_error_term = use_error_term
        self.hook_label = hook_label
        self.n_heads = n_heads
        self.transcoder = spec.read != spec.write
        self.special = None if special_ids is None else torch.tensor(sorted(special_ids), dtype=torch.long)
        self.state = weakref.ref(state)
        self.captured: torch.Tensor | None = None
        self.steering: list[tuple[torch.Tensor, Any]] = []

    @property
    def sae(self) -> SAE:
        return self.__dict__["_sae"]

    def extra_repr(self) -> str:
        return (f"{type(self.sae).__name__}(d_in={self.sae.cfg.d_in}, d_sae={self.sae.cfg.d_sae}), "
                f"hook={self.hook_label!r}, mode={self.mode!r}, use_error_term={self.use_error_term}")

    def capture(self, act: torch.Tensor) -> torch.Tensor:
        """Op at a transcoder's read hook: remember its input for the write hook."""
        self.captured = act
        return act

    def _mask(self, act: torch.Tensor) -> torch.Tensor | None:
        if self.special is None:
            return None
        state = self.state()
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
        return torch.isin(tokens, self.special.to(tokens.device)).to(act.device).unsqueeze(-1)

    def _add_steering(self, act: torch.Tensor) -> torch.Tensor:
        for vector, positions in self.steering:
            vector = vector.to(device=act.device, dtype=act.dtype)
            if positions is None:
                act = act + vector
            else:
                scale = torch.zeros(act.shape[-2], 1, dtype=act.dtype, device=act.device)
                scale[positions] = 1
                act = act + scale * vector
        return act

    def forward(self, act: torch.Tensor) -> torch.Tensor:
        if not isinstance(act, torch.Tensor):
            raise TypeError(f"nnsae: the activation at {self.hook_label!r} is a {type(act).__name__}, not a tensor; "
                            "hook a module whose output (or first output) is a tensor.")
        if self.mode == "steer":
            return self._add_steering(act)
        source = act
        if self.transcoder:
            source, self.captured = self.captured, None
            if source is None:
                raise RuntimeError(
                    f"nnsae: the transcoder at {self.hook_label!r} reached its write hook {self.spec.write.module}."
                    f"{self.spec.write.io} before its read hook {self.spec.read.module}.{self.spec.read.io} ran.")
        if self.mode == "observe":
            self.sae.encode(sae_input(self.sae, source, self.spec.read, self.n_heads, self.hook_label))
            return self._add_steering(act) if self.steering else act
        new = splice_activation(self.sae, source, act, self.spec, use_error_term=self.use_error_term,
                                n_heads=self.n_heads, label=self.hook_label, mask=self._mask(act))
        return self._add_steering(new) if self.steering else new


# ---------------------------------------------------------------------------------------------------------------
# attach / detach
# ---------------------------------------------------------------------------------------------------------------


def sae_hook_name(sae: SAE, spec: HookSpec, hook: Any) -> str:
    """The SAELens-style name of an attachment (cache keys, labels): the hook string the user gave, else the SAE's
    ``hook_name`` / ``hf_hook_name``, else the resolved read point."""
    if isinstance(hook, str):
        return hook
    metadata = sae.cfg.metadata
    if hook is None and (metadata.hook_name or metadata.hf_hook_name):
        return metadata.hook_name or metadata.hf_hook_name
    return hook_label(spec.read)


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
        width = getattr(_text_config(root), "hidden_size", None)
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


def _special_ids(model: Any, root: nn.Module, exclude: bool | Sequence[int]) -> list[int] | None:
    if exclude is False or exclude is None:
        return None
    if exclude is not True:
        return [int(i) for i in exclude]
    tokenizer = getattr(model, "tokenizer", None) if is_nnsight(model) else None
    sources = [tokenizer] if tokenizer is not None else [getattr(root, "generation_config", None),
                                                         getattr(root, "config", None)]
    ids = set().union(*(special_token_ids(source) for source in sources if source is not None))
    if not ids:
        raise ValueError("exclude_special_tokens=True but no special token ids were found on the model's tokenizer "
                         "or config; pass a list of token ids instead.")
    return sorted(ids)


def attach(model: Any, sae: SAE, *, hook: str | HookPoint | HookSpec | None = None, mode: str = "splice",
           use_error_term: bool | None = None, exclude_special_tokens: bool | Sequence[int] = False,
           name: str | None = None, persistent: bool | None = None, stack: bool = False) -> SAEHandle:
    """Attach ``sae`` to ``model`` (an nnsight `LanguageModel` / `TransformersModel` / `NNsight`, or a plain HF
    module) and return its `SAEHandle`.

    Args:
        hook: where it reads/writes: anything `nnsae.resolve_hook` takes (an HF module path such as
            ``"model.layers.6"`` or ``"model.layers.6.input"``, a TransformerLens name such as
            ``"blocks.6.hook_resid_pre"``, a `HookPoint`/`HookSpec`), or None for the SAE's ``cfg.metadata``.
        mode: ``"splice"`` (replace the activation by the reconstruction), ``"observe"`` (encode only; the model is
            untouched and the features readable) or ``"steer"`` (no SAE computation; only `SAEHandle.steer`).
        use_error_term: add the clean, detached error ``activation - reconstruction`` (SAELens semantics): the model
            output is unchanged (bit for bit) until features are edited. None means the SAE's ``use_error_term``
            attribute if it has one, else False.
        exclude_special_tokens: True (the special ids of `nnsae.data.special_token_ids`, from the tokenizer, else
            the model config) or a list of token ids: those positions pass the original activation through (error
            term 0 there), as SAELens does. Default False, as ``HookedSAETransformer``.
        name: attribute name of the mount on the hooked module (default ``"sae"``, then ``"sae_1"``, …).
        persistent: None (default) attaches for the current trace when called inside a trace body, else until
            `SAEHandle.detach`; True/False force it.
        stack: False (default, SAELens' ``add_sae``): an SAE already attached at the same input hook is detached
            and replaced. True: both run, chained in attach order (each sees the previous one's output).
 A transcoder (different read and write hooks) captures
    its input at the read hook and replaces the activation at the write hook; its error term is the activation at
    the write hook minus the clean reconstruction. The SAE is used where it is: if the hooked module sits on another
    device, the mount holds its own copy of the weights there and ``sae`` is not moved.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if use_error_term is None:
        use_error_term = bool(getattr(sae, "use_error_term", False))
    if use_error_term and mode != "splice":
        raise ValueError(f"use_error_term=True only applies to mode='splice', not {mode!r}.")
    if not isinstance(sae, SAE):
        raise TypeError(f"nnsae.attach needs an nnsae SAE, got {type(sae).__name__}.")
    if sae.W_dec.device.type == "meta":
        raise ValueError("nnsae.attach: the SAE's weights are on the meta device (they hold no values): load them "
                         "first (SAE.load_from_disk, SAE.from_pretrained, or sae.to_empty(device=...) and "
                         "load_state_dict).")
    nnsight_model = is_nnsight(model)
    if nnsight_model and getattr(model, "dispatched", True) is False and hasattr(model, "dispatch"):
        model.dispatch()  # modules mounted on a meta model would be dropped at dispatch
    root = unwrap_model(model)
    spec = resolve_hook(model, sae if hook is None else hook)
    if spec.write.normalize is not None:
        raise ValueError(f"nnsae.attach: {spec.write.module}.{spec.write.io} is a read-only (normalized) hook point; "
                         "an SAE can only write where the activation can be put back.")
    label = sae_hook_name(sae, spec, hook)
    if stack and mode != "steer" and any(h.sae is sae for h in occupants(model, spec)):
        raise ValueError(f"nnsae.attach: this SAE is already attached at {label!r}; stack=True would apply it twice. "
                         "Detach it first, or attach a copy (copy.deepcopy(sae)) to chain it with itself.")
    in_trace = in_trace_body(model)
    scope = "persistent" if (persistent if persistent is not None else not in_trace) else "trace"
    if scope == "trace" and not in_trace:
        raise ValueError("persistent=False needs a trace: call nnsae.attach inside a `with model.trace(...)` body.")
    write_module = root.get_submodule(spec.write.module)
    read_module = root.get_submodule(spec.read.module)
    if in_trace:
        for point, module in ((spec.read, read_module), (spec.write, write_module)):
            if already_ran_past(envoy_of(model, module, point.module), point.io):
                raise ValueError(
                    f"nnsae.attach: the model already ran past {point.module}.{point.io} in this trace, so the SAE "
                    "would never run. Attach before reading any value at or after the hooked module.")

    # widths, checked now where the module tells us, else at the first call
    expected = _expected_width(root, spec.read)
    if expected is not None and expected != sae.cfg.d_in:
        raise ValueError(f"nnsae.attach: the SAE has d_in={sae.cfg.d_in} but the activation at "
                         f"{spec.read.module}.{spec.read.io} has width {expected} (hook {label!r}).")
    if mode != "observe":
        out_width = _expected_width(root, spec.write)
        if out_width is not None and out_width != sae.cfg.output_dim:
            raise ValueError(f"nnsae.attach: the SAE writes width {sae.cfg.output_dim} but the activation at "
                             f"{spec.write.module}.{spec.write.io} has width {out_width} (hook {label!r}).")

    device = _module_device(root, write_module)
    move_to = device if device is not None and device.type != "meta" and sae.W_dec.device != device else None
    special = _special_ids(model, root, exclude_special_tokens)
    if name is None:
        name, i = "sae", 0
        while hasattr(write_module, name):
            i += 1
            name = f"sae_{i}"
    elif hasattr(write_module, name):
        raise ValueError(f"nnsae.attach: {spec.write.module or type(root).__name__} already has an attribute {name!r}.")

    state = ModelState.of(root)
    # A view of the SAE with fresh hook modules (each attachment has its own traceable hook points; the caller's
    # SAE is never instrumented), sharing its weights unless it must live on another device.
    view = fresh_hook_view(sae, {h: nn.Identity() for h in HOOK_NAMES if hasattr(sae, h)}, move_to)
    if move_to is not None:
        view.cfg = copy.deepcopy(sae.cfg)
        view.cfg.device = str(move_to)
    module = SAESplice(view, spec, mode, bool(use_error_term), special, state, label,
                       hook_z_heads(sae, root.config) if hasattr(root, "config") else None)
    handle = SAEHandle(model, sae, module, spec, name, label, scope, state)
    handle._write_module = write_module
    handle.attached = True  # from here on, detach() undoes whatever part of the attachment exists
    try:
        if nnsight_model:
            envoy = handle._write_envoy = envoy_of(model, write_module, spec.write.module)
            setattr(envoy, name, module)  # mounts on the HF module and builds the child envoys
            handle.envoy = getattr(envoy, name)
        else:
            write_module.add_module(name, module)
        if special is not None:
            state.use_tokens()
            handle._token_user = True
        if module.transcoder:
            capture = module.capture  # one bound-method object, so removal finds it by identity
            handle._ops.append((read_module, spec.read.io, capture))
            state.add_op(read_module, spec.read.io, capture)
        handle._ops.append((write_module, spec.write.io, module))
        state.add_op(write_module, spec.write.io, module)
        state.handles.append(handle)
        if nnsight_model:
            explain_order_errors(model, handle, handle.order_advice)
            if scope == "trace":
                at_run_end(model, handle.detach)
    except BaseException:
        handle.detach()
        raise
    if not stack and mode != "steer":
        for old in occupants(model, spec, exclude=handle):
            old.detach()
    return handle


def occupants(model: Any, spec: HookSpec, exclude: SAEHandle | None = None) -> list[SAEHandle]:
    """The running SAEs (not steering-only mounts) attached at ``spec``'s input hook."""
    return [h for h in attached(model) if h is not exclude and h.mode != "steer" and h.spec.read == spec.read]


def attached(model: Any, include_suspended: bool = False) -> list[SAEHandle]:
    """The SAEs currently attached to ``model`` and running, in attach order (with ``include_suspended``, also the
    ones a temporary SAE at their hook has suspended)."""
    state = ModelState.of(unwrap_model(model), create=False)
    return [] if state is None else [h for h in state.handles if include_suspended or not h.suspended]


def detach(model: Any, saes: SAE | SAEHandle | Iterable[SAE | SAEHandle] | None = None, *,
           hooks: str | Iterable[str] | None = None) -> None:
    """Detach every SAE from ``model`` (SAELens ``reset_saes()``), or only the given SAEs / handles, or only those
    attached at the given hooks (``hooks=["blocks.8.hook_resid_pre"]``, SAELens ``reset_saes(act_names=...)``;
    any name `resolve_hook` reads)."""
    handles = attached(model, include_suspended=True)
    if saes is not None:
        wanted = [saes] if isinstance(saes, (SAE, SAEHandle)) else list(saes)
        handles = [h for h in handles if any(h is w or h.sae is w for w in wanted)]
    if hooks is not None:
        names = [hooks] if isinstance(hooks, str) else list(hooks)
        points = [resolve_hook(model, name).read for name in names]
        handles = [h for h in handles if h.hook_name in names or h.spec.read in points]
    for handle in reversed(handles):
        handle.detach()
