"""One module holding a shared encoder, any subset of task heads and the loss weighting.

Keeping the weighting inside the model means its learned parameters (uncertainty log-variances) and state (DWA
loss history) are trained, sharded and checkpointed by the same DeepSpeed engine as the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dlscale.models.encoders import EncoderConfig, build_encoder
from dlscale.models.heads import ClassifierHead, Decoder, RegressionHead, global_pool

TASKS: tuple[str, ...] = ("recon", "classification", "regression")
"""Task names, in the order losses are reported; also the keys of the loss dict given to the weighting."""

STAGE_TASKS: dict[str, tuple[str, ...] | None] = {
    "autoencoder": ("recon",),
    "supervised": ("classification",),
    "multitask": None,  # chosen by the caller
}


class MultiTaskModel(nn.Module):
    """Shared encoder plus optional decoder, classifier and regressor.

    `forward(x)` returns a dict: `features` (pooled, (B, C)) always, and `recon` (B, *image_shape), `logits`
    (B, n_classes), `regression` (B, n_targets) for the heads present.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module | None = None,
        classifier: nn.Module | None = None,
        regressor: nn.Module | None = None,
        weighting: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.classifier = classifier
        self.regressor = regressor
        self.weighting = weighting

    @property
    def tasks(self) -> tuple[str, ...]:
        """Tasks this model has a head for, in `TASKS` order."""
        heads = {"recon": self.decoder, "classification": self.classifier, "regression": self.regressor}
        return tuple(task for task in TASKS if heads[task] is not None)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feature_map = self.encoder(x)
        out = {"features": global_pool(feature_map)}
        if self.decoder is not None:
            out["recon"] = self.decoder(feature_map)
        if self.classifier is not None:
            out["logits"] = self.classifier(feature_map)
        if self.regressor is not None:
            out["regression"] = self.regressor(feature_map)
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (B, C), without running the heads: the input of linear probes."""
        return global_pool(self.encoder(x))


def build_model(
    stage: str,
    encoder_cfg: EncoderConfig,
    image_shape: tuple[int, int, int],
    n_classes: int = 3,
    n_reg_targets: int = 0,
    tasks: Sequence[str] | None = None,
    weighting: nn.Module | None = None,
    classifier_dropout: float = 0.0,
) -> MultiTaskModel:
    """Build the model of a training stage.

    `autoencoder`: encoder + decoder; `supervised`: encoder + classifier; `multitask`: encoder + the heads named in
    `tasks` (default: recon and classification, plus regression when `n_reg_targets` > 0). `tasks` given with
    another stage must equal that stage's tasks.
    """
    if stage not in STAGE_TASKS:
        raise ValueError(f"unknown stage {stage!r}: expected one of {', '.join(STAGE_TASKS)}")
    if tuple(image_shape)[0] != encoder_cfg.in_channels:
        raise ValueError(f"image_shape {tuple(image_shape)} has {image_shape[0]} channels, "
                         f"encoder in_channels is {encoder_cfg.in_channels}")
    chosen = stage_tasks(stage, tasks, n_reg_targets)
    encoder = build_encoder(encoder_cfg)
    channels = encoder.out_channels
    return MultiTaskModel(
        encoder,
        decoder=Decoder(channels, image_shape, scale=encoder.downsample) if "recon" in chosen else None,
        classifier=ClassifierHead(channels, n_classes, classifier_dropout) if "classification" in chosen else None,
        regressor=RegressionHead(channels, n_reg_targets) if "regression" in chosen else None,
        weighting=weighting,
    )


def stage_tasks(stage: str, tasks: Sequence[str] | None, n_reg_targets: int) -> tuple[str, ...]:
    """Validate the tasks asked for against the stage; return them in `TASKS` order."""
    if tasks is not None:
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}: expected some of {', '.join(TASKS)}")
    fixed = STAGE_TASKS[stage]
    if fixed is not None:
        if tasks is not None and set(tasks) != set(fixed):
            raise ValueError(f"stage {stage!r} trains tasks {list(fixed)}, got tasks {list(tasks)}")
        return fixed
    if tasks is None:
        tasks = ("recon", "classification") + (("regression",) if n_reg_targets > 0 else ())
    if not tasks:
        raise ValueError("stage 'multitask' needs at least one task")
    if "regression" in tasks and n_reg_targets < 1:
        raise ValueError("task 'regression' needs n_reg_targets >= 1")
    return tuple(task for task in TASKS if task in tasks)
