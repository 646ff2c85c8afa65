"""`train()`: several SAEs from one pass over an activation store, with SAELens 6 training semantics.

Each batch dict from the store feeds every SAE whose hooks it holds: an SAE reads `hook`; a transcoder reads `hook`
and predicts `hook_out` (the store harvests both from the same forward); a cross-layer transcoder reads and predicts
lists of them (`nnsae.training.clt`). Per SAE and step (as SAELens'
`SAETrainer`): reset the firing-rate window every `feature_sampling_window` steps; dead latents are those not
fired for more than `dead_feature_window` steps; forward (losses); backward; clip the gradient norm to 1.0; Adam
(no weight decay) at the scheduled lr; the sparsity coefficients follow their warm-up.

Outputs under `out`:
- `{out}/{name}/`: the inference SAE in SAELens layout (cfg.json with metadata from `store.metadata(hook)` plus
  training_tokens, l0, num_dead_features, training_architecture(_details); sae_weights.safetensors;
  sparsity.safetensors), `train_config.json` (the resolved TrainConfig) and `metrics.jsonl` (one line per logged
  step). Transcoders are SAELens transcoders (`transcoder`, `skip_transcoder`, `jumprelu_(skip_)transcoder`; TopK:
  nnsae's `topk_(skip_)transcoder`) with `hook_name_out`/`hf_hook_name_out` metadata; a cross-layer transcoder is
  a circuit-tracer `cross_layer_transcoder` directory (`nnsae.circuits.save_transcoders`) with its firing rates.
- `{out}/run.json`: the run's configs and the store's identity (fingerprints of model, tokenizer and data; a directory
  holding a different run is refused before any compute).
- `{out}/.lock`: held while a run is in progress; a second trainer on the same `out` is refused.
- `{out}/checkpoints/step-N/`: the latest checkpoint (every `checkpoint_every_tokens` tokens and on
  SIGINT/SIGTERM), removed once the run is complete.
- `{out}/{name}/checkpoints/{n_tokens}/`: with `n_checkpoints`, that many intermediate SAEs in SAELens layout at
  evenly spaced token counts (SAELens' thresholds), kept.

Every `eval_every` steps, the SAE being trained is spliced into the model on `n_eval_batches` held-out token batches
(`store.held_out_batches`) and SAELens' `model_performance_preservation/ce_loss_score` and
`model_behavior_preservation/kl_div_score` (with their CE/KL parts) go to `metrics.jsonl` (and wandb); a transcoder
replaces its output hook's activation; cross-layer transcoders are not evaluated during training.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from nnsae.circuits import load_transcoders, save_transcoders
from nnsae.config import SAEMetadata
from nnsae.evals import ce_kl_metrics
from nnsae.io.files import read_json, read_safetensors
from nnsae.rundir import (IdentityMismatch, atomic_write, check_identity, child_path, claim, locked, write_json,
                          write_safetensors, write_text)
from nnsae.architectures import SAE
from nnsae.training import checkpoint as ckpt
from nnsae.training.architectures import make_training_sae
from nnsae.training.base import StepContext, StepOutput, TrainingSAE
from nnsae.training.config import TrainConfig
from nnsae.training.distributed import Comm, current_comm
from nnsae.training.schedules import coefficient_at, lr_at

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
FORMAT_VERSION = 1


class TrainingDiverged(FloatingPointError):
    """A loss became NaN or infinite; the run stopped without writing anything further."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM: a checkpoint was written and the run stopped; `train(..., resume=True)` continues it."""


@dataclass
class _Run:
    """One SAE being trained: model, optimizer, counters and dead-latent statistics."""

    name: str
    cfg: TrainConfig
    model: TrainingSAE
    optimizer: torch.optim.Optimizer
    total_steps: int
    batch_tokens: int  # global tokens per step
    metadata: dict[str, Any]
    n_steps: int = 0
    n_tokens: int = 0
    scaling_factor: float | list[float] | None = None  # expected_average_only_in (a CLT: one per layer)
    output_scaling_factor: float | list[float] | None = None  # the same for a transcoder's target
    done: bool = False
    act_freq_scores: torch.Tensor = field(default=None)  # type: ignore[assignment]
    n_forward_passes_since_fired: torch.Tensor = field(default=None)  # type: ignore[assignment]
    n_frac_active_samples: int = 0
    last: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_latents = self.model.n_latents  # a CLT's latents: those of every layer, layer-major
        self.act_freq_scores = torch.zeros(n_latents, device=self.cfg.device)
        self.n_forward_passes_since_fired = torch.zeros(n_latents, device=self.cfg.device)

    @property
    def hook(self) -> str:
        return self.cfg.hook  # type: ignore[return-value]

    def dead_mask(self) -> torch.Tensor:
        return self.n_forward_passes_since_fired > self.cfg.dead_feature_window

    def feature_sparsity(self) -> torch.Tensor:
        return self.act_freq_scores / max(self.n_frac_active_samples, 1)

    def counters(self) -> dict[str, Any]:
        return {"n_steps": self.n_steps, "n_tokens": self.n_tokens, "scaling_factor": self.scaling_factor,
                "output_scaling_factor": self.output_scaling_factor,
                "done": self.done, "n_frac_active_samples": self.n_frac_active_samples}


