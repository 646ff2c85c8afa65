"""Transcoders: read an activation at one hook (d_in) and predict another (d_out), optionally with a skip path."""

from __future__ import annotations

import torch
from torch import nn

from nnsae.architectures.base import SAE
from nnsae.architectures.jumprelu import JumpReLUSAE
from nnsae.architectures.topk import TopKSAE


class Transcoder(SAE):
    """ReLU transcoder. The input gets no b_dec subtraction and the output no denormalisation or reshape."""

    architecture = "transcoder"
    config_fields = ("d_out",)
    reshapes_input = False
    param_shapes = {"W_enc": "in,sae", "W_dec": "sae,out", "b_enc": "sae", "b_dec": "out"}

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.d_out is None:
            cfg.d_out = 768  # SAELens' default
        if cfg.apply_b_dec_to_input:
            raise ValueError("Transcoders do not support apply_b_dec_to_input=True (b_dec lives in the output "
                             "space); set it to False.")

    def initialize_weights(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.W_dec)
            nn.init.kaiming_uniform_(self.W_enc)

    def process_sae_in(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self._normalize_in(self._hook("hook_sae_input", x.to(self.dtype)))

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return self._hook("hook_sae_recons", self.decoder_matmul(feature_acts) + self.b_dec)


class SkipTranscoder(Transcoder):
    """Adds a linear skip path: reconstruct(x) = decode(encode(x)) + x W_skipᵀ."""

    architecture = "skip_transcoder"
    param_shapes = {**Transcoder.param_shapes, "W_skip": "out,in"}

    def initialize_weights(self) -> None:
        Transcoder.initialize_weights(self)  # W_skip stays zero, as in SAELens

    def encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_acts = self.encode(x)
        return feature_acts, self.decode(feature_acts) + x.to(self.dtype) @ self.W_skip.T


class JumpReLUTranscoder(Transcoder):
    architecture = "jumprelu_transcoder"
    param_shapes = {**Transcoder.param_shapes, "threshold": "sae"}

    activation = JumpReLUSAE.activation
    fold_encoder_scale = JumpReLUSAE.fold_encoder_scale


class JumpReLUSkipTranscoder(JumpReLUTranscoder):
    architecture = "jumprelu_skip_transcoder"
    param_shapes = {**JumpReLUTranscoder.param_shapes, "W_skip": "out,in"}
    encode_decode = SkipTranscoder.encode_decode


class TopKTranscoder(Transcoder):
    """TopK transcoder (nnsae's; SAELens has none): the k largest pre-activations per token, ReLU'd, as SAELens'
    TopK SAE selects them (`rescale_acts_by_decoder_norm` selects on z·‖W_dec_i‖), decoded into the output space.
    Trained TopK transcoders are saved with the norms folded (rescale false)."""

    architecture = "topk_transcoder"
    config_fields = ("d_out", "k", "rescale_acts_by_decoder_norm")
    absolute = False

    @classmethod
    def check_config(cls, cfg) -> None:
        Transcoder.check_config(cfg)
        TopKSAE.check_config(cfg)

    activation = TopKSAE.activation
    select = TopKSAE.select
    _scatter = TopKSAE._scatter
    decoder_matmul = TopKSAE.decoder_matmul
    fold_W_dec_norm = TopKSAE.fold_W_dec_norm


class TopKSkipTranscoder(TopKTranscoder):
    architecture = "topk_skip_transcoder"
    param_shapes = {**TopKTranscoder.param_shapes, "W_skip": "out,in"}
    encode_decode = SkipTranscoder.encode_decode
