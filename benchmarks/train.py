"""Whole-run training throughput and quality per architecture, nnsae against SAELens' trainer, side by side.

For each architecture both trainers train from the same initial weights on the same batches with the same
hyper-parameters (lr, sparsity coefficients, batch, fp32 parameters and compute), stepping in lock-step (one nnsae
step, one SAELens step, per batch) so load on the machine hits both alike. Reported per trainer:
- whole-run tokens/s: the token budget over the summed step times (the dense early phase of the ReLU family
  included, so the ratio is what a user gets for the whole run, not only its sparse tail);
- the step against its floor: the one dense GEMM a TopK step needs (the encoder, same shape, same batches,
  stepped in the same lock-step), as `nnsae tok/s ÷ GEMM tok/s`;
- held-out quality at the end: pooled explained variance (float64) and mean L0 of the exported inference SAE on
  held-out activations. Both trainers' results go through the same path: SAELens' `save_inference_model` and
  nnsae's export are loaded as nnsae inference SAEs, so BatchTopK is evaluated with its learned threshold for both.

Activations: SmolLM2-135M `model.layers.6` output (the embedded Q4_1 checkpoint, dequantized), offline text, read
through nnsae's `ActivationStore(cache_dir=...)`: the first run harvests them into the cache (several minutes),
later runs read the cache. `--data synthetic` uses a sparse-dictionary model instead (no model needed).
The ReLU family (standard, jumprelu, gated) trains on the activations scaled to mean norm √d_in (SAELens'
`expected_average_only_in`, applied once to the data for both trainers), where their L1/L0 coefficients have
their usual meaning; the TopK family trains on the raw activations.

Run: `python -m benchmarks.train [--tokens 409600] [--archs topk batchtopk jumprelu standard] [--skip-saelens]
[--seed 0]`.
SAELens columns need `pip install -e .[bench]` (sae-lens==6.54.12); without it they are skipped with a note.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from benchmarks.common import machine_line, markdown_table
from nnsae.training import TrainConfig
from nnsae.training.base import DensityAdaptive
from nnsae.training.trainer import Trainer

D_IN, D_SAE, K, BATCH = 576, 4608, 32, 4096
HOOK = "model.layers.6"
DEFAULT_CACHE = Path("~/.cache/nnsae/bench-smollm2-layer6").expanduser()
TOPK_LR = 4e-3  # nnsae's default for this width and batch (nnsae.training.config.default_lr), given to both trainers
RELU_LR = 2e-3
# Per-architecture hyper-parameters, identical for both trainers. The ReLU family's were chosen on the scaled
# activations to become sparse within a few steps and end at an L0 in the tens to ~150: lr 2e-3; standard L1 10
# (with L1 5 the latents hovered at 10-18% density, L0 ~470); JumpReLU with the tanh sparsity loss, whose gradient
# reaches the encoder like L1 (with the step loss and L0 1, θ can only rise by ~lr per step while the encoder grows,
# and the latents stayed at ~65% density after 30 steps). SAELens' own defaults (lr 3e-4, L1 1, L0 1) leave the
# latents dense for far longer than a benchmark run.
ARCHS: dict[str, dict[str, Any]] = {
    "topk": {"k": K, "lr": TOPK_LR},
    "abstopk": {"k": K, "lr": TOPK_LR},
    "batchtopk": {"k": float(K), "lr": TOPK_LR},
    "matryoshka_batchtopk": {"k": float(K), "lr": TOPK_LR, "matryoshka_widths": [512, 2048, D_SAE]},
    "jumprelu": {"lr": RELU_LR, "l0_coefficient": 2.0, "jumprelu_sparsity_loss_mode": "tanh"},
    "standard": {"lr": RELU_LR, "l1_coefficient": 10.0},
    "gated": {"lr": RELU_LR, "l1_coefficient": 10.0},
}
DEFAULT_ARCHS = ["topk", "batchtopk", "jumprelu", "standard"]
RELU_FAMILY = ("standard", "jumprelu", "gated")


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


def real_activations(n_tokens: int, cache_dir: Path) -> torch.Tensor:
    """At least `n_tokens` SmolLM2 layer-6 activations in corpus order, from nnsae's activation cache in `cache_dir`.
    The first call harvests them with nnsae's ActivationStore(cache_dir=...) (a larger request harvests only the
    missing part); later calls read the cache's shards without loading the model."""
    from nnsae.harvest import ActivationCache
    from nnsae.io.files import read_json

    def cached_tokens() -> int:
        manifest = cache_dir / "manifest.json"
        return sum(s["tokens"] for s in read_json(manifest)["shards"].values()) if manifest.exists() else 0

    if cached_tokens() < n_tokens:
        from nnsae.harvest import ActivationStore
        from nnsae.models import load_model

        model, tokenizer = load_model()
        store = ActivationStore(model, [HOOK], "offline", tokenizer=tokenizer, batch_size_tokens=BATCH,
                                cache_dir=cache_dir)
        for _ in store:  # every harvest batch is written to the cache as the store reads it
            if cached_tokens() >= n_tokens:
                break
        else:
            raise SystemExit(f"The offline corpus gave only {cached_tokens()} of the {n_tokens} activations asked for.")
    cache = ActivationCache(cache_dir, read_json(cache_dir / "manifest.json")["settings"])
    parts, have, index = [], 0, 0
    while have < n_tokens:
        parts.append(cache.read(index, 0)[1][0].float())
        have, index = have + parts[-1].shape[0], index + 1
    return torch.cat(parts)


