"""Training throughput per architecture, nnsae against SAELens' trainer on the same activations, lr and batch.

Both trainers step on the same pre-generated batches, alternating step by step, so load on the machine hits both
alike; tokens/s are medians of per-step times. Quality: TopK (fp32 and bf16 autocast) trained for one epoch by both,
explained variance on held-out activations (pooled, float64).

Activations: synthetic (a sparse dictionary model at d_in 576) by default, or `--activations file.safetensors`
(key "acts", [n, d_in]; the last `--batch` rows are held out), or `--harvest N` to harvest N tokens of SmolLM2-135M
`model.layers.6.output` with nnsae's ActivationStore (cached in that file).

Run: `python -m benchmarks.train [--epoch-batches 30] [--timed-steps 6] [--skip-saelens]`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.common import machine_line, markdown_table
from nnsae.train import TrainConfig
from nnsae.train.trainer import Trainer

D_IN, D_SAE, K, BATCH = 576, 4608, 32, 4096
HOOK = "model.layers.6.output"
ARCHS: dict[str, dict[str, Any]] = {
    "topk": {},
    "abstopk": {},
    "batchtopk": {"k": float(K)},
    "matryoshka_batchtopk": {"k": float(K), "matryoshka_widths": [512, 2048, D_SAE]},
    "jumprelu": {},
    "standard": {},
    "gated": {},
}
TOPK_LR, L1_LR = 4e-3, 3e-4


# ---- data ---------------------------------------------------------------------------------------------------------

def synthetic_activations(n_tokens: int, seed: int = 0, n_features: int = 4096, active: int = 16) -> torch.Tensor:
    """x = Σ of `active` Zipf-distributed unit atoms with log-normal magnitudes + bias + noise, norms ~ tens."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_features, D_IN, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    bias = torch.randn(D_IN, generator=g) * 0.5
    probs = 1 / torch.arange(1, n_features + 1, dtype=torch.float64) ** 0.8
    out = torch.empty(n_tokens, D_IN)
    for start in range(0, n_tokens, 8192):
        n = min(8192, n_tokens - start)
        idx = torch.multinomial(probs, n * active, replacement=True, generator=g).view(n, active)
        mags = torch.exp(torch.randn(n, active, generator=g) * 0.5) * 3.0
        x = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=mags, mode="sum")
        out[start:start + n] = x + bias + 0.05 * torch.randn(n, D_IN, generator=g)
    return out


def harvested_activations(n_tokens: int, path: Path) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    if path.exists():
        acts = load_file(path)["acts"]
        if acts.shape[0] >= n_tokens:
            return acts[:n_tokens]
    from nnsae.harvest import ActivationStore
    from nnsae.models import load_model

    model, tokenizer = load_model()
    store = ActivationStore(model, [HOOK], tokenizer=tokenizer, batch_size_tokens=BATCH)
    parts, have = [], 0
    for batch in store:
        parts.append(batch[HOOK].float())
        have += parts[-1].shape[0]
        if have >= n_tokens:
            break
    acts = torch.cat(parts)[:n_tokens].contiguous()
    save_file({"acts": acts}, path)
    return acts


class MemoryStore:
    """The ActivationStore interface over in-memory batches (in order; the data is already shuffled)."""

    def __init__(self, acts: torch.Tensor):
        self.acts, self.batch_size_tokens, self.hooks, self.pos = acts, BATCH, [HOOK], 0

    def d_in(self, hook: str) -> int:
        return self.acts.shape[1]

    def metadata(self, hook: str) -> dict[str, Any]:
        return {"model_name": "benchmark", "hook_name": hook, "context_size": 128, "dataset_path": "benchmark"}

    def __iter__(self):
        while (self.pos + 1) * BATCH <= self.acts.shape[0]:
            self.pos += 1
            yield {HOOK: self.acts[(self.pos - 1) * BATCH:self.pos * BATCH]}

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = state["pos"]


def learning_rate(arch: str, threshold: float | None) -> float:
    if threshold is not None:
        return 1e-7  # hold the trained-like sparsity fixed while timing (the lr does not change the work per step)
    return TOPK_LR if "topk" in arch else L1_LR


# ---- the two trainers, one step at a time -------------------------------------------------------------------------

