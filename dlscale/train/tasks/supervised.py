"""The v1 tasks: image reconstruction, classification of the substructure class, lens-parameter regression."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlscale.collect import TTA_FEATURES
from dlscale.data.transforms import dihedral_views
from dlscale.models.heads import ClassifierHead, Decoder, RegressionHead, WideDecoder, global_pool
from dlscale.train.refit import fit_regressor, refit_classifier, refit_regressor
from dlscale.train.tasks.base import Task, register_task

DECODERS = ("light", "wide")


@dataclass
class ReconConfig:
    decoder: str = "light"
    """light: the cheap decoder (1x1 narrowing, one conv per doubling, sub-pixel last layer); wide: dlscale 0.1's
    (~5x the cost; selected automatically for run directories written by 0.1)."""
    width: int = 32
    """light only: channels after the 1x1 narrowing."""
    out_stride: int = 1
    """light only: reconstruct at 1/out_stride of the resolution and upsample (cheaper, coarser)."""

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"model.task_options.recon.decoder={self.decoder!r}: expected one of "
                             f"{', '.join(DECODERS)}")
        if self.width < 1 or self.out_stride < 1:
            raise ValueError(f"model.task_options.recon: width and out_stride must be >= 1 (got {self.width}, "
                             f"{self.out_stride})")


@register_task
class Reconstruction(Task):
    """Rebuild the (normalised) input image from the feature map: the autoencoder's objective."""
    name = "recon"
    Config = ReconConfig

    def build_head(self) -> nn.Module:
        o, ctx = self.ctx.options or ReconConfig(), self.ctx     # checked when the options were built
        if o.decoder == "wide":
            return WideDecoder(ctx.encoder_channels, ctx.image_shape, scale=ctx.encoder_downsample)
        return Decoder(ctx.encoder_channels, ctx.image_shape, scale=ctx.encoder_downsample, width=o.width,
                       out_stride=o.out_stride)

    def forward(self, head, feature_map, images, batch, model):
        return {"recon": head(feature_map)}

    def loss(self, out, images, batch):
        return F.mse_loss(out["recon"].float(), images.float())

    def collect(self, out, images, batch):
        return {"recon_mse": (out["recon"].float() - images.float()).square().flatten(1).mean(1)}

    def examples(self, out, images):
        return {"examples": images, "recon_examples": out["recon"]}


