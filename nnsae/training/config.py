"""`TrainConfig`: one SAE's training hyper-parameters, with SAELens 6 names, defaults and checks.

A config is written without knowing the store: `d_sae` may come from `expansion_factor`, `lr` from the default
rule below, and both are filled in by `resolve(d_in, batch_size_tokens)` once the store is known.

Default learning rate (`lr=None`):
- TopK family (topk, abstopk, batchtopk, matryoshka_batchtopk): `lr = 4e-3 · √(4608/d_sae) · √(B/4096)`, B the
  global batch in tokens, capped at 1e-2. Measured basis (performance-anchors.md, SmolLM2-135M layer 6, d_in 576,
  d_sae 4608, k 32, batch 4096, one epoch of 400k tokens): lr 4e-3 gave held-out EV 0.925, 3.8e-4 (sparsify's
  Adam rule, 2e-4/√(d_sae/2¹⁴)) 0.85, and 8e-3 began to drop. Only that one point is measured; the 1/√width
  factor is sparsify's width scaling and √batch the usual Adam batch scaling.
- L1/L0-penalty family (standard, gated, jumprelu): SAELens' default 3e-4, not re-measured here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

TOPK_FAMILY = ("topk", "abstopk", "batchtopk", "matryoshka_batchtopk")
# Architectures `train` can train (the SAEs it saves are of the inference architectures in
# `nnsae.architectures.ARCHITECTURES`; batchtopk and matryoshka_batchtopk are saved as jumprelu).
TRAINABLE_ARCHITECTURES = ("standard", "gated", "jumprelu", *TOPK_FAMILY)
LR_SCHEDULERS = ("constant", "cosineannealing", "cosineannealingwarmrestarts")
LR_SCHEDULER_ALIASES = {"cosine": "cosineannealing", "cosine_restarts": "cosineannealingwarmrestarts"}
JUMPRELU_MODES = ("step", "tanh", "quadratic")
NORMALIZATIONS = ("none", "expected_average_only_in")
TRAIN_DTYPES = ("float32", "float64")
# Transcoders (`hook_out` set) train with these; cross-layer transcoders (lists of hooks) with the last two.
TRANSCODER_ARCHITECTURES = ("standard", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk")
CLT_ARCHITECTURES = ("topk", "jumprelu")

# Fields that describe how the SAE was trained but are not part of the inference config: written to the exported
# cfg.json as metadata.training_architecture_details (SAELens does the same).
_INFERENCE_FIELDS = {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations", "k",
                     "rescale_acts_by_decoder_norm"}
# Fields that can change between a run and its resume without changing the result.
_RESUME_FREE_FIELDS = {"log_every", "wandb_project", "checkpoint_every_tokens", "eval_every", "n_eval_batches",
                       "eval_batch_size_prompts", "n_checkpoints"}


@dataclass
class TrainConfig:
    """Hyper-parameters of one SAE. Defaults are SAELens 6's (LanguageModelSAERunnerConfig + TrainingSAEConfig)."""

    architecture: str = "topk"
    hook: str | list[str] | None = None  # a key of the store's batches; None = the store's only hook
    # Transcoders: `hook` is the input (MLP input) and `hook_out` the activation to predict (MLP output). A
    # cross-layer transcoder gives one input and one output hook per layer, layers 0..n-1 in order, as lists.
    hook_out: str | list[str] | None = None
    skip_connection: bool = False  # transcoders: a linear skip path x W_skipᵀ (SAELens' skip_transcoder)
    d_sae: int | None = None
    expansion_factor: float | None = None  # d_sae = round(expansion_factor · d_in) when d_sae is None
    k: float = 100  # topk/abstopk: an int per token; batchtopk/matryoshka: the mean per token (float)
    name: str | None = None  # output folder; default "<hook>-<architecture>-<d_sae>[-k<k>]"
    # optimisation
    training_tokens: int = 2_000_000
    lr: float | None = None  # None = the default rule in the module docstring
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_scheduler: str = "constant"  # constant | cosineannealing (cosine) | cosineannealingwarmrestarts
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    lr_end: float | None = None  # None = lr / 10
    n_restart_cycles: int = 1
    # sparsity penalties
    l1_coefficient: float = 1.0
    lp_norm: float = 1.0
    l1_warm_up_steps: int = 0
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    jumprelu_sparsity_loss_mode: str = "step"
    jumprelu_tanh_scale: float = 4.0
    jumprelu_ste_to_input: bool = False
    target_l0: float | None = None  # quadratic mode only
    pre_act_loss_coefficient: float | None = None
    # TopK family
    aux_loss_coefficient: float = 1.0
    rescale_acts_by_decoder_norm: bool = True
    topk_threshold_lr: float = 0.01
    matryoshka_widths: list[int] = field(default_factory=list)
    use_matryoshka_aux_loss: bool = False
    # weights and inputs
    decoder_init_norm: float | None = 0.1
    apply_b_dec_to_input: bool = True  # always False for transcoders (SAELens' transcoders reject it)
    normalize_activations: str = "none"  # none | expected_average_only_in
    n_batches_for_norm_estimate: int = 1000
    # dead features
    dead_feature_window: int = 1000
    feature_sampling_window: int = 2000
    # evaluation and checkpoints during training (SAELens: evals every wandb_log_frequency · eval_every_n_wandb_logs
    # steps on n_eval_batches batches; n_checkpoints intermediate SAEs at evenly spaced token counts)
    eval_every: int = 1000  # steps between CE/KL evaluations on held-out batches; 0 turns them off
    n_eval_batches: int = 10
    eval_batch_size_prompts: int | None = None  # None = the store's store_batch_size_prompts
    n_checkpoints: int = 0
    # run
    checkpoint_every_tokens: int | None = None
    seed: int = 42
    dtype: str = "float32"  # parameter dtype
    autocast: bool = False  # bf16 autocast of the forward pass (the encoder matmul in the sparse TopK path)
    sparse_kernels: bool = True  # exact sparse forward/backward: TopK family always, ReLU family once sparse
    device: str = "cpu"
    log_every: int = 10
    wandb_project: str | None = None  # log to wandb only when set (and wandb is installed)

    def __post_init__(self) -> None:
        arch = self.architecture
        if arch not in TRAINABLE_ARCHITECTURES:
            raise ValueError(f"Unknown training architecture {arch!r}; known architectures: "
                             f"{list(TRAINABLE_ARCHITECTURES)}.")
        self.lr_scheduler = LR_SCHEDULER_ALIASES.get(self.lr_scheduler.lower(), self.lr_scheduler.lower())
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler={self.lr_scheduler!r} is not one of {LR_SCHEDULERS} "
                             f"(aliases {sorted(LR_SCHEDULER_ALIASES)}).")
        if self.jumprelu_sparsity_loss_mode not in JUMPRELU_MODES:
            raise ValueError(f"jumprelu_sparsity_loss_mode={self.jumprelu_sparsity_loss_mode!r} is not one of "
                             f"{JUMPRELU_MODES}.")
        if arch == "jumprelu" and self.jumprelu_sparsity_loss_mode == "quadratic":
            if self.target_l0 is None or self.target_l0 <= 0:
                raise ValueError("jumprelu_sparsity_loss_mode='quadratic' needs target_l0 > 0.")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations={self.normalize_activations!r} is not supported in training; "
                             f"use one of {NORMALIZATIONS}.")
        if self.dtype not in TRAIN_DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: train in one of {TRAIN_DTYPES} (use autocast=True for bf16 "
                             f"compute).")
        if self.d_sae is not None and self.expansion_factor is not None:
            raise ValueError("Give d_sae or expansion_factor, not both.")
        if self.d_sae is not None and (not isinstance(self.d_sae, int) or self.d_sae <= 0):
            raise ValueError(f"d_sae must be a positive integer, got {self.d_sae!r}.")
        if self.expansion_factor is not None and self.expansion_factor <= 0:
            raise ValueError(f"expansion_factor must be positive, got {self.expansion_factor!r}.")
        if arch in ("topk", "abstopk"):
            if float(self.k) != int(self.k) or self.k < 1:
                raise ValueError(f"{arch} needs an integer k ≥ 1, got {self.k!r}.")
            self.k = int(self.k)
        elif arch in TOPK_FAMILY and not self.k > 0:
            raise ValueError(f"{arch} needs k > 0 (the mean number of active latents per token), got {self.k!r}.")
        for name in ("training_tokens", "dead_feature_window", "feature_sampling_window", "log_every",
                     "n_batches_for_norm_estimate", "n_restart_cycles"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("lr_warm_up_steps", "lr_decay_steps", "l1_warm_up_steps", "l0_warm_up_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        if self.checkpoint_every_tokens is not None and self.checkpoint_every_tokens < 1:
            raise ValueError(f"checkpoint_every_tokens must be positive or None, got {self.checkpoint_every_tokens}.")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}.")
        if self.jumprelu_bandwidth <= 0:
            raise ValueError("jumprelu_bandwidth must be positive.")
        if not 0 < self.topk_threshold_lr <= 1:
            raise ValueError("topk_threshold_lr must be in (0, 1].")
        if self.matryoshka_widths and arch != "matryoshka_batchtopk":
            raise ValueError("matryoshka_widths is only used by architecture='matryoshka_batchtopk'.")
        if arch == "matryoshka_batchtopk" and not self.matryoshka_widths:
            raise ValueError("matryoshka_batchtopk needs matryoshka_widths (the nested prefix widths).")
        self.matryoshka_widths = [int(w) for w in self.matryoshka_widths]
        self._check_transcoder()

    @property
    def is_transcoder(self) -> bool:
        return self.hook_out is not None

    @property
    def is_clt(self) -> bool:
        return isinstance(self.hook, (list, tuple))

    @property
    def hooks(self) -> list[str]:
        """Every store hook this config reads (inputs, then outputs)."""
        return [h for side in (self.hook, self.hook_out) if side is not None
                for h in (side if isinstance(side, list) else [side])]

    def _check_transcoder(self) -> None:
        arch = self.architecture
        if isinstance(self.hook, tuple):
            self.hook = list(self.hook)
        if isinstance(self.hook_out, tuple):
            self.hook_out = list(self.hook_out)
        if self.skip_connection and self.hook_out is None:
            raise ValueError("skip_connection=True is for transcoders: set hook_out (the activation to predict).")
        if self.is_clt or isinstance(self.hook_out, list):
            if not (isinstance(self.hook, list) and isinstance(self.hook_out, list) and self.hook
                    and len(self.hook) == len(self.hook_out)):
                raise ValueError("A cross-layer transcoder needs hook and hook_out as lists of equal length (one input "
                                 f"and one output hook per layer), got hook={self.hook!r}, hook_out={self.hook_out!r}.")
            if arch not in CLT_ARCHITECTURES:
                raise ValueError(f"Cross-layer transcoders train with architecture in {CLT_ARCHITECTURES}, got "
                                 f"{arch!r}.")
            if self.skip_connection:
                raise ValueError("Cross-layer transcoders have no skip connection (circuit-tracer's layout has none).")
            if self.autocast:
                raise ValueError("Cross-layer transcoders train without autocast (set autocast=False).")
            if arch == "jumprelu" and (self.jumprelu_sparsity_loss_mode != "step"
                                       or self.pre_act_loss_coefficient is not None):
                raise ValueError("JumpReLU cross-layer transcoders train with jumprelu_sparsity_loss_mode='step' and "
                                 "no pre_act_loss_coefficient.")
        if self.hook_out is None:
            return
        if arch not in TRANSCODER_ARCHITECTURES:
            raise ValueError(f"Transcoders train with architecture in {TRANSCODER_ARCHITECTURES}, got {arch!r}.")
        # SAELens' transcoder configs reject apply_b_dec_to_input (b_dec lives in the output space).
        self.apply_b_dec_to_input = False

    # ---- resolution against the store ---------------------------------------------------------------------------

    def resolve(self, d_in: int, batch_size_tokens: int) -> TrainConfig:
        """A copy with d_sae, lr, lr_end and matryoshka widths filled in, checked against d_in and the batch."""
        cfg = dataclasses.replace(self, matryoshka_widths=list(self.matryoshka_widths))
        if cfg.d_sae is None:
            cfg.d_sae = int(round((cfg.expansion_factor or 8.0) * d_in))
            cfg.expansion_factor = None
        if cfg.training_tokens < batch_size_tokens:
            raise ValueError(f"training_tokens={cfg.training_tokens} is smaller than one batch "
                             f"({batch_size_tokens} tokens): nothing would be trained.")
        if cfg.architecture in TOPK_FAMILY and cfg.k > cfg.d_sae:
            raise ValueError(f"k={cfg.k} is larger than d_sae={cfg.d_sae}.")
        if cfg.architecture == "jumprelu" and cfg.target_l0 is not None and cfg.target_l0 > cfg.d_sae:
            raise ValueError(f"target_l0={cfg.target_l0} is larger than d_sae={cfg.d_sae}.")
        if cfg.architecture == "matryoshka_batchtopk":
            widths = cfg.matryoshka_widths
            if widths[-1] != cfg.d_sae:
                widths.append(cfg.d_sae)  # SAELens appends the full width as the last level
            if any(w <= 0 for w in widths) or any(a >= b for a, b in zip(widths, widths[1:])):
                raise ValueError(f"matryoshka_widths must be positive and strictly increasing up to d_sae="
                                 f"{cfg.d_sae}, got {widths}.")
        if cfg.lr is None:
            cfg.lr = default_lr(cfg.architecture, cfg.d_sae, batch_size_tokens)
        if cfg.lr_end is None:
            cfg.lr_end = cfg.lr / 10
        steps = cfg.training_tokens // batch_size_tokens
        main = steps - cfg.lr_warm_up_steps - cfg.lr_decay_steps
        if main < 0 or (main == 0 and cfg.lr_scheduler != "constant"):
            raise ValueError(f"lr_warm_up_steps + lr_decay_steps = {cfg.lr_warm_up_steps + cfg.lr_decay_steps} "
                             f"leaves no room in {steps} training steps for the {cfg.lr_scheduler} schedule.")
        if cfg.lr_scheduler == "cosineannealingwarmrestarts" and main // cfg.n_restart_cycles < 1:
            raise ValueError(f"n_restart_cycles={cfg.n_restart_cycles} is more than the {main} main steps.")
        if cfg.lr_decay_steps > 0 and cfg.lr_end == 0 and cfg.lr_scheduler != "constant":
            raise ValueError("lr_decay_steps with lr_end=0 would decay from 0 to 0.")
        return cfg

    def default_name(self) -> str:
        if self.is_clt:
            hook = f"clt-{self.hook[0]}-{len(self.hook)}layers"
        else:
            hook = self.hook or "sae"
            if self.hook_out is not None:
                hook = f"{hook}-to-{self.hook_out}" + ("-skip" if self.skip_connection else "")
        hook = hook.replace("/", "_")
        name = f"{hook}-{self.architecture}-{self.d_sae}"
        if self.architecture in TOPK_FAMILY:
            k = self.k
            name += f"-k{int(k) if float(k).is_integer() else k}"
        return name

    # ---- serialisation ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown TrainConfig field(s) {unknown}.")
        return cls(**d)

    def training_details(self) -> dict[str, Any]:
        """Training-only fields, as SAELens writes them to metadata.training_architecture_details."""
        return {k: v for k, v in self.to_dict().items() if k not in _INFERENCE_FIELDS}

    def identity(self) -> dict[str, Any]:
        """The fields that must match for a run directory to be resumed with this config."""
        return {k: v for k, v in self.to_dict().items() if k not in _RESUME_FREE_FIELDS}


def default_lr(architecture: str, d_sae: int, batch_size_tokens: int) -> float:
    """The default learning rate (see the module docstring for the rule and its measured basis)."""
    if architecture in TOPK_FAMILY:
        return min(4e-3 * math.sqrt(4608 / d_sae) * math.sqrt(batch_size_tokens / 4096), 1e-2)
    return 3e-4