def nnsae_stepper(arch: str, steps: int, autocast: bool, out: Path, sparse_kernels: bool = True,
                  threshold: float | None = None
                  ) -> tuple[Callable[[torch.Tensor], None], Callable[[], torch.nn.Module]]:
    extra = dict(ARCHS[arch])
    cfg = TrainConfig(architecture=arch, hook=HOOK, d_sae=D_SAE, k=extra.pop("k", K), lr=learning_rate(arch, threshold),
                      training_tokens=(steps + 10_000) * BATCH, autocast=autocast, sparse_kernels=sparse_kernels,
                      log_every=10_000, **extra)
    trainer = Trainer(None, cfg, MemoryStore(torch.zeros(BATCH, D_IN)), out, progress=False)
    trainer.build()
    if threshold is not None:  # a trained-like state: ~K active latents per token
        model = trainer.runs[0].model
        set_sparse_state(model.sae, arch, threshold)
        model.density.fill_(0.0)  # let the first step pick its path from the actual density

    def step(x: torch.Tensor) -> None:
        trainer.train_step({HOOK: x})

    def result() -> torch.nn.Module:
        return next(iter(trainer.finish().values()))

    return step, result


def saelens_stepper(arch: str, steps: int, autocast: bool, threshold: float | None = None
                    ) -> tuple[Callable[[torch.Tensor], None], Callable[[], torch.nn.Module]]:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    classes = {"topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
               "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
               "matryoshka_batchtopk": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig),
               "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig),
               "standard": (StandardTrainingSAE, StandardTrainingSAEConfig),
               "gated": (GatedTrainingSAE, GatedTrainingSAEConfig)}
    try:
        from sae_lens.saes.abstopk_sae import AbsTopKTrainingSAE, AbsTopKTrainingSAEConfig

        classes["abstopk"] = (AbsTopKTrainingSAE, AbsTopKTrainingSAEConfig)
    except ImportError:  # pragma: no cover
        pass
    sae_cls, cfg_cls = classes[arch]
    extra = dict(ARCHS[arch])
    if "topk" in arch:
        extra.setdefault("k", K)
    torch.manual_seed(42)
    sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **extra))
    if threshold is not None:
        set_sparse_state(sae, arch, threshold)
    lr = learning_rate(arch, threshold)
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=steps * BATCH, train_batch_size_samples=BATCH,
                                          lr=lr, lr_end=lr / 10, autocast=autocast,
                                          logger=LoggingConfig(log_to_wandb=False)), sae, iter(()))

    def step(x: torch.Tensor) -> None:  # the body of SAETrainer.fit()
        trainer.maybe_reset_sparsity()
        trainer.step(x)
        trainer.n_training_steps += 1

    return step, lambda: sae


@torch.no_grad()
def sparse_state_threshold(x: torch.Tensor) -> float:
    """The pre-activation value exceeded by about K latents per token at the initialisation (both libraries start
    from the same weights: SAELens' init under seed 42, which nnsae reproduces)."""
    from nnsae.train import make_training_sae

    cfg = TrainConfig(architecture="jumprelu", hook=HOOK, d_sae=D_SAE, lr=L1_LR, training_tokens=BATCH).resolve(
        D_IN, BATCH)
    sae = make_training_sae(cfg, D_IN).sae
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    return float(torch.quantile(z.flatten()[::97], 1 - K / D_SAE))


@torch.no_grad()
def set_sparse_state(sae: torch.nn.Module, arch: str, threshold: float) -> None:
    """Make ~K latents per token active, as after training (JumpReLU threshold, or a negative encoder bias)."""
    if arch == "jumprelu":
        sae.threshold.fill_(threshold)
    elif arch == "gated":
        sae.b_gate.fill_(-threshold)
        sae.b_mag.fill_(-threshold)
    else:
        sae.b_enc.fill_(-threshold)


