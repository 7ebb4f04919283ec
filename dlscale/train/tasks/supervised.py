"""The v1 tasks: image reconstruction, classification of the substructure class, lens-parameter regression."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlscale.models.heads import ClassifierHead, Decoder, RegressionHead
from dlscale.train.tasks.base import Task, register_task


@register_task
class Reconstruction(Task):
    """Rebuild the (normalised) input image from the feature map: the autoencoder's objective."""
    name = "recon"

    def build_head(self) -> nn.Module:
        return Decoder(self.ctx.encoder_channels, self.ctx.image_shape, scale=self.ctx.encoder_downsample)

    def forward(self, head, feature_map, images, batch, model):
        return {"recon": head(feature_map)}

    def loss(self, out, images, batch):
        return F.mse_loss(out["recon"].float(), images.float())

    def collect(self, out, images, batch):
        return {"recon_mse": (out["recon"].float() - images.float()).square().flatten(1).mean(1)}

    def examples(self, out, images):
        return {"examples": images, "recon_examples": out["recon"]}


@register_task
class Classification(Task):
    """Substructure class (no_sub / cdm / axion) by cross-entropy."""
    name = "classification"
    batch_keys = ("label",)

    def build_head(self) -> nn.Module:
        return ClassifierHead(self.ctx.encoder_channels, self.ctx.n_classes, self.ctx.classifier_dropout)

    def forward(self, head, feature_map, images, batch, model):
        return {"logits": head(feature_map)}

    def loss(self, out, images, batch):
        return F.cross_entropy(out["logits"].float(), batch["label"].to(out["logits"].device))

    def collect(self, out, images, batch):
        return {"probs": torch.softmax(out["logits"].float(), dim=1)}


@register_task
class Regression(Task):
    """Lens parameters (`data.targets`, e.g. theta_E) by MSE on targets standardised with the train split's
    mean/std; the head predicts standardised values, evaluation converts them back to the targets' units."""
    name = "regression"
    batch_keys = ("target",)

    def build_head(self) -> nn.Module:
        return RegressionHead(self.ctx.encoder_channels, len(self.ctx.targets))

    def forward(self, head, feature_map, images, batch, model):
        return {"regression": head(feature_map)}

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self.ctx.target_stats
        if stats is None:
            raise ValueError("the regression task needs target statistics (data.targets set and read from the "
                             "train split)")
        return torch.tensor(stats["mean"], device=device), torch.tensor(stats["std"], device=device)

    def loss(self, out, images, batch):
        pred = out["regression"].float()
        mean, std = self._stats(pred.device)
        return F.mse_loss(pred, (batch["target"].to(pred.device) - mean) / std)

    def collect(self, out, images, batch):
        if "target" not in batch:
            return {}
        mean, std = self._stats(out["regression"].device)
        return {"regression": out["regression"].float() * std + mean, "target": batch["target"]}

    @classmethod
    def available(cls, n_targets: int) -> bool:
        return n_targets > 0
