"""The backbones dlscale ships, in the order they register (the contract and the registry: `backbone`)."""

from __future__ import annotations

from dlscale.models.backbone import BACKBONES
from dlscale.models.cnn_backbones import ResNetEncoder, SmallEncoder
from dlscale.models.timm_backbones import ConvNeXtEncoder, ViTSmallEncoder, ViTTinyEncoder

ENCODER_NAMES: tuple[str, ...] = tuple(b.name for b in (ResNetEncoder, SmallEncoder, ViTTinyEncoder, ViTSmallEncoder,
                                                        ConvNeXtEncoder))
"""The backbones dlscale ships, in registration order; `BACKBONES` also holds those registered by users."""

assert tuple(BACKBONES)[:len(ENCODER_NAMES)] == ENCODER_NAMES, "the shipped backbones register first, in this order"
