"""nnsae's trainers against SAELens' own: from the same initialisation and batches, in float64, the weights must
stay equal step after step (the sparse kernels change only the float summation order)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nnsae.training import TrainConfig
from nnsae.training.trainer import Trainer

sae_lens = pytest.importorskip("sae_lens")

D_IN, D_SAE, BATCH, STEPS, SEED = 24, 64, 32, 20, 7
HOOK = "blocks.0.hook_resid_post"
CASES: dict[str, dict[str, Any]] = {
    "topk": {"k": 4, "lr": 4e-3},
    "batchtopk": {"k": 4.0, "lr": 4e-3},
    "jumprelu": {"lr": 2e-3, "l0_coefficient": 2.0, "jumprelu_sparsity_loss_mode": "tanh"},
    "standard": {"lr": 2e-3, "l1_coefficient": 5.0},
}


class _Batches:
    """The part of the ActivationStore interface Trainer.build() reads."""

    batch_size_tokens, hooks = BATCH, [HOOK]

    def d_in(self, hook: str) -> int:
        return D_IN

    def metadata(self, hook: str) -> dict[str, Any]:
        return {"model_name": "test", "hook_name": hook, "context_size": 8, "dataset_path": "test"}

    def __iter__(self):
        return iter(())


def saelens_trainer(arch: str, hp: dict[str, Any]):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae_cls, cfg_cls = {"topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
                        "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
                        "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig),
                        "standard": (StandardTrainingSAE, StandardTrainingSAEConfig)}[arch]
    hp = dict(hp)
    lr = hp.pop("lr")
    torch.manual_seed(SEED)
    sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, dtype="float64", **hp))
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=STEPS * BATCH, train_batch_size_samples=BATCH, lr=lr,
                                          lr_end=lr / 10, logger=LoggingConfig(log_to_wandb=False)), sae, iter(()))
    return sae, trainer


@pytest.mark.parametrize("arch", list(CASES))
def test_training_steps_equal_saelens_in_float64(arch, tmp_path):
    hp = CASES[arch]
    cfg = TrainConfig(architecture=arch, hook=HOOK, d_sae=D_SAE, training_tokens=STEPS * BATCH, dtype="float64",
                      seed=SEED, log_every=10 ** 9, **hp)
    ours = Trainer(None, cfg, _Batches(), tmp_path / "run", progress=False)
    ours.build()
    sae = ours.runs[0].model.sae
    theirs, their_trainer = saelens_trainer(arch, hp)
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        x = torch.randn(BATCH, D_IN, generator=g, dtype=torch.float64) * (1 + 3 * torch.rand(BATCH, 1, generator=g))
        ours.train_step({HOOK: x})
        their_trainer.maybe_reset_sparsity()
        their_trainer.step(x)
        their_trainer.n_training_steps += 1
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(sae, name).detach(), getattr(theirs, name).detach(), rtol=1e-9,
                                       atol=1e-11, msg=f"{arch} {name} after step {step}")
    assert not torch.equal(sae.W_dec.detach(), saelens_trainer(arch, hp)[0].W_dec.detach())  # it did train
