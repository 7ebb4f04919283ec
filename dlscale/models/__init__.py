"""Encoders, heads and the encoder-plus-heads model every stage trains (tasks live in `dlscale.train.tasks`)."""

from dlscale.models.encoders import ENCODER_NAMES, EncoderConfig, build_encoder, load_encoder_weights
from dlscale.models.heads import ClassifierHead, Decoder, RegressionHead, global_pool
from dlscale.models.model import TaskModel

__all__ = [
    "ENCODER_NAMES", "EncoderConfig", "build_encoder", "load_encoder_weights",
    "ClassifierHead", "Decoder", "RegressionHead", "global_pool",
    "TaskModel",
]
