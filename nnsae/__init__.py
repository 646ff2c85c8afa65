"""nnsae: sparse autoencoders on any Hugging Face model, built on nnsight, compatible with SAELens."""

from nnsae import circuits, models, neuronpedia
from nnsae.architectures import ARCHITECTURES, SAE, register_architecture
from nnsae.attachment import (SAEHandle, SAEOrderError, attach, attached, detach, feature_attribution,
                              run_with_cache, run_with_cache_with_saes, run_with_hooks_with_saes, run_with_saes, saes,
                              splice, steer, test_prompt)
from nnsae.config import SAEConfig, SAEMetadata
from nnsae.dashboards import dashboard
from nnsae.data import offline_corpus, tokenize_and_concatenate
from nnsae.evals import evaluate
from nnsae.extract import extract, load_feature_stats, load_features
from nnsae.harvest import ActivationStore, Harvester
from nnsae.hooks import HookPoint, HookSpec, resolve_hook
from nnsae.io.registry import list_pretrained
from nnsae.models import load_model, load_smollm2
from nnsae.training import TRAINABLE_ARCHITECTURES, TrainConfig, from_saelens_config, train
from nnsae.upload import upload_saes_to_huggingface
from nnsae.version import __version__

__all__ = ["ARCHITECTURES", "circuits", "ActivationStore", "Harvester", "HookPoint", "HookSpec", "SAE", "SAEConfig", "SAEHandle",
           "SAEMetadata", "SAEOrderError", "TrainConfig", "attach", "attached", "detach", "evaluate",
           "feature_attribution", "list_pretrained", "load_model", "load_smollm2", "models", "offline_corpus",
           "register_architecture", "resolve_hook", "run_with_cache", "run_with_cache_with_saes",
           "run_with_hooks_with_saes", "run_with_saes", "saes", "splice", "steer", "test_prompt", "train", "dashboard",
           "neuronpedia", "upload_saes_to_huggingface", "extract", "load_features", "load_feature_stats",
           "TRAINABLE_ARCHITECTURES", "tokenize_and_concatenate", "from_saelens_config"]
