"""Encoders, heads and the encoder-plus-heads model every stage trains (tasks live in `dlscale.train.tasks`);
the self-supervised building blocks (MAE masking and decoder, SimCLR / BYOL heads) for use outside the engine."""

from dlscale.models.contrastive import BYOLHead, ProjectionHead, byol_loss, nt_xent
from dlscale.models.backbone import (BACKBONES, Backbone, EncoderConfig, backbone_class, build_encoder, layer_groups,
                                     load_encoder_weights, register_backbone)
from dlscale.models.encoders import ENCODER_NAMES
from dlscale.models.heads import ClassifierHead, Decoder, RegressionHead, global_pool
from dlscale.models.mae import MAEConfig, MAEDecoder, MAEHead, masked_patch_loss, patchify, unpatchify
from dlscale.models.model import TaskModel

__all__ = [
    "BACKBONES", "ENCODER_NAMES", "Backbone", "register_backbone", "backbone_class", "EncoderConfig", "build_encoder",
    "layer_groups", "load_encoder_weights",
    "ClassifierHead", "Decoder", "RegressionHead", "global_pool",
    "MAEConfig", "MAEDecoder", "MAEHead", "masked_patch_loss", "patchify", "unpatchify",
    "BYOLHead", "ProjectionHead", "byol_loss", "nt_xent",
    "TaskModel",
]
