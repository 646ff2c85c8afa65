"""The table of training architectures: name → TrainingSAE class."""

from __future__ import annotations

from nnsae.train.base import TrainingSAE
from nnsae.train.batchtopk import BatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAE
from nnsae.train.config import ARCHITECTURES, TrainConfig
from nnsae.train.gated import GatedTrainingSAE
from nnsae.train.jumprelu import JumpReLUTrainingSAE
from nnsae.train.standard import StandardTrainingSAE
from nnsae.train.topk import AbsTopKTrainingSAE, TopKTrainingSAE

TRAINING_CLASSES: dict[str, type[TrainingSAE]] = {
    cls.architecture: cls
    for cls in (StandardTrainingSAE, GatedTrainingSAE, JumpReLUTrainingSAE, TopKTrainingSAE, AbsTopKTrainingSAE,
                BatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAE)
}
assert set(TRAINING_CLASSES) == set(ARCHITECTURES)


def make_training_sae(cfg: TrainConfig, d_in: int) -> TrainingSAE:
    """A freshly initialised training SAE for a resolved config."""
    return TRAINING_CLASSES[cfg.architecture](cfg, d_in)
