"""Training SAEs with SAELens 6 semantics: `train(model, TrainConfig(...) | [configs], store, out)`.

One file per idea: `config` (TrainConfig and the default lr rule), `schedules` (lr and coefficient warm-up),
`base`/`standard`/`gated`/`jumprelu`/`topk`/`batchtopk` (training forward passes and export), `sparse` (the exact
sparse kernels), `checkpoint` (atomic checkpoints), `trainer` (the loop), `distributed` (torchrun data parallel).

The package object is callable (`nnsae.train(...)` is `nnsae.train.train(...)`), so it can be exported as
`nnsae.train` without a function of the same name shadowing the package.
"""

import sys
import types

from nnsae.train.architectures import TRAINING_CLASSES, make_training_sae
from nnsae.train.base import StepContext, StepOutput, TrainingSAE
from nnsae.train.config import ARCHITECTURES, TrainConfig, default_lr
from nnsae.train.trainer import Trainer, TrainingDiverged, TrainingInterrupted, train

__all__ = ["ARCHITECTURES", "StepContext", "StepOutput", "TRAINING_CLASSES", "TrainConfig", "Trainer",
           "TrainingDiverged", "TrainingInterrupted", "TrainingSAE", "default_lr", "make_training_sae", "train"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