def view_maps(feature_map: torch.Tensor, images: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    """The encoder's feature maps of every dihedral view of `images` (test-time augmentation), the identity's being
    `feature_map`, the encoder's map of `images` itself."""
    return [feature_map, *(model.encoder(v) for v in dihedral_views(images)[1:])]


def over_views(head: nn.Module, feature_map: torch.Tensor, images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """(V, B, ...): the head's outputs on every dihedral view of `images` (`view_maps`)."""
    return torch.stack([head(m) for m in view_maps(feature_map, images, model)])


@dataclass
class ClassificationConfig:
    standardize: bool = True
    """Standardise the pooled features before the linear layer (as a linear probe does); off for run directories
    written by dlscale 0.1, whose heads had no such layer."""
    refit_head: bool = True
    """After the last step, fit the head's standardisation and linear layer to the eval-mode features of the probe's
    training images (`dlscale.train.refit`: the head is trained on batch-statistics features and used on
    running-statistics ones; on lensing images that cost 0.05 accuracy)."""
    probe_init: bool = False
    """LP-FT (Kumar et al. 2022): before the first step, fit the head to the eval-mode features of the probe's
    training images (the linear probe's solution: `dlscale.train.refit`), so fine-tuning starts from a head that
    already fits the pretrained features instead of a random one whose gradients distort them"""
    tta: bool = False
    """test-time augmentation: at evaluation and prediction the class probabilities are the mean over the dihedral
    views of each image (`dlscale.data.transforms.dihedral_views`: 8 for square images; the classes do not depend
    on orientation), 8x the evaluation cost"""


@register_task
class Classification(Task):
    """Substructure class (no_sub / cdm / axion) by cross-entropy."""
    name = "classification"
    batch_keys = ("label",)
    Config = ClassificationConfig

    def build_head(self) -> nn.Module:
        o = self.ctx.options or ClassificationConfig()
        return ClassifierHead(self.ctx.encoder_channels, self.ctx.n_classes, self.ctx.classifier_dropout,
                              o.standardize)

    def forward(self, head, feature_map, images, batch, model):
        if batch is None and (self.ctx.options or ClassificationConfig()).tta:
            # the log of the mean probability: its softmax, what evaluation keeps, is the mean over the views
            probs = torch.softmax(over_views(head, feature_map, images, model).float(), dim=-1).mean(0)
            return {"logits": probs.log()}
        return {"logits": head(feature_map)}

    def loss(self, out, images, batch):
        return F.cross_entropy(out["logits"].float(), batch["label"].to(out["logits"].device))

    def collect(self, out, images, batch):
        return {"probs": torch.softmax(out["logits"].float(), dim=1)}

    def initializes(self):
        return (self.ctx.options or ClassificationConfig()).probe_init

    def initialize(self, head, train):
        if not self.initializes():
            return {}
        fitted = refit_classifier(head.norm, head.linear, train["features"], train["labels"])
        return {f"probe_init/{key}": value for key, value in fitted.items()}

    def finalize(self, head, train):
        if not (self.ctx.options or ClassificationConfig()).refit_head:
            return {}
        fitted = refit_classifier(head.norm, head.linear, train["features"], train["labels"])
        return {f"refit/{key}": value for key, value in fitted.items()}


REGRESSION_LOSSES = {"mse": F.mse_loss, "huber": F.huber_loss, "l1": F.l1_loss}
"""Losses of the regression head on the standardised targets (huber: delta 1, one standard deviation)."""


@dataclass
class RegressionConfig:
    probe_init: bool = False
    """LP-FT: before the first step, set the head to the ridge probe fitted on the eval-mode features of the probe's
    training images (the whole train split with `eval.probe_samples=0`) and their targets (`dlscale.train.refit`)"""
    loss: str = "mse"
    """on the standardised targets: mse | huber (quadratic within one standard deviation, linear beyond: the few
    far-off predictions pull less) | l1 (the mean absolute error, the metric the targets are scored by)"""
    tta: bool = False
    """test-time augmentation: at evaluation and prediction the head's output is the mean over the dihedral views of
    each image (`dlscale.data.transforms.dihedral_views`: 8 for square images), 8x the regression's evaluation
    cost. Only for targets invariant under rotations and flips (theta_E, the axion mass; not e1, e2, gamma1, gamma2,
    whose signs the group changes)"""
    refit_head: bool = True
    """After the last step (after precise BatchNorm statistics and the weight average), refit the head by least
    absolute deviations to the eval-mode features of the probe's training images (the whole train split with
    `eval.probe_samples=0`), averaged over the dihedral views with `tta` as the head is then applied to them
    (`dlscale.train.refit.refit_regressor`: every weight with 20 samples per coefficient, else the intercepts
    only). The head was trained on batch-statistics features of one view: its predictions were offset by a constant"""

    def __post_init__(self) -> None:
        if self.loss not in REGRESSION_LOSSES:
            raise ValueError(f"model.task_options.regression.loss={self.loss!r}: expected one of "
                             f"{', '.join(REGRESSION_LOSSES)}")


@register_task
class Regression(Task):
    """Lens parameters (`data.targets`, e.g. theta_E) by MSE on targets standardised with the train split's
    mean/std; the head predicts standardised values, evaluation converts them back to the targets' units."""
    name = "regression"
    batch_keys = ("target",)
    Config = RegressionConfig

    def build_head(self) -> nn.Module:
        return RegressionHead(self.ctx.encoder_channels, len(self.ctx.targets))

    def forward(self, head, feature_map, images, batch, model):
        if batch is None and self._options().tta:   # evaluation / prediction: the mean over the dihedral views
            maps = view_maps(feature_map, images, model)
            return {"regression": torch.stack([head(m) for m in maps]).mean(0),
                    TTA_FEATURES: torch.stack([global_pool(m) for m in maps]).mean(0)}
        return {"regression": head(feature_map)}

    def _options(self) -> RegressionConfig:
        return self.ctx.options or RegressionConfig()

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self.ctx.target_stats
        if stats is None:
            raise ValueError("the regression task needs target statistics (data.targets set and read from the "
                             "train split)")
        return torch.tensor(stats["mean"], device=device), torch.tensor(stats["std"], device=device)

    def loss(self, out, images, batch):
        pred = out["regression"].float()
        mean, std = self._stats(pred.device)
        return REGRESSION_LOSSES[self._options().loss](pred, (batch["target"].to(pred.device) - mean) / std)

    def collect(self, out, images, batch):
        if "target" not in batch:
            return {}
        mean, std = self._stats(out["regression"].device)
        rows = {"regression": out["regression"].float() * std + mean, "target": batch["target"]}
        return rows | ({TTA_FEATURES: out[TTA_FEATURES]} if TTA_FEATURES in out else {})

    def initializes(self):
        return self._options().probe_init

    def initialize(self, head, train):
        if not self.initializes():
            return {}
        stats = self.ctx.target_stats
        fitted = fit_regressor(head.linear, train["features"], train["target"], stats["mean"], stats["std"])
        return {f"probe_init/regression/{key}": value for key, value in fitted.items()}

    @classmethod
    def available(cls, n_targets: int) -> bool:
        return n_targets > 0

    def finalizes(self):
        return self._options().refit_head

    def finalize(self, head, train):
        if not self.finalizes():
            return {}
        stats = self.ctx.target_stats
        fitted = refit_regressor(head.linear, train.get(TTA_FEATURES, train["features"]), train["target"],
                                 stats["mean"], stats["std"])
        return {f"refit/regression/{key}": value for key, value in fitted.items()}
