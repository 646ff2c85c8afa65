"""The SAE base class: everything architectures share (input processing, decoding, hooks, folding, files).

Architectures differ only in `pre_activation` and `activation` (and transcoders in what surrounds them). The
code here runs inside traced models and may be shipped by value to a remote nnsight server, so it is plain torch:
no zero-argument `super()`, no behaviour-carrying decorators.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from nnsae import kernels
from nnsae.config import SAEConfig, architecture_class, dtype_name, parse_dtype
from nnsae.seam import module_observed

def native_kernels():
    """`nnsae.native.library()`, imported here rather than at module level: an SAE shipped by value to a remote
    server that cannot import nnsae runs in plain torch there (None)."""
    try:
        from nnsae import native
    except ImportError:
        return None
    return native.library()


HOOK_NAMES = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
              "hook_sae_output")


class SAE(nn.Module):
    """A sparse autoencoder with SAELens 6 parameter names, shapes and inference math.

    Build one with `SAE.from_config(cfg)`, `SAE.load_from_disk(path)` or `SAE.from_pretrained(release, sae_id)`;
    the concrete class is chosen by `cfg.architecture`.
    """

    architecture: ClassVar[str]
    config_fields: ClassVar[tuple[str, ...]] = ()  # architecture-specific SAEConfig fields written to cfg.json
    param_shapes: ClassVar[dict[str, str]] = {"W_enc": "in,sae", "W_dec": "sae,in", "b_enc": "sae", "b_dec": "in"}
    reshapes_input: ClassVar[bool] = True  # whether reshape_activations="hook_z" applies (not to transcoders)
    use_error_term: bool = False  # SAELens' attribute: the default of `forward` and of `nnsae.attach`

    def __init__(self, cfg: SAEConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self._hooks_enabled = True
        self._norm_state: tuple[torch.Tensor, ...] | None = None
        self._d_head: int | None = None
        self.log_feature_sparsity: torch.Tensor | None = None  # written to sparsity.safetensors when known
        for name in HOOK_NAMES:
            setattr(self, name, nn.Identity())
        dims = {"in": cfg.d_in, "sae": cfg.d_sae, "out": cfg.output_dim}
        for name, spec in self.param_shapes.items():
            shape = tuple(dims[d] for d in spec.split(","))
            setattr(self, name, nn.Parameter(torch.zeros(shape, dtype=parse_dtype(cfg.dtype), device=cfg.device)))
        self.initialize_weights()

    def __iter__(self) -> Any:
        raise TypeError(
            f"A {type(self).__name__} is one SAE, not a tuple: SAE.from_pretrained returns the SAE alone (SAELens 6). "
            "For `sae, cfg_dict, sparsity = ...` use SAE.from_pretrained_with_cfg_and_sparsity(release, sae_id)."
        )

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Reject configs this architecture cannot run (overridden where fields are required)."""

    @classmethod
    def from_config(cls, cfg: SAEConfig | dict[str, Any]) -> SAE:
        """A new SAE of `cfg.architecture` with SAELens' default initialisation."""
        if isinstance(cfg, dict):
            cfg = SAEConfig.from_dict(cfg)
        return architecture_class(cfg.architecture)(cfg)

    @classmethod
    def from_dict(cls, cfg: SAEConfig | dict[str, Any], state_dict: dict[str, torch.Tensor],
                  device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> SAE:
        """An SAE from a config and a state dict with SAELens keys, checked strictly (names and shapes)."""
        if isinstance(cfg, dict):
            cfg = SAEConfig.from_dict(cfg)
        if device is not None:
            cfg.device = str(device)
        if dtype is not None:
            cfg.dtype = dtype_name(dtype)
        target_device, cfg.device = cfg.device, "meta"
        sae = architecture_class(cfg.architecture)(cfg)
        cfg.device = target_device
        sae._check_state_dict(state_dict)
        sae.load_state_dict(state_dict, strict=True, assign=True)
        return sae.to(device=target_device, dtype=parse_dtype(cfg.dtype))

    def _check_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        expected = {name: tuple(p.shape) for name, p in self.named_parameters()}
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"Weights do not match a {self.architecture!r} SAE: missing {missing}, unexpected {unexpected}."
            )
        for name, shape in expected.items():
            if not state_dict[name].is_floating_point():
                raise ValueError(f"Weight {name!r} has dtype {state_dict[name].dtype}; SAE weights must be floating "
                                 "point (float32, float16, bfloat16 or float64).")
            if tuple(state_dict[name].shape) != shape:
                raise ValueError(
                    f"Weight {name!r} has shape {tuple(state_dict[name].shape)} but the config "
                    f"(d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}) needs {shape}."
                )

    def initialize_weights(self) -> None:
        """SAELens' init: kaiming-uniform decoder, encoder = decoder transpose, zero biases."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.W_dec)
            self.W_enc.copy_(self.W_dec.T)

    # ---- device, dtype -----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def to(self, *args: Any, **kwargs: Any) -> SAE:
        """Like `nn.Module.to`, keeping `cfg.device` / `cfg.dtype` in step with the weights."""
        out = nn.Module.to(self, *args, **kwargs)
        self.cfg.device = str(self.W_dec.device)
        self.cfg.dtype = dtype_name(self.W_dec.dtype)
        return out

    # ---- the forward pass ---------------------------------------------------------------------------------------

    def _hook(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)(x) if self._hooks_enabled else x

    def observed(self, *names: str) -> bool:
        """Whether anything could see or edit the values at these hook points: torch hooks on their modules (or
        global module hooks), a module that is not a plain `nn.Identity`, or a replaced `forward` (nnsight installs
        one on every module it wraps, and keeps it). Fast paths that skip a dense tensor run only when not. The
        answer ignores `_hooks_enabled`, so a clean (hook-free) recomputation takes the kernels the hooked one took."""
        return any(module_observed(getattr(self, name)) for name in names)

    _caller_grad: bool | None = None  # the grad mode clean_reconstruct mirrors (it runs under no_grad)

    def _grad_mode(self) -> bool:
        """The grad mode kernel choices follow: the caller's, also inside `clean_reconstruct`, so the error term's
        reference takes the kernels the hooked reconstruction took and cancels it bit for bit."""
        return torch.is_grad_enabled() if self._caller_grad is None else self._caller_grad

    def clean_reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """reconstruct(x) without passing through the hook modules and without gradient: the reference the error
        term is measured against. (Plain flags, not context managers, so a by-value copy of this class shipped
        to a remote nnsight server behaves the same.)"""
        grad = self._grad_mode()
        with torch.no_grad():
            previous, self._hooks_enabled, self._caller_grad = (self._hooks_enabled, self._caller_grad), False, grad
            try:
                return self.reconstruct(x)
            finally:
                self._hooks_enabled, self._caller_grad = previous

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError(f"SAE input must be a tensor of shape (..., d_in={self.cfg.d_in}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.")
        hook_z = self.reshapes_input and self.cfg.reshape_activations == "hook_z"
        width = x.shape[-1] * x.shape[-2] if hook_z and x.dim() >= 2 else x.shape[-1]
        if width != self.cfg.d_in:
            hint = " (hook_z input is [..., n_heads, d_head])" if hook_z else ""
            raise ValueError(
                f"SAE expects inputs with last dimension d_in={self.cfg.d_in}{hint}, got shape {tuple(x.shape)}."
            )
        if x.device != self.W_enc.device:
            raise ValueError(
                f"Input is on {x.device} but the SAE is on {self.W_enc.device}: move one of them "
                f"(e.g. sae.to('{x.device}'))."
            )

    def _reshape_in(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.reshape_activations != "hook_z":
            return x
        self._d_head = x.shape[-1]
        return x.flatten(-2)  # "... n_heads d_head -> ... (n_heads d_head)", head-major

    def _reshape_out(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.reshape_activations != "hook_z":
            return x
        d_head = self._d_head
        if d_head is None:
            raise ValueError("decode() of a hook_z SAE needs a preceding encode() to know d_head.")
        return x.unflatten(-1, (x.shape[-1] // d_head, d_head))

    def _normalize_in(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True)
            self._norm_state = (coeff,)
            return x * coeff
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            self._norm_state = (mu, std)
            return x / (std + 1e-5)
        return x  # "expected_average_only_in" is applied outside the SAE (or folded), as in SAELens

    def _normalize_out(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.cfg.normalize_activations
        if mode not in ("constant_norm_rescale", "layer_norm"):
            return x
        if self._norm_state is None:
            raise ValueError(f"decode() with normalize_activations={mode!r} needs a preceding encode() of the input.")
        if mode == "constant_norm_rescale":
            return x / self._norm_state[0]
        mu, std = self._norm_state
        return x * std + mu

    def process_sae_in(self, x: torch.Tensor) -> torch.Tensor:
        """dtype cast, hook_z flatten, `hook_sae_input`, input normalisation, then `- b_dec` if configured."""
        self._check_input(x)
        x = self._reshape_in(x.to(self.dtype))
        x = self._normalize_in(self._hook("hook_sae_input", x))
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The value seen at `hook_sae_acts_pre`."""
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Feature activations from the (hooked) pre-activation and the processed input."""
        return torch.relu(pre)

    activation.fused_kind = "relu"  # what `kernels.bias_activation` computes for this exact method

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) activations → (..., d_sae) feature activations."""
        sae_in = self.process_sae_in(x)
        kind = getattr(type(self).activation, "fused_kind", None)
        if kind is not None and type(self).pre_activation is SAE.pre_activation and self.may_fuse(sae_in):
            # Nothing can see the pre-activation: add b_enc and activate in one in-place pass over x @ W_enc.
            acts = kernels.bias_activation(sae_in @ self.W_enc, self.b_enc, kind,
                                           threshold=getattr(self, "threshold", None), native=native_kernels())
            return self._hook("hook_sae_acts_post", acts)
        pre = self._hook("hook_sae_acts_pre", self.pre_activation(sae_in))
        return self._hook("hook_sae_acts_post", self.activation(pre, sae_in))

    def may_fuse(self, sae_in: torch.Tensor) -> bool:
        """Whether encoding may skip the pre-activation tensor: autograd does not need it and nothing observes
        `hook_sae_acts_pre` (the answer ignores `_hooks_enabled`, so the error term's clean reference takes the
        same kernels as the hooked reconstruction)."""
        if self._grad_mode() and (sae_in.requires_grad or self.W_enc.requires_grad):
            return False
        return not self.observed("hook_sae_acts_pre")

    def decoder_matmul(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """feature_acts @ W_dec. Without grad, on plain CPU tensors with at most 1/32 of the activations non-zero
        (what hooks and edits leave of a sparse code), only the rows of W_dec of non-zero activations are read: the
        same sums in another order, about 2× faster than the dense product at d_sae 4608 and k 32."""
        W = self.W_dec
        if (self._grad_mode() or type(feature_acts) is not torch.Tensor or feature_acts.device.type != "cpu"
                or feature_acts.dtype != W.dtype or feature_acts.numel() == 0 or feature_acts.shape[-1] != W.shape[0]):
            return feature_acts @ W
        flat = feature_acts.reshape(-1, feature_acts.shape[-1])
        # Counting every non-zero costs about half a matmul on dense codes: a clearly dense sample of rows decides
        # first, the full count only where the sample is sparse.
        sample = flat[:: max(1, flat.shape[0] // 64)]
        if int(torch.count_nonzero(sample)) * 16 > sample.numel() or int(torch.count_nonzero(flat)) * 32 > flat.numel():
            return feature_acts @ W
        rows, cols = flat.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=flat.shape[0])
        out = nn.functional.embedding_bag(cols, W, counts.cumsum(0) - counts, mode="sum",
                                          per_sample_weights=flat[rows, cols])
        return out.view(*feature_acts.shape[:-1], W.shape[-1])

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) feature activations → reconstruction in the input's space."""
        if feature_acts.dim() == 0 or feature_acts.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"decode() expects feature activations of shape (..., d_sae={self.cfg.d_sae}), got "
                             f"{tuple(feature_acts.shape)}.")
        recons = self._hook("hook_sae_recons", self.decoder_matmul(feature_acts) + self.b_dec)
        return self._reshape_out(self._normalize_out(recons))

    def encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, full reconstruction): decode(encode(x)) plus any term an architecture adds outside the
        dictionary (skip connections)."""
        feature_acts = self.encode(x)
        return feature_acts, self.decode(feature_acts)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_decode(x)[1]

    def forward(self, x: torch.Tensor, use_error_term: bool | None = None, target: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The SAE's reconstruction of `x`, through `hook_sae_output`.

        With `use_error_term`, the clean error `target - reconstruct(x)` (target defaults to `x`), computed without
        hooks and without gradient, is added through `hook_sae_error`: with no edits at the hooks the output equals
        the target, and edits to features change only the reconstruction path (SAELens semantics).
        """
        out = self.reconstruct(x)
        if self.use_error_term if use_error_term is None else use_error_term:
            if target is None:
                if self.cfg.d_out is not None:
                    raise ValueError("A transcoder's error term needs `target=` (the activation at its output hook).")
                target = x
            clean = self.clean_reconstruct(x)
            with torch.no_grad():
                error = self._hook("hook_sae_error", target.to(clean.dtype) - clean)
            out = out + error
        return self._hook("hook_sae_output", out)

    # ---- folding ------------------------------------------------------------------------------------------------

    def W_dec_norms(self) -> torch.Tensor:
        return self.W_dec.detach().norm(dim=-1).clamp(min=1e-8)

    def fold_W_dec_norm(self) -> None:
        """Scale decoder rows to unit norm and the encoder to compensate; outputs are unchanged."""
        with torch.no_grad():
            norms = self.W_dec_norms()
            self.W_dec.div_(norms[:, None])
            self.W_enc.mul_(norms[None, :])
            self.fold_encoder_scale(norms)

    def fold_encoder_scale(self, norms: torch.Tensor) -> None:
        """Rescale per-feature encoder quantities other than W_enc by `norms` (bias, thresholds)."""
        self.b_enc.mul_(norms)

    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold an input scaling `x * s` (expected_average_only_in) into the weights: W_enc·s, W_dec/s, b_dec/s."""
        with torch.no_grad():
            self.W_enc.mul_(scaling_factor)
            self.W_dec.div_(scaling_factor)
            self.b_dec.div_(scaling_factor)
        self.cfg.normalize_activations = "none"

    # ---- files --------------------------------------------------------------------------------------------------

    def save_model(self, path: str | Path, log_sparsity: torch.Tensor | None = None) -> tuple[Path, Path]:
        """Write cfg.json + sae_weights.safetensors (+ sparsity.safetensors) in SAELens 6 layout."""
        # The file methods import nnsae.io when called, not at module level: an SAE shipped by value to a remote
        # nnsight server takes the module-level names its methods use along, and the io stack cannot travel.
        from nnsae.io.formats import saelens

        return saelens.save(self, Path(path), log_sparsity if log_sparsity is not None else self.log_feature_sparsity)

    @classmethod
    def load_from_disk(cls, path: str | Path, device: str | torch.device = "cpu",
                       dtype: str | torch.dtype | None = None, format: str | None = None,
                       fold_W_dec_norm: bool = False) -> SAE:
        """Load an SAE directory: SAELens layout, or a foreign format (`format=` or auto-detected).

        A foreign SAE that expects inputs scaled by a norm factor its files record (Llama Scope) has the factor
        folded in, so it takes raw activations like every other SAE.
        """
        from nnsae.io.formats import detect_format, load_directory, norm_scaling_factor

        path = Path(path)
        format = format or detect_format(path)
        cfg_dict, state_dict, log_sparsity = load_directory(path, format=format)
        try:
            sae = cls.from_dict(cfg_dict, state_dict, device=device, dtype=dtype)
        except (ValueError, TypeError) as e:
            raise ValueError(f"Cannot load the SAE in {path}: {e}") from None
        sae.log_feature_sparsity = log_sparsity
        if format != "saelens" and sae.cfg.normalize_activations == "expected_average_only_in":
            factor = norm_scaling_factor(format, path)
            if factor is not None:
                sae.fold_activation_norm_scaling_factor(factor)
        if fold_W_dec_norm:
            sae.fold_W_dec_norm()
        return sae

    @classmethod
    def from_pretrained(cls, release: str, sae_id: str, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "float32", force_download: bool = False,
                        fold_W_dec_norm: bool = False, revision: str | None = None) -> SAE:
        """An SAE from the pretrained registry (`nnsae.list_pretrained()`) or any Hugging Face repo id, with
        `sae_id` the SAE's id in the release (or its folder in the repo). Downloads through huggingface_hub."""
        return cls.from_pretrained_with_cfg_and_sparsity(release, sae_id, device, dtype, force_download,
                                                         fold_W_dec_norm, revision)[0]

    @classmethod
    def from_pretrained_with_cfg_and_sparsity(cls, release: str, sae_id: str, device: str | torch.device = "cpu",
                                              dtype: str | torch.dtype = "float32", force_download: bool = False,
                                              fold_W_dec_norm: bool = False, revision: str | None = None, *,
                                              cache_dir: str | Path | None = None, token: str | bool | None = None
                                              ) -> tuple[SAE, dict[str, Any], torch.Tensor | None]:
        """`from_pretrained`, also returning the config dict (the SAE's `cfg.to_dict()` before any
        `fold_W_dec_norm`) and the log10 feature sparsity (or None).

        `release` is a name from the registry (`nnsae.list_pretrained()`), or a Hugging Face repo id with `sae_id`
        the SAE's folder in that repo (layout detected). `revision`, `cache_dir`, `force_download` and `token` go to
        `huggingface_hub`; `HF_HUB_OFFLINE=1` loads from the cache only. The release's config overrides and
        Neuronpedia id are applied, and its norm scaling factor is folded in for an SAE that expects
        `expected_average_only_in` input scaling."""
        from nnsae.io.pretrained import read_pretrained

        files = read_pretrained(release, sae_id, device=device, dtype=dtype, force_download=force_download,
                                revision=revision, cache_dir=cache_dir, token=token)
        sae = cls.from_dict(files.cfg, files.state_dict, device=device, dtype=dtype)
        log_sparsity = files.log_sparsity
        if log_sparsity is not None:
            log_sparsity = log_sparsity.to(device=torch.device(device))
        sae.log_feature_sparsity = log_sparsity
        if sae.cfg.normalize_activations == "expected_average_only_in":
            if files.norm_scaling_factor is not None:
                sae.fold_activation_norm_scaling_factor(files.norm_scaling_factor)
            else:
                warnings.warn(
                    f"SAE {sae_id!r} of {release!r} expects inputs scaled by a norm factor "
                    f"(normalize_activations='expected_average_only_in') but the registry has no norm_scaling_factor "
                    f"for it; the factor is not folded, so scale inputs yourself.", UserWarning, stacklevel=2,
                )
        sae = sae.to(device=torch.device(device), dtype=parse_dtype(dtype))  # guarantee the requested placement
        returned_cfg = sae.cfg.to_dict()
        if fold_W_dec_norm:
            sae.fold_W_dec_norm()
        return sae, returned_cfg, log_sparsity

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}, "
                f"hook={self.cfg.metadata.hook_name or self.cfg.metadata.hf_hook_name!r}, dtype={self.cfg.dtype})")