class _ContiguousAdam(torch.optim.Adam):
    """Adam over contiguous views of the parameters: a latent-major (transposed) parameter, like the TopK family's
    W_enc, is handed to the fused kernel as its contiguous transpose (same storage, so the update lands in the
    parameter), since the kernel otherwise copies it, its gradient and both moments to contiguous memory and back
    every step (7 ms of a 160 ms TopK step at d_sae 4608). The moments are kept in the views' shape."""

    def __init__(self, params: list[torch.nn.Parameter], **kwargs: Any):
        self.pairs = [(p, p.detach().t() if _transposed(p) else p) for p in params]
        super().__init__([view for _, view in self.pairs], **kwargs)

    def step(self, closure: Any = None) -> Any:
        for p, view in self.pairs:
            if view is not p:
                # (a no-op copy for gradients in the parameter's layout, as autograd makes them; torch 2.13's fused
                # CPU kernel misreads a gradient whose strides differ from its parameter's)
                view.grad = None if p.grad is None else p.grad.t().contiguous()
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p, view in self.pairs:
            if view is not p:
                p.grad = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for _, view in self.pairs:  # moments saved in the parameter's own shape: as the view's
            for key, value in self.state.get(view, {}).items():
                if torch.is_tensor(value) and value.dim() == 2 and value.shape != view.shape \
                        and value.shape == view.t().shape:
                    self.state[view][key] = value.t().contiguous()


def _transposed(p: torch.Tensor) -> bool:
    return p.dim() == 2 and not p.is_contiguous() and p.t().is_contiguous()