def training_batches(acts: torch.Tensor, n_steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """`n_steps` batches cycling over `acts`, reshuffled every epoch (a fixed seed: both trainers see the same)."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = acts.shape[0] // BATCH
    for i in range(n_steps):
        if i % per_epoch == 0:
            perm = torch.randperm(acts.shape[0], generator=g)
        j = i % per_epoch
        yield acts[perm[j * BATCH:(j + 1) * BATCH]]


class MemoryStore:
    """The ActivationStore interface over in-memory activations (already shuffled), for Trainer.build()."""

    def __init__(self, acts: torch.Tensor):
        self.acts, self.batch_size_tokens, self.hooks = acts, BATCH, [HOOK]

    def d_in(self, hook: str) -> int:
        return self.acts.shape[1]

    def metadata(self, hook: str) -> dict[str, Any]:
        return {"model_name": "benchmark", "hook_name": hook, "context_size": 128, "dataset_path": "benchmark"}

    def __iter__(self):
        for i in range(self.acts.shape[0] // BATCH):
            yield {HOOK: self.acts[i * BATCH:(i + 1) * BATCH]}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ---- the two trainers, one step at a time -------------------------------------------------------------------------

Stepper = tuple[Callable[[torch.Tensor], None], Callable[[Path], Path]]


def nnsae_stepper(arch: str, steps: int, autocast: bool, out: Path, stats: dict[str, int], seed: int = 42
                  ) -> Stepper:
    """(step(x), export(dir) → dir of the inference SAE). `stats["dense_steps"]` counts steps of the ReLU family
    that ran on the dense path (before the latents became sparse enough for the sparse kernels)."""
    extra = dict(ARCHS[arch])
    cfg = TrainConfig(architecture=arch, hook=HOOK, d_sae=D_SAE, training_tokens=steps * BATCH, autocast=autocast,
                      log_every=10 ** 9, seed=seed, **extra)
    trainer = Trainer(None, cfg, MemoryStore(torch.zeros(BATCH, D_IN)), out, progress=False)
    trainer.build()
    model = trainer.runs[0].model
    stats["dense_steps"] = 0

    def step(x: torch.Tensor) -> None:
        adaptive = isinstance(model, DensityAdaptive)
        if adaptive and not model.use_sparse(None):  # type: ignore[arg-type]
            stats["dense_steps"] += 1
        trainer.train_step({HOOK: x})
        if adaptive:
            stats["density"] = float(model.density)

    def export(folder: Path) -> Path:
        sae = next(iter(trainer.finish().values()))
        sae.save_model(folder)
        return folder

    return step, export


def saelens_stepper(arch: str, steps: int, autocast: bool, seed: int = 42) -> Stepper:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    classes: dict[str, tuple[Any, Any]] = {
        "topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
        "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
        "matryoshka_batchtopk": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig),
        "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig),
        "standard": (StandardTrainingSAE, StandardTrainingSAEConfig),
        "gated": (GatedTrainingSAE, GatedTrainingSAEConfig)}
    try:
        from sae_lens.saes.abstopk_sae import AbsTopKTrainingSAE, AbsTopKTrainingSAEConfig

        classes["abstopk"] = (AbsTopKTrainingSAE, AbsTopKTrainingSAEConfig)
    except ImportError:  # pragma: no cover - older SAELens
        pass
    sae_cls, cfg_cls = classes[arch]
    extra = dict(ARCHS[arch])
    lr = extra.pop("lr")
    torch.manual_seed(seed)  # nnsae's training init reproduces SAELens' under the same seed
    sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **extra))
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=steps * BATCH, train_batch_size_samples=BATCH,
                                          lr=lr, lr_end=lr / 10, autocast=autocast,
                                          logger=LoggingConfig(log_to_wandb=False)), sae, iter(()))

    def step(x: torch.Tensor) -> None:  # the body of SAETrainer.fit() without logging and checkpoints
        trainer.maybe_reset_sparsity()
        trainer.step(x)
        trainer.n_training_steps += 1

    def export(folder: Path) -> Path:
        sae.save_inference_model(folder)
        return folder

    return step, export


# ---- measurement --------------------------------------------------------------------------------------------------

@torch.no_grad()
def heldout_quality(folder: Path, x: torch.Tensor, batch_k: float | None = None) -> tuple[float, float, float]:
    """(explained variance, EV without the massive-norm tokens (norm > 4× the median), mean L0) of the inference
    SAE saved in `folder` on held-out activations `x` (pooled, float64). With `batch_k` (BatchTopK), the latents are
    chosen as in training instead of by the exported threshold: the top `batch_k · n` of ReLU(pre-activations) over
    each batch of n = 4096 held-out tokens (the threshold is an EMA that a short run has not yet converged)."""
    from nnsae.architectures import SAE

    sae = SAE.load_from_disk(folder)
    sse = torch.zeros(x.shape[0], dtype=torch.float64)
    l0 = 0.0
    for i in range(0, x.shape[0], BATCH):
        xb = x[i:i + BATCH]
        if batch_k is None:
            f = sae.encode(xb)
        else:  # pre-activations of the exported (norm-folded) weights, then the batch-level top k·n
            h = torch.relu((xb - sae.b_dec) @ sae.W_enc + sae.b_enc).flatten()
            values, idx = torch.topk(h, int(batch_k * xb.shape[0]), sorted=False)
            f = torch.zeros_like(h).index_put_((idx,), values).view(xb.shape[0], -1)
        l0 += float((f != 0).sum())
        sse[i:i + BATCH] = (sae.decode(f).double() - xb.double()).pow(2).sum(-1)
    norms = x.norm(dim=-1)
    typical = norms <= 4 * norms.median()

    def ev(mask: torch.Tensor) -> float:
        xm = x[mask].double()
        return float(1 - sse[mask].sum() / (xm - xm.mean(0)).pow(2).sum())

    return ev(torch.ones_like(typical)), ev(typical), l0 / x.shape[0]


def gemm_steppers(seed: int = 0) -> dict[str, Callable[[torch.Tensor], None]]:
    """The floor of a TopK step: the one dense GEMM it cannot avoid, the encoder's `x @ W_enc` (batch × d_in ×
    d_sae, float32), as a user writes it (a fresh output each call) and into one reused output buffer (no page
    faults for the output: the fastest this GEMM runs)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D_IN, D_SAE, generator=g)
    out = torch.empty(BATCH, D_SAE)
    return {"GEMM": lambda x: x @ W, "GEMM (reused output)": lambda x: torch.mm(x, W, out=out)}


