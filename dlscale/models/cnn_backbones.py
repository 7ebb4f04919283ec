"""The convolutional backbones built from torchvision parts: ResNet18 and the small CNN for CPU tests and demos."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dlscale.models.backbone import Backbone, EncoderConfig, register_backbone


@dataclass
class ResNet18Config(EncoderConfig):
    """Options of `resnet18`."""
    small_input_stem: bool = False
    """3x3 stride-1 stem without max-pool, which keeps detail on 64x64 inputs at ~16x the FLOPs."""


@register_backbone
class ResNetEncoder(Backbone, nn.Module):
    """torchvision ResNet18 without its pooling and classifier, stem adapted to the image channels and size.

    Parameter names match torchvision's (`conv1`, `bn1`, `layer1`, ...), so converted torchvision state dicts load.
    """
    name, family, Config = "resnet18", "ResNet", ResNet18Config

    @classmethod
    def from_config(cls, cfg: ResNet18Config, image_shape=None) -> "ResNetEncoder":
        return cls(cfg.in_channels, cfg.small_input_stem)

    @classmethod
    def arch_label(cls, cfg: ResNet18Config) -> str:
        return f"{cfg.name}-s" if cfg.small_input_stem else cfg.name

    @classmethod
    def describe(cls, cfg: ResNet18Config) -> str:
        return "ResNet18" + (" 3x3 stem" if cfg.small_input_stem else "")

    def layer_paths(self) -> list[list[str]]:
        return [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]

    def __init__(self, in_channels: int = 1, small_input_stem: bool = False) -> None:
        super().__init__()
        # imported here: torchvision's package import loads torch._dynamo (seconds of CPU in every process that
        # imports the models, most of which never build a ResNet)
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        if small_input_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # Same initialisation torchvision gives the stem it replaced.
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels: int = 512
        self.downsample: int = 8 if small_input_stem else 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU: the block of the small encoder and of the decoder."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


@dataclass
class SmallConfig(EncoderConfig):
    """Options of `small`."""
    width: int = 32
    """Channels of the first block; each following block doubles them."""


@register_backbone
class SmallEncoder(Backbone, nn.Sequential):
    """Three stride-2 conv blocks (width, 2*width, 4*width channels): cheap enough for CPU tests and demos. Its
    layers are the blocks (the default `layer_paths`)."""
    name, family, Config = "small", "small CNN", SmallConfig

    @classmethod
    def from_config(cls, cfg: SmallConfig, image_shape=None) -> "SmallEncoder":
        return cls(cfg.in_channels, cfg.width)

    @classmethod
    def arch_label(cls, cfg: SmallConfig) -> str:
        return f"{cfg.name}-w{cfg.width}"

    @classmethod
    def describe(cls, cfg: SmallConfig) -> str:
        return f"small CNN width {cfg.width}"

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        channels = [in_channels, width, 2 * width, 4 * width]
        super().__init__(*(conv_bn_relu(c_in, c_out, stride=2) for c_in, c_out in zip(channels, channels[1:])))
        self.out_channels: int = channels[-1]
        self.downsample: int = 2 ** (len(channels) - 1)