@torch.no_grad()
def explained_variance(sae: torch.nn.Module, x: torch.Tensor) -> float:
    x_hat = torch.cat([sae(x[i:i + 1024]).float() for i in range(0, x.shape[0], 1024)]).double()
    x = x.double()
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def race(steppers: dict[str, Callable[[torch.Tensor], None]], batches: list[torch.Tensor], warmup: int = 1
         ) -> dict[str, float]:
    """Step every trainer on each batch in turn; median tokens/s per trainer (after `warmup` steps)."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for i, x in enumerate(batches):
        for name, step in steppers.items():
            start = time.perf_counter()
            step(x)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: BATCH / statistics.median(ts) for name, ts in times.items()}


# ---- the report ---------------------------------------------------------------------------------------------------

def run(acts: torch.Tensor, heldout: torch.Tensor, epoch_batches: int, timed_steps: int, with_saelens: bool,
        source: str) -> str:
    batches = [acts[i * BATCH:(i + 1) * BATCH] for i in range(acts.shape[0] // BATCH)]
    lines = [f"Training, d_in {D_IN}, d_sae {D_SAE}, k {K}, batch {BATCH}, {source}; lr {TOPK_LR:g} (TopK family), "
             f"{L1_LR:g} (L1/L0 family); CPU, {machine_line()}", ""]
    tmp = Path(tempfile.mkdtemp(prefix="nnsae-bench-"))

    # 1. quality + throughput: TopK one epoch, fp32 and bf16, both trainers in lock-step
    rows = []
    for autocast in (False, True):
        label = "bf16 autocast" if autocast else "fp32"
        steppers, results = {}, {}
        steppers["nnsae"], results["nnsae"] = nnsae_stepper("topk", epoch_batches, autocast,
                                                            tmp / f"topk-{autocast}")
        if with_saelens:
            steppers["SAELens"], results["SAELens"] = saelens_stepper("topk", epoch_batches, autocast)
        speed = race(steppers, batches[:epoch_batches])
        ev = {name: explained_variance(result(), heldout) for name, result in results.items()}
        row = [f"topk {label}", f"{speed['nnsae']:,.0f}", f"{ev['nnsae']:.4f}"]
        if with_saelens:
            row += [f"{speed['SAELens']:,.0f}", f"{ev['SAELens']:.4f}", f"**{speed['nnsae'] / speed['SAELens']:.2f}×**"]
        rows.append(row)
    header = ["one epoch", "nnsae tok/s", "nnsae held-out EV"]
    if with_saelens:
        header += ["SAELens tok/s", "SAELens held-out EV", "speed ratio"]
    lines += [f"TopK, one epoch of {epoch_batches * BATCH:,} tokens, explained variance on {heldout.shape[0]:,} "
              f"held-out tokens:", "", markdown_table(header, rows), ""]

    # 2. throughput per architecture (short runs; quality not comparable after so few steps)
    rows = []
    theta = sparse_state_threshold(batches[0])
    cases = [(arch, None) for arch in ARCHS] + [(arch, theta) for arch in ("jumprelu", "standard", "gated")]
    for arch, threshold in cases:
        for autocast in (False, True) if "topk" in arch else (False,):
            label = arch + (f" (trained-like, L0≈{K})" if threshold is not None else "") + (" bf16" if autocast else "")
            steppers = {"nnsae": nnsae_stepper(arch, timed_steps + 1, autocast, tmp / f"{label}",
                                               threshold=threshold)[0]}
            if arch in ("topk", "batchtopk") and not autocast:
                steppers["nnsae dense"] = nnsae_stepper(arch, timed_steps + 1, autocast, tmp / f"{arch}-dense",
                                                        sparse_kernels=False)[0]
            if with_saelens:
                steppers["SAELens"] = saelens_stepper(arch, timed_steps + 1, autocast, threshold=threshold)[0]
            speed = race(steppers, batches[:timed_steps + 1])
            row = [label, f"{speed['nnsae']:,.0f}",
                   f"{speed['nnsae dense']:,.0f}" if "nnsae dense" in speed else ""]
            if with_saelens:
                row += [f"{speed['SAELens']:,.0f}", f"**{speed['nnsae'] / speed['SAELens']:.2f}×**"]
            rows.append(row)
    header = ["architecture", "nnsae tok/s", "nnsae dense autograd tok/s"]
    if with_saelens:
        header += ["SAELens tok/s", "ratio"]
    lines += [f"Throughput per architecture (median of {timed_steps} steps after 1 warm-up, lock-step; 'trained-like': "
              f"~{K} active latents per token, weights held still with lr 1e-7):", "",
              markdown_table(header, rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epoch-batches", type=int, default=24, help="batches in the TopK quality epoch")
    parser.add_argument("--timed-steps", type=int, default=3, help="timed steps per architecture")
    parser.add_argument("--activations", type=Path, default=None, help="safetensors file with 'acts' [n, d_in]")
    parser.add_argument("--harvest", type=int, default=0, help="harvest this many SmolLM2 tokens into --activations")
    parser.add_argument("--skip-saelens", action="store_true")
    args = parser.parse_args()
    n = (args.epoch_batches + 1) * BATCH
    if args.harvest:
        path = args.activations or Path("smollm2-l6-acts.safetensors")
        acts, source = harvested_activations(max(args.harvest, n), path), f"SmolLM2-135M {HOOK} activations"
    elif args.activations:
        from safetensors.torch import load_file

        acts, source = load_file(args.activations)["acts"].float(), f"activations from {args.activations}"
    else:
        acts, source = synthetic_activations(n), "synthetic sparse-dictionary activations"
    if acts.shape[1] != D_IN or acts.shape[0] < 2 * BATCH:
        raise SystemExit(f"need at least {2 * BATCH} activations of width {D_IN}, got {tuple(acts.shape)}")
    heldout, acts = acts[-BATCH:], acts[:-BATCH]
    epoch = min(args.epoch_batches, acts.shape[0] // BATCH)
    with_saelens = not args.skip_saelens
    if with_saelens:
        try:
            import sae_lens  # noqa: F401
        except ImportError:
            with_saelens = False
    print(run(acts, heldout, epoch, min(args.timed_steps, epoch - 1), with_saelens, source))


if __name__ == "__main__":
    main()
