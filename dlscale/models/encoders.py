"""Image encoders shared by every training stage.

Each encoder maps (B, in_channels, H, W) to a feature map (B, out_channels, h, w) with h = ceil(H / downsample),
so the decoder can rebuild the input and the heads can pool it. Nothing is ever downloaded: lensing images are
not ImageNet photographs, and cluster nodes often have no internet; pretrained weights come from a local file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18

ENCODER_NAMES: tuple[str, ...] = ("resnet18", "small")


@dataclass
class EncoderConfig:
    """Which encoder to build and how to adapt it to lensing images."""

    name: str = "resnet18"
    """Encoder family: `resnet18` (torchvision, randomly initialised) or `small` (a few conv blocks, for CPU tests)."""
    in_channels: int = 1
    """Image channels: 1 for DeepLense Models I-III and the common test, 3 for some Model IV copies."""
    small_input_stem: bool = False
    """resnet18 only: 3x3 stride-1 stem without max-pool, which keeps detail on 64x64 inputs at ~16x the FLOPs."""
    width: int = 32
    """small only: channels of the first block; each following block doubles them."""
    weights_path: str | None = None
    """Local encoder state dict (or a full model state dict holding `encoder.*` keys) to start from."""


class ResNetEncoder(nn.Module):
    """torchvision ResNet18 without its pooling and classifier, stem adapted to the image channels and size.

    Parameter names match torchvision's (`conv1`, `bn1`, `layer1`, ...), so converted torchvision state dicts load.
    """

    def __init__(self, in_channels: int = 1, small_input_stem: bool = False) -> None:
        super().__init__()
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


class SmallEncoder(nn.Sequential):
    """Three stride-2 conv blocks (width, 2*width, 4*width channels): cheap enough for CPU tests and demos."""

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        channels = [in_channels, width, 2 * width, 4 * width]
        super().__init__(*(conv_bn_relu(c_in, c_out, stride=2) for c_in, c_out in zip(channels, channels[1:])))
        self.out_channels: int = channels[-1]
        self.downsample: int = 2 ** (len(channels) - 1)


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a local state dict into `encoder`; raise naming the file and every key that does not fit.

    Accepts an encoder's own state dict or a whole model's (keys `encoder.*`, e.g. an autoencoder checkpoint's
    module), so a multitask run can start from an autoencoder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    if any(key.startswith("encoder.") for key in state):
        state = {key[len("encoder."):]: value for key, value in state.items() if key.startswith("encoder.")}
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in set(state) & set(expected)
        if state[key].shape != expected[key].shape
    )
    problems = [
        f"{label}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong_shape))
        if keys
    ]
    if problems:
        raise ValueError(f"encoder weights {path} do not fit the {type(encoder).__name__}: " + "; ".join(problems))
    encoder.load_state_dict(state)


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """Build the encoder `cfg` names, loading `cfg.weights_path` if given."""
    if cfg.name == "resnet18":
        encoder: nn.Module = ResNetEncoder(cfg.in_channels, cfg.small_input_stem)
    elif cfg.name == "small":
        encoder = SmallEncoder(cfg.in_channels, cfg.width)
    else:
        raise ValueError(f"unknown encoder {cfg.name!r}: expected one of {', '.join(ENCODER_NAMES)}")
    if cfg.weights_path is not None:
        load_encoder_weights(encoder, cfg.weights_path)
    return encoder
