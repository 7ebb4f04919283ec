"""The `superres` task: super-resolution trained without labels (options: `model.task_options.superres`).

Each batch image becomes a pair: the high-resolution image scaled to [0, 1] (`dlscale.models.sr.unit_range`) and
its low-resolution version by the configured degradation (antialiased bicubic by default). `dlscale.models.sr.SRNet`
learns the residual on bicubic; `guided` feeds it the shared encoder's feature map of the bicubic upsample (mapped
back to the input's units, so the encoder sees what it would see in any other stage) and trains the encoder with
it. Evaluation collects per-image PSNR / SSIM of the network and of bicubic (`val/psnr`, `val/psnr_bicubic`, ...)
and an HR / LR / bicubic / SR / |SR - HR| grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dlscale.models.sr import (SR_LOSSES, DegradationConfig, SRConfig, SRNet, bicubic_up, check_side, degradation,
                               example_grid, sr_loss, sr_scores, unit_range)
from dlscale.train.tasks.base import Task, register_task
from dlscale.train.tasks.randomness import SeededDraws, seeded_generator, step_draw


@dataclass
class SuperresConfig:
    network: SRConfig = field(default_factory=SRConfig)
    """The SR network (scale, width, blocks, block type)."""
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    """How the low-resolution inputs are made from the data's images."""
    loss: str = "l1"
    """Pixel loss: l1 | charbonnier."""
    ssim_weight: float = 0.0
    """Weight of (1 - SSIM) added to the pixel loss (0: none)."""
    guided: bool = True
    """Inject the shared encoder's feature map (trained with the network; start it from a pretrained one with
    init_from). False: the network alone (the encoder then only serves the evaluation's probe)."""

    def __post_init__(self) -> None:
        if self.loss not in SR_LOSSES:
            raise ValueError(f"model.task_options.superres.loss={self.loss!r}: expected one of {', '.join(SR_LOSSES)}")
        if self.ssim_weight < 0:
            raise ValueError(f"model.task_options.superres.ssim_weight={self.ssim_weight}: expected >= 0")


class SRHead(SeededDraws, nn.Module):
    """The network plus the per-step generator of random degradations (noise), reproducible across resumes."""
    seed_salt = 3

    def __init__(self, net: SRNet) -> None:
        super().__init__()
        self.net = net


@register_task
class SuperResolution(Task):
    """Learn to invert the degradation of the data's own images: no labels needed."""
    name = "superres"
    Config = SuperresConfig
    uses_feature_map = False     # the encoder (if guided) sees the bicubic upsample, not the clean image
    output_images = "superres"

    @property
    def options(self) -> SuperresConfig:
        return self.ctx.options or SuperresConfig()

    def build_head(self) -> nn.Module:
        o, (channels, height, width) = self.options, self.ctx.image_shape
        check_side(height, width, o.network.scale, "model.task_options.superres.network.scale")
        self.degrade = degradation(o.degradation)
        return SRHead(SRNet(o.network, channels, self.ctx.encoder_channels if o.guided else 0))

    def forward(self, head, feature_map, images, batch, model):
        scale = self.options.network.scale
        high, low_value, span = unit_range(images)
        generator = None
        if self.degrade.random:
            generator = (head.next_generator(images.device, training=False) if batch is None else
                         seeded_generator(images.device, head.seed_salt, step_draw(head, batch, self.name)[0]))
        low = self.degrade(high, scale, generator)
        return {"sr": self.upscale(head, low, low_value, span, model, images.dtype), "sr_high": high, "sr_low": low}

    def upscale(self, head, low, low_value, span, model, dtype) -> torch.Tensor:
        """The network's output for `low` in [0, 1]; a guided network's encoder sees the bicubic upsample in the
        input's units (`low * span + low_value`)."""
        guide = None
        if self.options.guided:
            guide = model.encoder((bicubic_up(low, self.options.network.scale) * span + low_value).to(dtype))
        return head.net(low.to(dtype), guide)

    def input_shape(self, image_shape):
        channels, height, width = image_shape
        scale = self.options.network.scale
        return channels, height // scale, width // scale

    def make_images(self, head, images, model):
        """Super-resolved low-resolution inputs, in the [0, 1] units of each input's min-max (as scored)."""
        low, low_value, span = unit_range(images)
        return self.upscale(head, low, low_value, span, model, images.dtype)

    def loss(self, out, images, batch):
        o = self.options
        return sr_loss(out["sr"], out["sr_high"], o.loss, o.ssim_weight)

    def collect(self, out, images, batch):
        ours = sr_scores(out["sr"], out["sr_high"])
        base = sr_scores(bicubic_up(out["sr_low"], self.options.network.scale), out["sr_high"])
        return {**ours, **{f"{key}_bicubic": value for key, value in base.items()}}

    def examples(self, out, images):
        return {"sr_examples": example_grid(out["sr_high"], out["sr_low"], out["sr"], self.options.network.scale)}
