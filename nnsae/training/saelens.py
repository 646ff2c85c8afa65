"""SAELens' training configuration in, nnsae's training out: `from_saelens_config`.

A `LanguageModelSAERunnerConfig` (the object, or its ``to_dict()``/``runner_cfg.json`` form) holds in one place what
nnsae splits between `TrainConfig` (the SAE and its optimisation) and `ActivationStore` (model, hook, data). This is
the one documented way to bring a SAELens config over: every name maps to its nnsae field, and a setting nnsae does
not support with a non-default value is refused, by name, rather than dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from nnsae.training.config import TrainConfig

__all__ = ["SAELensRun", "from_saelens_config"]

# SAELens runner name -> TrainConfig field (same meaning; renamed where nnsae's name differs)
_TRAIN_FIELDS = {
    "training_tokens": "training_tokens", "lr": "lr", "adam_beta1": "adam_beta1", "adam_beta2": "adam_beta2",
    "lr_scheduler_name": "lr_scheduler", "lr_warm_up_steps": "lr_warm_up_steps", "lr_decay_steps": "lr_decay_steps",
    "lr_end": "lr_end", "n_restart_cycles": "n_restart_cycles", "dead_feature_window": "dead_feature_window",
    "feature_sampling_window": "feature_sampling_window", "n_batches_for_norm_estimate": "n_batches_for_norm_estimate",
    "seed": "seed", "autocast": "autocast", "n_checkpoints": "n_checkpoints", "n_eval_batches": "n_eval_batches",
    "eval_batch_size_prompts": "eval_batch_size_prompts", "device": "device",
}
# fields of SAELens' training-SAE config (`cfg.sae`) that TrainConfig has under the same name
_SAE_FIELDS = ("d_sae", "k", "l1_coefficient", "lp_norm", "l1_warm_up_steps", "l0_coefficient", "l0_warm_up_steps",
               "jumprelu_init_threshold", "jumprelu_bandwidth", "jumprelu_sparsity_loss_mode", "jumprelu_tanh_scale",
               "jumprelu_ste_to_input", "target_l0", "pre_act_loss_coefficient", "aux_loss_coefficient",
               "rescale_acts_by_decoder_norm", "topk_threshold_lr", "matryoshka_widths", "use_matryoshka_aux_loss",
               "decoder_init_norm", "apply_b_dec_to_input", "normalize_activations")
# SAELens runner name -> ActivationStore argument
_STORE_FIELDS = {"context_size": "context_size", "train_batch_size_tokens": "batch_size_tokens",
                 "store_batch_size_prompts": "store_batch_size_prompts", "n_batches_in_buffer": "n_batches_in_buffer",
                 "prepend_bos": "prepend_bos", "exclude_special_tokens": "exclude_special_tokens", "seed": "seed"}
# settings without an nnsae equivalent: accepted only at these (SAELens') defaults
_UNSUPPORTED = {"hook_head_index": None, "seqpos_slice": [None], "use_cached_activations": False,
                "disable_concat_sequences": False, "activations_mixing_fraction": 0.5, "use_chat_formatting": False,
                "sequence_separator_token": "bos", "from_pretrained_path": None, "resume_from_checkpoint": None}


@dataclass
class SAELensRun:
    """A SAELens runner config in nnsae's terms: what to load, the store's arguments and the `TrainConfig`."""

    model_name: str
    hook: str
    dataset: str
    store_kwargs: dict[str, Any]
    train_config: TrainConfig
    output_path: str | None

    def store(self, model: Any, tokenizer: Any = None, **overrides: Any) -> Any:
        """The `ActivationStore` this config describes, on ``model`` (loaded by you, e.g. `nnsae.load_model`)."""
        from nnsae.harvest import ActivationStore

        return ActivationStore(model, [self.hook], self.dataset, tokenizer=tokenizer,
                               model_name=self.model_name, **{**self.store_kwargs, **overrides})

    def train(self, model: Any, out: str | Path | None = None, tokenizer: Any = None, **train_kwargs: Any) -> Any:
        """Train as SAELens' runner would: the store above, then `nnsae.train` into ``out`` (default: the
        config's ``output_path``)."""
        from nnsae.training.trainer import train

        target = out if out is not None else self.output_path
        if target is None:
            raise ValueError("No output directory: pass out=, or set output_path in the SAELens config.")
        return train(model, self.train_config, self.store(model, tokenizer), target, **train_kwargs)


def _as_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    raise TypeError(f"Expected a LanguageModelSAERunnerConfig or its dict, got {type(cfg).__name__}.")


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def from_saelens_config(cfg: Any) -> SAELensRun:
    """Map SAELens' ``LanguageModelSAERunnerConfig`` (object, ``to_dict()`` or ``runner_cfg.json`` contents) onto
    nnsae. Logging maps too: ``logger.wandb_log_frequency`` → ``log_every``, evaluations every
    ``wandb_log_frequency · eval_every_n_wandb_logs`` steps → ``eval_every``, ``logger.wandb_project`` (when
    ``log_to_wandb``) → ``wandb_project``."""
    runner = _as_dict(cfg)
    sae = _as_dict(runner.get("sae") or {})
    architecture = sae.get("architecture")
    if architecture is None and hasattr(getattr(cfg, "sae", None), "architecture"):
        architecture = cfg.sae.architecture()
    if architecture is None:
        raise ValueError("The SAELens config names no SAE architecture (sae.architecture).")
    refused = [f"{key}={runner[key]!r}" for key, default in _UNSUPPORTED.items()
               if key in runner and _normal(runner[key]) != default]
    if not isinstance(runner.get("exclude_special_tokens", False), bool):
        refused.append(f"exclude_special_tokens={runner['exclude_special_tokens']!r} (a list of ids)")
    if sae.get("reshape_activations", "none") != "none":
        refused.append(f"sae.reshape_activations={sae['reshape_activations']!r}")
    if refused:
        raise ValueError(f"SAELens settings nnsae does not train with: {', '.join(refused)}. Leave them at SAELens' "
                         "defaults (or pre-tokenize the data yourself).")
    train = {field: runner[key] for key, field in _TRAIN_FIELDS.items() if key in runner}
    train.update({key: sae[key] for key in _SAE_FIELDS if key in sae})
    logger = _as_dict(runner.get("logger") or {})
    if "wandb_log_frequency" in logger:
        train["log_every"] = logger["wandb_log_frequency"]
        train["eval_every"] = logger["wandb_log_frequency"] * logger.get("eval_every_n_wandb_logs", 100)
    train["wandb_project"] = logger.get("wandb_project") if logger.get("log_to_wandb", False) else None
    hook = runner.get("hook_name")
    if not hook:
        raise ValueError("The SAELens config has no hook_name.")
    train_config = TrainConfig(architecture=architecture, hook=hook, **train)
    store_kwargs = {arg: runner[key] for key, arg in _STORE_FIELDS.items() if key in runner}
    return SAELensRun(model_name=runner.get("model_name", ""), hook=hook, dataset=runner.get("dataset_path") or "",
                      store_kwargs=store_kwargs, train_config=train_config, output_path=runner.get("output_path"))
