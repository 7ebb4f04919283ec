"""The `recon_unlabelled` task: reconstruction of the unlabelled images each batch carries (`data.target`), beside
a task that learns from the labelled ones.

Semi-supervised multi-task learning: with the labelled subset as the run's data and the whole train split as
`data.target`, classification learns from the labelled images only while reconstruction regularises the shared
encoder on every image, labelled or not. The target's labels never reach a loss (the two-stream source drops them).
The unlabelled images pass the encoder in the labelled images' pass (`TaskModel`); the head is `recon`'s decoder
with its options (`model.task_options.recon_unlabelled`). At evaluation, which has no second stream, the task
rebuilds the images it is given, as `recon` does.
"""
from __future__ import annotations

import torch.nn.functional as F

from dlscale.models.model import TARGET_DOMAIN, TARGET_MAP
from dlscale.train.tasks.base import register_task
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
        if TARGET_MAP not in batch:
            raise ValueError(f"task {self.name!r} rebuilds the unlabelled images of data.target and the batch has "
                             f"none ({TARGET_DOMAIN!r}): give them with --target-data DIR")
        return {UNLABELLED_RECON: head(batch[TARGET_MAP])}

    def loss(self, out, images, batch):
        return F.mse_loss(out[UNLABELLED_RECON].float(), batch[TARGET_DOMAIN]["image"].float())