def race(steppers: dict[str, Callable[[torch.Tensor], None]], batches: Iterator[torch.Tensor]
         ) -> tuple[dict[str, float], int]:
    """Step every trainer on each batch in turn: (whole-run tokens/s per trainer, all steps included; steps)."""
    spent = {name: 0.0 for name in steppers}
    n = 0
    for x in batches:
        n += 1
        for name, step in steppers.items():
            start = time.perf_counter()
            step(x)
            spent[name] += time.perf_counter() - start
    return {name: n * BATCH / seconds for name, seconds in spent.items()}, n


def scaled_for_relu(acts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Activations × s with s = √d_in / mean ‖x‖ (SAELens' expected_average_only_in, estimated on these data)."""
    s = math.sqrt(acts.shape[1]) / float(acts[:65536].norm(dim=-1).mean())
    return acts * s, s


# ---- the report ---------------------------------------------------------------------------------------------------

def run(acts: torch.Tensor, heldout: torch.Tensor, n_steps: int, archs: list[str], with_saelens: bool, source: str,
        autocast: bool, seed: int = 0) -> str:
    relu_acts, s = scaled_for_relu(acts) if any(a in RELU_FAMILY for a in archs) else (acts, 1.0)
    tmp = Path(tempfile.mkdtemp(prefix="nnsae-bench-"))
    rows = []
    for arch in archs:
        data, held = (relu_acts, heldout * s) if arch in RELU_FAMILY else (acts, heldout)
        stats: dict[str, float] = {}
        steppers, exports = {}, {}
        init_seed = 42 + seed  # the same SAE initialisation in both trainers
        steppers["nnsae"], exports["nnsae"] = nnsae_stepper(arch, n_steps, autocast, tmp / arch / "nnsae-run", stats,
                                                            init_seed)
        if with_saelens:
            steppers["SAELens"], exports["SAELens"] = saelens_stepper(arch, n_steps, autocast, init_seed)
        steppers.update(gemm_steppers(seed))
        speed, _ = race(steppers, training_batches(data, n_steps, seed))
        batch_k = float(ARCHS[arch]["k"]) if "batchtopk" in arch else None
        quality = {name: heldout_quality(export(tmp / arch / name), held, batch_k) for name, export in exports.items()}
        hp = ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in ARCHS[arch].items())
        dense = f"{stats['dense_steps']:.0f}" if arch in RELU_FAMILY else "–"
        row = [arch, hp, f"{speed['nnsae']:,.0f}", f"{speed['nnsae'] / speed['GEMM']:.2f} / "
               f"{speed['nnsae'] / speed['GEMM (reused output)']:.2f}",
               f"{quality['nnsae'][0]:.4f} / {quality['nnsae'][1]:.4f}", f"{quality['nnsae'][2]:.1f}", dense]
        if with_saelens:
            row += [f"{speed['SAELens']:,.0f}", f"{quality['SAELens'][0]:.4f} / {quality['SAELens'][1]:.4f}",
                    f"{quality['SAELens'][2]:.1f}", f"**{speed['nnsae'] / speed['SAELens']:.2f}×**"]
        rows.append(row)
        print(f"  {arch}: {row}", file=sys.stderr, flush=True)  # progress; the report goes to stdout
    header = ["architecture", "hyper-parameters (both)", "nnsae tok/s", "nnsae / bare GEMM (fresh / reused output)",
              "nnsae EV / EV typical", "nnsae L0", "nnsae dense steps"]
    if with_saelens:
        header += ["SAELens tok/s", "SAELens EV / EV typical", "SAELens L0", "speed ratio"]
    dtype = "bf16 autocast" if autocast else "fp32"
    epochs = n_steps * BATCH / acts.shape[0]
    lines = [f"Training, d_in {D_IN}, d_sae {D_SAE} (8×), batch {BATCH}, {n_steps * BATCH:,} tokens ({n_steps} steps) "
             f"per run, {epochs:.1f} epochs over {acts.shape[0]:,} {source}, {dtype}, Adam, constant lr, "
             f"seed {seed}; CPU, {machine_line()}", "",
             f"Whole-run tokens/s (summed step times, lock-step). Quality on {heldout.shape[0]:,} held-out tokens "
             f"(later text than the training tokens): explained variance (pooled) / the same without massive-norm "
             f"tokens (norm > 4× median), and mean L0 of the exported inference SAE (BatchTopK: its weights with the "
             f"batch-level top k·n selection of training, as its EMA threshold has not converged in a short run). "
             f"ReLU family on the activations × {s:.4f} (mean norm √d_in); 'dense steps': nnsae steps run on the "
             f"dense path (latents not yet sparse enough for the sparse kernels). 'bare GEMM': the encoder GEMM "
             f"alone (x @ W_enc, {BATCH} × {D_IN} × {D_SAE}, float32), timed in the same lock-step on the same "
             f"batches, with a fresh output each call as written in torch / into one reused output buffer.", "",
             markdown_table(header, rows)]
    if not with_saelens:
        lines += ["", "SAELens columns skipped (`--skip-saelens`, or sae-lens is not installed: "
                      "`pip install -e .[bench]`)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=409_600, help="training tokens per run (whole batches)")
    parser.add_argument("--distinct", type=float, default=131_072, help="distinct training activations (cycled, "
                                                                         "reshuffled every epoch)")
    parser.add_argument("--heldout", type=int, default=16_384, help="held-out tokens for EV and L0")
    parser.add_argument("--archs", nargs="*", choices=list(ARCHS), default=DEFAULT_ARCHS)
    parser.add_argument("--data", choices=("smollm2", "synthetic"), default="smollm2")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="activation cache (smollm2 data)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in both trainers (default fp32)")
    parser.add_argument("--skip-saelens", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="batch order N and SAE initialisation 42 + N (the same "
                                                            "in both trainers): repeat with other seeds for the spread")
    args = parser.parse_args()
    n_steps = max(1, int(args.tokens) // BATCH)
    n_train = max(BATCH, int(args.distinct) // BATCH * BATCH)
    n = n_train + args.heldout
    if args.data == "synthetic":
        acts, source = synthetic_activations(n), "synthetic sparse-dictionary activations"
    else:
        acts, source = real_activations(n, args.cache_dir), f"SmolLM2-135M `{HOOK}` output activations (offline text)"
    with_saelens = not args.skip_saelens
    if with_saelens:
        try:
            import sae_lens  # noqa: F401
        except ImportError:
            print("note: sae-lens is not installed (pip install -e .[bench]); SAELens columns are skipped.")
            with_saelens = False
    heldout = acts[n_train:n]  # the text after the training part
    print(run(acts[:n_train], heldout, n_steps, args.archs, with_saelens, source, args.bf16, args.seed))


if __name__ == "__main__":
    main()
