"""Encoders, heads and the multitask wrapper shared by the autoencoder, supervised and multitask stages."""

from dlscale.models.encoders import ENCODER_NAMES, EncoderConfig, build_encoder, load_encoder_weights
from dlscale.models.heads import ClassifierHead, Decoder, RegressionHead, global_pool
from dlscale.models.multitask import STAGE_TASKS, TASKS, MultiTaskModel, build_model

__all__ = [
    "ENCODER_NAMES", "EncoderConfig", "build_encoder", "load_encoder_weights",
    "ClassifierHead", "Decoder", "RegressionHead", "global_pool",
    "STAGE_TASKS", "TASKS", "MultiTaskModel", "build_model",
]
