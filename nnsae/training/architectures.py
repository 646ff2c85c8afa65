"""The table of training architectures: name → TrainingSAE class."""

from __future__ import annotations

from nnsae.training.base import TrainingSAE
from nnsae.training.clt import CrossLayerTrainingSAE
from nnsae.training.batchtopk import BatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAE
from nnsae.training.config import TRAINABLE_ARCHITECTURES, TrainConfig
from nnsae.training.gated import GatedTrainingSAE
from nnsae.training.jumprelu import JumpReLUTrainingSAE
from nnsae.training.standard import StandardTrainingSAE
from nnsae.training.topk import AbsTopKTrainingSAE, TopKTrainingSAE

TRAINING_CLASSES: dict[str, type[TrainingSAE]] = {
    cls.architecture: cls
    for cls in (StandardTrainingSAE, GatedTrainingSAE, JumpReLUTrainingSAE, TopKTrainingSAE, AbsTopKTrainingSAE,
                BatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAE)
}
assert set(TRAINING_CLASSES) == set(TRAINABLE_ARCHITECTURES)


def make_training_sae(cfg: TrainConfig, d_in: int, d_out: int | None = None) -> TrainingSAE | CrossLayerTrainingSAE:
    """A freshly initialised training SAE (a transcoder when `cfg.hook_out` is set, reading d_in and writing d_out; a
    cross-layer transcoder when the hooks are lists) for a resolved config."""
    if cfg.is_clt:
        return CrossLayerTrainingSAE(cfg, d_in, d_out)
    return TRAINING_CLASSES[cfg.architecture](cfg, d_in, d_out)