def make_adam(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (no weight decay), the fused kernel where torch has one: same update, ~6× faster than the per-tensor
    loop on CPU at SAE sizes."""
    params = list(model.parameters())
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    try:
        return _ContiguousAdam(params, lr=cfg.lr, betas=betas, fused=True)
    except (RuntimeError, ValueError, TypeError):  # pragma: no cover - device/dtype without a fused kernel
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas)


# ---- the public entry point ---------------------------------------------------------------------------------------

def train(model: Any, cfgs: TrainConfig | list[TrainConfig], store: Any, out: str | Path, resume: bool = False,
          progress: bool = True, overwrite: bool = False) -> dict[str, SAE]:
    """Train one SAE per config from one iteration of `store`; returns `{name: inference SAE}`.

    `store` provides `hooks`, `iter(store)` (dicts `{hook: (batch_size_tokens, d_in)}`), `d_in(hook)`,
    `metadata(hook)`, `state_dict()`/`load_state_dict()`, `batch_size_tokens` and, for data-parallel runs,
    `shard(rank, world_size)`. `model` is only consulted for metadata the store does not give (model_name).
    `resume=True` continues from the last checkpoint in `out` (or returns the finished run's SAEs); the configs and
    the store's `identity()` (when it has one) must match the run's. `overwrite=True` replaces a different or
    finished run in `out` (deleting its run.json, checkpoints and SAE folders) and accepts a non-empty `out`.
    """
    trainer = Trainer(model, cfgs, store, out, progress=progress, overwrite=overwrite)
    return trainer.run(resume=resume)


class Trainer:
    def __init__(self, model: Any, cfgs: TrainConfig | list[TrainConfig], store: Any, out: str | Path,
                 progress: bool = True, comm: Comm | None = None, overwrite: bool = False):
        self.comm = comm if comm is not None else current_comm()
        self.is_main = self.comm is None or self.comm.is_main
        self.world_size = self.comm.world_size if self.comm is not None else 1
        if self.comm is not None:
            if not hasattr(store, "shard"):
                raise TypeError("Data-parallel training needs a store with shard(rank, world_size).")
            store = store.shard(self.comm.rank, self.comm.world_size) or store
        self.store, self.model_ref, self.out, self.progress = store, model, Path(out), progress
        self.overwrite = overwrite
        cfg_list = [cfgs] if isinstance(cfgs, TrainConfig) else list(cfgs)
        if not cfg_list:
            raise ValueError("train() needs at least one TrainConfig.")
        self.local_batch = self._batch_size()
        self.global_batch = self.local_batch * self.world_size
        self.cfgs = [self._resolve(cfg) for cfg in cfg_list]
        names = [cfg.name for cfg in self.cfgs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Several configs would write to the same folder {duplicates}: give them distinct "
                             f"`name`s.")
        self.runs: list[_Run] = []
        self.global_step = 0
        self._stop_signal: int | None = None
        self._last_checkpoint: Path | None = None
        self._exported: dict[str, SAE] = {}
        self._eval_batches: dict[str, list[torch.Tensor]] = {}

    # ---- setup --------------------------------------------------------------------------------------------------

    def _batch_size(self) -> int:
        size = getattr(self.store, "batch_size_tokens", None)
        if not isinstance(size, int) or size < 1:
            raise TypeError("The store must expose batch_size_tokens (tokens per yielded batch).")
        return size

    def _resolve(self, cfg: TrainConfig) -> TrainConfig:
        hooks = list(self.store.hooks)
        if cfg.hook is None:
            if len(hooks) != 1:
                raise ValueError(f"TrainConfig.hook is not set and the store has several hooks {hooks}: choose one.")
            cfg = TrainConfig.from_dict({**cfg.to_dict(), "hook": hooks[0]})
        missing = [h for h in cfg.hooks if h not in hooks]
        if missing:
            raise ValueError(f"TrainConfig hook(s) {missing}: not one of the store's hooks {hooks}; give the store "
                             "every input and output hook (ActivationStore(model, hooks=[...])).")
        resolved = cfg.resolve(self.store.d_in(cfg.hooks[0]), self.global_batch)
        if resolved.name is None:
            resolved.name = resolved.default_name()
        if child_path(self.out, resolved.name).name == CHECKPOINTS:
            raise ValueError(f"name={resolved.name!r} is the checkpoints folder: choose another name.")
        return resolved

    def _run_record(self) -> dict[str, Any]:
        identity = getattr(self.store, "identity", None)
        return {"format": FORMAT_VERSION, "global_batch_tokens": self.global_batch,
                "saes": {cfg.name: cfg.identity() for cfg in self.cfgs},
                **({"store": identity()} if callable(identity) else {})}

    def _check_out_dir(self, resume: bool) -> dict[str, Any] | None:
        """The run recorded in `out` to continue, or None to start one (after deleting the old run's files when
        overwriting)."""
        if not claim(self.out, RUN_FILE, "a training run", self.overwrite):
            return None
        existing = read_json(self.out / RUN_FILE)
        if not isinstance(existing, dict):
            raise ValueError(f"{self.out / RUN_FILE} is not a training-run record (a JSON object): it was modified "
                             "outside nnsae. Use another output directory, or overwrite=True to start again.")
        mine = self._run_record()
        try:
            check_identity(self.out, {k: existing.get(k) for k in mine}, mine, "a training run", "Use another output "
                           "directory (--out), overwrite=True to replace it, or the same configs, model and data to "
                           "resume.")
            if resume:
                return existing
            if not self.overwrite:
                state = "a finished" if existing.get("complete") else "an interrupted"
                raise ValueError(f"{self.out} already holds {state} run with these configs: pass resume=True to "
                                 f"{'load' if existing.get('complete') else 'continue'} it, overwrite=True to "
                                 "replace it, or use another directory.")
        except IdentityMismatch:
            if not self.overwrite:
                raise
        for name in existing.get("saes", {}):
            shutil.rmtree(child_path(self.out, name), ignore_errors=True)
        shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)
        (self.out / RUN_FILE).unlink()
        return None

    def _build_runs(self) -> None:
        for cfg in self.cfgs:
            first_in = cfg.hooks[0]
            first_out = cfg.hook_out[0] if cfg.is_clt else cfg.hook_out
            d_out = self.store.d_in(first_out) if cfg.is_transcoder else None
            model = make_training_sae(cfg, self.store.d_in(first_in), d_out)
            optimizer = make_adam(model, cfg)
            metadata = dict(self.store.metadata(first_in))
            metadata.setdefault("hook_name", first_in)
            if cfg.is_transcoder and not cfg.is_clt:  # SAELens' transcoder metadata: where the output goes
                out = self.store.metadata(cfg.hook_out)
                metadata["hook_name_out"] = out.get("hook_name") or cfg.hook_out
                metadata["hf_hook_name_out"] = out.get("hf_hook_name")
            if metadata.get("model_name") is None and self.model_ref is not None:
                config = getattr(self.model_ref, "config", None)
                metadata["model_name"] = getattr(config, "_name_or_path", None) or type(self.model_ref).__name__
            self.runs.append(_Run(cfg.name, cfg, model, optimizer, cfg.training_tokens // self.global_batch,
                                  self.global_batch, metadata))

    # ---- the loop -----------------------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict[str, SAE]:
        """Train (or resume, or load the finished run), holding `out`'s lock throughout (rank 0 holds it)."""
        with contextlib.ExitStack() as lock:
            outcome: tuple[bool, Any] | None = None
            if self.is_main:
                try:
                    claim(self.out, RUN_FILE, "a training run", self.overwrite)  # before the lock file is made
                    lock.enter_context(locked(self.out, "an nnsae training run"))
                    outcome = (True, self._check_out_dir(resume))
                except Exception as e:  # raised on every rank below, so none waits for the others
                    outcome = (False, e)
            if self.comm is not None:  # every rank follows rank 0's look at `out`, before rank 0 writes to it
                outcome = self.comm.scatter_objects([outcome] * self.world_size if self.is_main else None)
            ok, value = outcome
            if not ok:
                raise value
            return self._run(value, resume)

    def _run(self, existing: dict[str, Any] | None, resume: bool) -> dict[str, SAE]:
        if existing is not None and existing.get("complete"):
            return {cfg.name: _load_output(cfg, self.out / cfg.name) for cfg in self.cfgs}
        self._build_runs()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        loaded = self._load_checkpoint() if resume else False
        if self.is_main and existing is None:
            write_json(self.out / RUN_FILE, self._run_record())
        wandb_run = self._start_wandb()
        self._open_metrics(truncate=loaded)
        batches: Iterator[dict[str, torch.Tensor]] = iter(self.store)
        if not loaded:
            self._estimate_scaling_factors(batches)
        total = max(r.total_steps for r in self.runs) * self.global_batch
        bar = self._progress_bar(total)
        try:
            with self._signals():
                while not all(r.done for r in self.runs):
                    batch = next(batches, None)
                    if not self._agree(batch is not None, "min"):
                        self._finish_early()
                        break
                    self._train_step(batch, wandb_run)
                    self.global_step += 1
                    if bar is not None:
                        bar.update(self.global_batch)
                        bar.set_postfix_str(self._postfix())
                    if self._agree(self._stop_signal is not None, "max"):
                        path = self._save_checkpoint()
                        raise TrainingInterrupted(
                            f"Interrupted by a signal; checkpoint written to {path}. Call train(..., resume=True) "
                            f"with the same configs to continue.")
                    if self._checkpoint_due():
                        self._save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            self._close_metrics()
            if wandb_run is not None:
                wandb_run.finish()
        self._complete()
        return {r.name: self._exported[r.name] for r in self.runs}

    # ---- a step-by-step API for custom loops and benchmarks (no checkpoints, signals or progress bar) -----------

    def build(self) -> None:
        """Create the training SAEs and optimizers (and the output folders); `run()` calls it."""
        if not self.runs:
            self._build_runs()
            if self.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
            self._open_metrics(truncate=False)

    def train_step(self, batch: dict[str, torch.Tensor]) -> None:
        """Train every unfinished SAE whose hook `batch` holds on it; an SAE reaching its step count is exported."""
        self.build()
        self._train_step(batch, None)
        self.global_step += 1

    def finish(self) -> dict[str, SAE]:
        """Export the SAEs that have not finished yet and return all of them."""
        for run in self.runs:
            if not run.done:
                self._finalize(run)
        self._close_metrics()
        return {r.name: self._exported[r.name] for r in self.runs}

    def _train_step(self, batch: dict[str, torch.Tensor], wandb_run: Any) -> None:
        for run in self.runs:
            if run.done or any(h not in batch for h in run.cfg.hooks):
                continue
            self._step(run, *_inputs(run.cfg, batch))
            if run.n_steps % run.cfg.log_every == 0 or run.n_steps == run.total_steps:
                self._log(run, wandb_run)
            if run.cfg.eval_every and run.n_steps % run.cfg.eval_every == 0:
                self._evaluate(run, wandb_run)
            if run.cfg.n_checkpoints and self.is_main:
                self._save_intermediate(run)
            if run.n_steps == run.total_steps:
                self._finalize(run)

    def _step(self, run: _Run, x: torch.Tensor, target: torch.Tensor | None = None) -> None:
        cfg, model = run.cfg, run.model
        if run.n_steps > 0 and run.n_steps % cfg.feature_sampling_window == 0:
            run.act_freq_scores.zero_()
            run.n_frac_active_samples = 0
        model.train()
        model.before_step()
        x = x.to(cfg.device)
        if run.scaling_factor is not None:
            x = x * _factor(run.scaling_factor, x)
            if target is not None:
                target = target * _factor(run.output_scaling_factor, target)
        coefficients = {name: coefficient_at(getattr(cfg, value), getattr(cfg, warm), run.n_steps)
                        for name, (value, warm) in model.coefficients.items()}
        ctx = StepContext(coefficients=coefficients, dead_mask=run.dead_mask(), comm=self.comm,
                          target=None if target is None else target.to(cfg.device))
        out = model(x, ctx)
        loss_value = float(out.loss.detach())
        if self.comm is not None:
            loss_value = float(self.comm.all_reduce(torch.tensor([loss_value], dtype=torch.float64))[0])
        if not math.isfinite(loss_value):
            raise TrainingDiverged(self._divergence_message(run, out, loss_value))
        fired = out.fired if self.comm is None else self.comm.all_reduce(out.fired)
        density = getattr(model, "density", None)
        if self.comm is not None and isinstance(density, torch.Tensor):  # every rank takes the same path next step
            density.copy_(self.comm.all_reduce(density) / self.world_size)
        with torch.no_grad():
            run.n_forward_passes_since_fired += 1
            run.n_forward_passes_since_fired[fired > 0] = 0
            run.act_freq_scores += fired
            run.n_frac_active_samples += run.batch_tokens
        out.loss.backward()
        if self.comm is not None:
            self.comm.average_gradients(model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr = lr_at(cfg, run.n_steps, run.total_steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.n_steps += 1
        run.n_tokens += run.batch_tokens
        if run.n_steps % cfg.log_every == 0 or run.n_steps == run.total_steps:
            run.last = self._metrics(run, out, lr, coefficients)
        del out  # no malloc_trim here: handing the step's temporaries back costs ~10% of a TopK step in page faults

    def _divergence_message(self, run: _Run, out: StepOutput, loss: float) -> str:
        parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in out.losses.items())
        where = (f"the last good checkpoint is {self._last_checkpoint}; train(..., resume=True) continues from it"
                 if self._last_checkpoint is not None else "no checkpoint was written yet")
        return (f"Training of {run.name!r} diverged: the loss is {loss} at step {run.n_steps} "
                f"({run.n_tokens} tokens; {parts}). The run stopped without writing anything further; {where}. "
                f"Try a lower lr (it is {run.cfg.lr:g}) or check the activations for inf/NaN.")

    def _agree(self, flag: bool, op: str) -> bool:
        if self.comm is None:
            return flag
        return bool(self.comm.all_reduce(torch.tensor([int(flag)]), op=op)[0])

    def _finish_early(self) -> None:
        for run in self.runs:
            if not run.done and run.n_tokens == 0:  # finishing would save an untrained SAE as if it were trained
                raise ValueError(f"The data gave no activations: {run.name!r} trained on 0 of "
                                 f"{run.cfg.training_tokens} tokens. Use a dataset with at least one full context "
                                 "(context_size tokens) per batch, or a smaller context size.")
            if not run.done:
                warnings.warn(f"The store ran out of data: {run.name!r} trained on {run.n_tokens} of "
                              f"{run.cfg.training_tokens} tokens.", stacklevel=3)
                self._finalize(run)

    # ---- activation scaling -------------------------------------------------------------------------------------

    def _estimate_scaling_factors(self, batches: Iterator[dict[str, torch.Tensor]]) -> None:
        """expected_average_only_in: s = √d_in / mean ‖x‖ over the first n_batches_for_norm_estimate batches, which
        are consumed (not trained on), as in SAELens."""
        wanted = [r for r in self.runs if r.cfg.normalize_activations == "expected_average_only_in"]
        if not wanted:
            return
        n_max = max(r.cfg.n_batches_for_norm_estimate for r in wanted)
        # every hook a wanted run reads: a transcoder's output is scaled too, a CLT's per layer
        sums: dict[str, list[float]] = {h: [] for r in wanted for h in r.cfg.hooks}
        counts: dict[str, list[float]] = {h: [] for r in wanted for h in r.cfg.hooks}
        for i in range(n_max):
            batch = next(batches, None)
            if not self._agree(batch is not None, "min"):
                raise ValueError(f"The store ran out of data while estimating the activation norm ({i} of "
                                 f"{n_max} batches).")
            for hook in sums:
                norms = batch[hook].float().norm(dim=-1)
                part = torch.tensor([norms.double().sum().item(), norms.numel()], dtype=torch.float64)
                if self.comm is not None:
                    part = self.comm.all_reduce(part)
                sums[hook].append(float(part[0]) + (sums[hook][-1] if sums[hook] else 0.0))
                counts[hook].append(float(part[1]) + (counts[hook][-1] if counts[hook] else 0.0))
        for run in wanted:
            n, cfg = run.cfg.n_batches_for_norm_estimate, run.cfg

            def factor(hook: str) -> float:
                return math.sqrt(self.store.d_in(hook)) / (sums[hook][n - 1] / counts[hook][n - 1])

            if cfg.is_clt:
                run.scaling_factor = [factor(h) for h in cfg.hook]
                run.output_scaling_factor = [factor(h) for h in cfg.hook_out]
            else:
                run.scaling_factor = factor(cfg.hook)
                run.output_scaling_factor = factor(cfg.hook_out) if cfg.is_transcoder else None

    # ---- metrics and logging ------------------------------------------------------------------------------------

    @torch.no_grad()
    def _metrics(self, run: _Run, out: StepOutput, lr: float, coefficients: dict[str, float]) -> dict[str, float]:
        x = out.x.detach().double()
        x_hat = out.x_hat.detach().double()
        names = list(out.losses)
        values = [float(out.loss)] + [float(out.losses[n]) for n in names]
        stats = torch.tensor(values + [float(out.l0), (x - x_hat).pow(2).sum().item(), x.pow(2).sum().item(),
                                       float(x.shape[0])], dtype=torch.float64)
        sum_x = x.sum(0)
        if self.comm is not None:
            stats = self.comm.all_reduce(stats)
            sum_x = self.comm.all_reduce(sum_x)
            stats[:len(values) + 1] /= self.world_size
        n = float(stats[-1])
        sse, ssx = float(stats[-3]), float(stats[-2])
        total_variance = ssx - float(sum_x.pow(2).sum()) / n
        dead = int(run.dead_mask().sum())
        metrics: dict[str, float] = {"step": run.n_steps, "tokens": run.n_tokens,
                                     "losses/overall_loss": float(stats[0])}
        metrics.update({f"losses/{name}": float(stats[i + 1]) for i, name in enumerate(names)})
        metrics.update({
            "metrics/explained_variance": 1 - sse / total_variance if total_variance > 0 else float("nan"),
            "metrics/l0": float(stats[len(values)]),
            "sparsity/dead_features": dead,
            "sparsity/dead_fraction": dead / run.act_freq_scores.numel(),
            "sparsity/mean_passes_since_fired": float(run.n_forward_passes_since_fired.mean()),
            "details/current_learning_rate": lr,
        })
        metrics.update({f"details/{name}_coefficient": value for name, value in coefficients.items()})
        metrics.update({f"metrics/{name}": value for name, value in out.metrics.items()})
        return metrics

    def _log(self, run: _Run, wandb_run: Any) -> None:
        if not self.is_main or not run.last:
            return
        now = time.perf_counter()
        record = dict(run.last)
        previous = self._log_clock.get(run.name)
        if previous is not None and record["step"] > previous[1]:
            record["perf/tokens_per_second"] = (record["step"] - previous[1]) * run.batch_tokens / (now - previous[0])
        self._log_clock[run.name] = (now, record["step"])
        self._metric_files[run.name].write(json.dumps(record) + "\n")
        self._metric_files[run.name].flush()
        if wandb_run is not None:
            wandb_run.log({f"{run.name}/{k}": v for k, v in record.items() if k != "step"}, step=self.global_step)

    def _open_metrics(self, truncate: bool) -> None:
        self._close_metrics()
        self._metric_files: dict[str, Any] = {}
        self._log_clock: dict[str, tuple[float, int]] = {}
        if not self.is_main:
            return
        for run in self.runs:
            folder = self.out / run.name
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "metrics.jsonl"
            if truncate and path.exists():  # drop lines logged after the checkpoint we resumed from
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= run.n_steps]
                write_text(path, "".join(line + "\n" for line in kept))
            elif not truncate:
                write_text(path, "")
            self._metric_files[run.name] = open(path, "a")

    def _close_metrics(self) -> None:
        for f in getattr(self, "_metric_files", {}).values():
            f.close()
        self._metric_files = {}

    def _start_wandb(self) -> Any:
        projects = {r.cfg.wandb_project for r in self.runs if r.cfg.wandb_project}
        if not projects or not self.is_main:
            return None
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb_project is set but wandb is not installed: logging to metrics.jsonl only.",
                          stacklevel=3)
            return None
        return wandb.init(project=sorted(projects)[0], config={r.name: r.cfg.to_dict() for r in self.runs})

    def _progress_bar(self, total: int) -> Any:
        if not self.progress or not self.is_main:
            return None
        from tqdm.auto import tqdm

        done = max(r.n_tokens for r in self.runs)
        return tqdm(total=total, initial=done, unit="tok", unit_scale=True, desc="Training SAEs")

    def _postfix(self) -> str:
        parts = []
        for run in self.runs[:3]:
            if run.last:
                parts.append(f"{run.name[-24:]}: mse {run.last['losses/mse_loss']:.4g} "
                             f"l0 {run.last['metrics/l0']:.1f} ev {run.last['metrics/explained_variance']:.3f}")
        return " | ".join(parts)

    # ---- outputs ------------------------------------------------------------------------------------------------

    def _export(self, run: _Run) -> SAE:
        """The SAE as trained so far (folded, SAELens inference form) with its metadata and feature sparsity (a
        cross-layer transcoder: an `nnsae.circuits.CrossLayerTranscoder`)."""
        if run.cfg.is_clt:
            return run.model.export(run.scaling_factor, run.output_scaling_factor)
        sae = run.model.export(run.scaling_factor, run.output_scaling_factor)
        sparsity = run.feature_sparsity()
        meta = {**run.metadata, "training_tokens": run.n_tokens,
                "l0": float(sparsity.sum()) if run.n_frac_active_samples > 0 else None,
                "num_dead_features": int(run.dead_mask().sum()),
                "training_architecture": run.cfg.architecture,
                "training_architecture_details": run.cfg.training_details()}
        sae.cfg.metadata = SAEMetadata(**{k: v for k, v in meta.items() if v is not None})
        sae.log_feature_sparsity = torch.log10(sparsity + 1e-10).detach().cpu()
        return sae

    def _finalize(self, run: _Run) -> None:
        """Export the SAE; rank 0 writes it in SAELens layout."""
        sae = self._export(run)
        if self.is_main:
            folder = self.out / run.name
            self._save(run, sae, folder)
            write_json(folder / "train_config.json", run.cfg.to_dict())
        run.done = True
        self._exported[run.name] = sae

    def _save_intermediate(self, run: _Run) -> None:
        """SAELens' `n_checkpoints`: the SAE at the first step past each of `n_checkpoints` evenly spaced token
        counts, saved under `{name}/checkpoints/{n_tokens}/` (a resumed run skips the ones already passed)."""
        total = run.total_steps * run.batch_tokens
        every = math.ceil(total / (run.cfg.n_checkpoints + 1))
        passed = [t for t in range(every, total, every) if run.n_tokens - run.batch_tokens <= t < run.n_tokens]
        if passed and run.n_steps < run.total_steps:
            self._save(run, self._export(run), self.out / run.name / "checkpoints" / str(run.n_tokens))

    def _save(self, run: _Run, sae: Any, folder: Path) -> None:
        """SAELens layout; a cross-layer transcoder in circuit-tracer's `cross_layer_transcoder` layout, with its
        firing rates ([n_layers, d_sae], log10 as SAELens writes them) in sparsity.safetensors."""
        if not run.cfg.is_clt:
            sae.save_model(folder, log_sparsity=sae.log_feature_sparsity)
            return
        save_transcoders(sae, folder)
        sparsity = torch.log10(run.feature_sparsity() + 1e-10).view(run.model.n_layers, -1).detach().cpu()
        write_safetensors(folder / "sparsity.safetensors", {"sparsity": sparsity.contiguous()})

    def _evaluate(self, run: _Run, wandb_run: Any) -> None:
        """CE and KL scores of the SAE as trained so far, spliced into the model on held-out batches (rank 0)."""
        if not self.is_main:
            return
        if run.cfg.is_clt:
            if run.name not in self._eval_batches:
                warnings.warn(f"{run.name}: CE/KL evaluations during training are not run for cross-layer "
                              "transcoders (eval_every is ignored).", stacklevel=3)
                self._eval_batches[run.name] = []
            return
        if run.name not in self._eval_batches:
            self._eval_batches[run.name] = self.store.held_out_batches(run.cfg.n_eval_batches,
                                                                       run.cfg.eval_batch_size_prompts)
            if not self._eval_batches[run.name]:
                warnings.warn(f"{run.name}: no held-out data for the evaluations during training (the offline "
                              "corpus' test split is used when training on it); pass eval_dataset= to the "
                              "ActivationStore, or eval_every=0.", stacklevel=3)
        if not self._eval_batches[run.name]:
            return
        sae = self._export(run)
        metrics = ce_kl_metrics(self.store.harvester.model, sae, self._eval_batches[run.name],
                                exclude_special_tokens=getattr(self.store, "exclude_special_tokens", True),
                                tokenizer=getattr(self.store, "tokenizer", None))
        record = {"step": run.n_steps, **{f"{group}/{name}": value for group, values in metrics.items()
                                         for name, value in values.items()}}
        self._metric_files[run.name].write(json.dumps(record) + "\n")
        self._metric_files[run.name].flush()
        if wandb_run is not None:
            wandb_run.log({f"{run.name}/{k}": v for k, v in record.items() if k != "step"}, step=self.global_step)

    def _complete(self) -> None:
        if self.is_main:
            record = {**self._run_record(), "complete": True,
                      "trained_tokens": {r.name: r.n_tokens for r in self.runs}}
            write_json(self.out / RUN_FILE, record)
            shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)
        if self.comm is not None:
            self.comm.barrier()

    # ---- checkpoints --------------------------------------------------------------------------------------------

    def _checkpoint_due(self) -> bool:
        every = [r.cfg.checkpoint_every_tokens for r in self.runs if r.cfg.checkpoint_every_tokens and not r.done]
        if not every or all(r.done for r in self.runs):
            return False
        interval = min(every)
        tokens = self.global_step * self.global_batch
        return tokens // interval > (tokens - self.global_batch) // interval

    def _save_checkpoint(self) -> Path:
        store_state = self.store.state_dict()
        if self.comm is not None:
            store_states = self.comm.gather_objects(store_state)
        else:
            store_states = [store_state]
        root = self.out / CHECKPOINTS
        path = root / f"step-{self.global_step}"
        if self.is_main:
            tmp = ckpt.begin(root, self.global_step)
            tensors: dict[str, torch.Tensor] = {}
            record = {
                "format": FORMAT_VERSION, "global_step": self.global_step, "world_size": self.world_size,
                "rng": ckpt.rng_state(tensors),
                "store": [ckpt.split_state(s, f"store{i}", tensors) for i, s in enumerate(store_states)],
                "saes": {},
            }
            for run in self.runs:
                record["saes"][run.name] = run.counters()
                write_safetensors(tmp / f"{run.name}.weights.safetensors", run.model.state_dict())
                optimizer_state = run.optimizer.state_dict()
                atomic_write(tmp / f"{run.name}.optimizer.pt", lambda f: torch.save(optimizer_state, f))
                tensors[f"{run.name}.act_freq_scores"] = run.act_freq_scores.detach().cpu().clone()
                tensors[f"{run.name}.n_forward_passes_since_fired"] = \
                    run.n_forward_passes_since_fired.detach().cpu().clone()
            write_safetensors(tmp / "state.safetensors", tensors)
            write_json(tmp / "state.json", record, indent=1)
            path = ckpt.commit(root, tmp, self.global_step)
        if self.comm is not None:
            self.comm.barrier()
        self._last_checkpoint = path
        return path

    def _load_checkpoint(self) -> bool:
        path = ckpt.latest(self.out / CHECKPOINTS)
        if path is None:
            return False
        record = read_json(path / "state.json")
        if record.get("world_size", 1) != self.world_size:
            raise ValueError(f"The checkpoint {path} was written by a run with {record.get('world_size')} processes; "
                             f"resume it with the same number ({self.world_size} now).")
        tensors = read_safetensors(path / "state.safetensors")
        for run in self.runs:
            counters = record["saes"][run.name]
            weights = read_safetensors(path / f"{run.name}.weights.safetensors")
            run.model.load_state_dict(weights, strict=True)
            try:
                optimizer_state = torch.load(path / f"{run.name}.optimizer.pt", map_location=run.cfg.device,
                                             weights_only=True)
            except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
                raise ValueError(f"{path / f'{run.name}.optimizer.pt'} cannot be read ({type(e).__name__}): the "
                                 f"checkpoint is damaged. Delete {path} to resume from the one before, or start "
                                 "again with overwrite=True.") from None
            run.optimizer.load_state_dict(optimizer_state)
            run.n_steps, run.n_tokens = counters["n_steps"], counters["n_tokens"]
            run.scaling_factor, run.done = counters["scaling_factor"], counters["done"]
            run.output_scaling_factor = counters.get("output_scaling_factor")
            run.n_frac_active_samples = counters["n_frac_active_samples"]
            run.act_freq_scores.copy_(tensors[f"{run.name}.act_freq_scores"])
            run.n_forward_passes_since_fired.copy_(tensors[f"{run.name}.n_forward_passes_since_fired"])
            if run.done:
                self._exported[run.name] = _load_output(run.cfg, self.out / run.name)
        store_states = [ckpt.join_state(s, tensors) for s in record["store"]]
        rank = self.comm.rank if self.comm is not None else 0
        self.store.load_state_dict(store_states[rank])
        ckpt.set_rng_state(record["rng"], tensors)
        self.global_step = record["global_step"]
        self._last_checkpoint = path
        return True

    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _inputs(cfg: TrainConfig, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input, target) of one config from a store batch: an SAE reads its hook (target None: itself); a transcoder
    reads `hook` and predicts `hook_out`; a cross-layer transcoder gets every layer's input and output stacked
    token-major, [N, n_layers, d]."""
    if cfg.is_clt:
        return torch.stack([batch[h] for h in cfg.hook], 1), torch.stack([batch[h] for h in cfg.hook_out], 1)
    return batch[cfg.hook], batch[cfg.hook_out] if cfg.is_transcoder else None


def _factor(factor: float | list[float], x: torch.Tensor) -> float | torch.Tensor:
    """A scaling factor as a multiplier of `x`: a CLT's per-layer factors broadcast over [N, n_layers, d]."""
    if isinstance(factor, list):
        return torch.tensor(factor, dtype=x.dtype, device=x.device)[None, :, None]
    return factor


def _load_output(cfg: TrainConfig, folder: Path) -> Any:
    """A finished run's saved output: an SAE (SAELens layout) or a CrossLayerTranscoder (circuit-tracer layout)."""
    if cfg.is_clt:
        return load_transcoders(folder, device=cfg.device)
    return SAE.load_from_disk(folder, device=cfg.device)
