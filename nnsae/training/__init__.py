"""Training SAEs with SAELens 6 semantics: `train(model, TrainConfig(...) | [configs], store, out)`.

One file per idea: `config` (TrainConfig and the default lr rule), `schedules` (lr and coefficient warm-up),
`base`/`standard`/`gated`/`jumprelu`/`topk`/`batchtopk` (training forward passes and export; with
`TrainConfig.hook_out` the same classes train per-layer transcoders), `clt` (cross-layer transcoders), `sparse` (the
exact sparse kernels), `checkpoint` (atomic checkpoints), `trainer` (the loop), `distributed` (torchrun data parallel).

`nnsae.train` is the plain function `train` (picklable, so remote bodies and worker processes can reference it);
under torchrun, `python -m nnsae.training`.
"""

from nnsae.training.architectures import TRAINING_CLASSES, make_training_sae
from nnsae.training.base import StepContext, StepOutput, TrainingSAE
from nnsae.training.clt import CrossLayerTrainingSAE
from nnsae.training.config import TRAINABLE_ARCHITECTURES, TrainConfig, default_lr
from nnsae.training.saelens import SAELensRun, from_saelens_config
from nnsae.training.trainer import Trainer, TrainingDiverged, TrainingInterrupted, train

__all__ = ["CrossLayerTrainingSAE", "SAELensRun", "from_saelens_config", "StepContext", "StepOutput", "TRAINABLE_ARCHITECTURES", "TRAINING_CLASSES", "TrainConfig", "Trainer",
           "TrainingDiverged", "TrainingInterrupted", "TrainingSAE", "default_lr", "make_training_sae", "train"]

