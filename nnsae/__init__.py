"""nnsae: sparse autoencoders on any Hugging Face model, built on nnsight, compatible with SAELens."""

from nnsae import models
from nnsae.config import SAEConfig, SAEMetadata
from nnsae.saes import ARCHITECTURES, SAE, register_architecture

__version__ = "0.1.0"

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "SAEMetadata", "models", "register_architecture"]
