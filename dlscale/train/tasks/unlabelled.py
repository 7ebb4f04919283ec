"""The tasks that learn from the unlabelled images each batch carries (`data.target`), beside a task that learns
from the labelled ones: `recon_unlabelled` (reconstruction) and `contrastive_unlabelled` (SimCLR / BYOL).

Semi-supervised multi-task learning: with the labelled subset as the run's data and the whole train split as
`data.target`, classification learns from the labelled images only while reconstruction regularises the shared
encoder on every image, labelled or not. The target's labels never reach a loss (the two-stream source drops them).
The unlabelled images pass the encoder in the labelled images' pass (`TaskModel`); the head is `recon`'s decoder
with its options (`model.task_options.recon_unlabelled`). At evaluation, which has no second stream, the task
rebuilds the images it is given, as `recon` does. `contrastive_unlabelled` runs the encoder on two views of the
unlabelled images itself, as `contrastive` does on the labelled ones.
"""
from __future__ import annotations

import torch.nn.functional as F

from dlscale.models.model import TARGET_DOMAIN, TARGET_MAP
from dlscale.train.tasks.base import register_task
from dlscale.train.tasks.contrastive import Contrastive
from dlscale.train.tasks.supervised import Reconstruction

UNLABELLED_RECON = "recon_unlabelled"
"""Output key of the unlabelled images' reconstruction (training batches only)."""


@register_task
class UnlabelledReconstruction(Reconstruction):
    """Rebuild the (normalised) unlabelled images of `data.target` from their feature map."""
    name = "recon_unlabelled"
    batch_keys = (TARGET_DOMAIN,)

    def forward(self, head, feature_map, images, batch, model):
        if batch is None:   # evaluation and inference: the images given
            return super().forward(head, feature_map, images, batch, model)
        unlabelled_images(batch, self.name)
        return {UNLABELLED_RECON: head(batch[TARGET_MAP])}

    def loss(self, out, images, batch):
        return F.mse_loss(out[UNLABELLED_RECON].float(), batch[TARGET_DOMAIN]["image"].float())


@register_task
class UnlabelledContrastive(Contrastive):
    """SimCLR (or BYOL) on two random views of each unlabelled image of `data.target`: the self-supervised
    auxiliary of S4L (Zhai et al. 2019), which learns from the images the labelled task has no labels for. Options:
    `model.task_options.contrastive_unlabelled` (those of `contrastive`). At evaluation it adds nothing, as
    `contrastive`."""
    name = "contrastive_unlabelled"
    batch_keys = (TARGET_DOMAIN,)
    seed_salt = 4

    def forward(self, head, feature_map, images, batch, model):
        if batch is None:
            return {}
        return super().forward(head, feature_map, unlabelled_images(batch, self.name), batch, model)


def unlabelled_images(batch: dict, task: str):
    """The unlabelled images of a training batch, or an error naming the task and what it lacks."""
    if TARGET_DOMAIN not in batch:
        raise ValueError(f"task {task!r} learns from the unlabelled images of data.target and the batch has none "
                         f"({TARGET_DOMAIN!r}): give them with --target-data DIR")
    return batch[TARGET_DOMAIN]["image"]
