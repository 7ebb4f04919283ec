"""The `mae` task: masked-autoencoder pre-training of the shared encoder (options: `model.task_options.mae`,
the fields of `dlscale.models.mae.MAEConfig`)."""
from __future__ import annotations

import torch
from torch import nn

from dlscale.models.mae import MAEConfig, MAEHead, masked_patch_error, masked_patch_loss, patchify, unpatchify
from dlscale.train.tasks.base import Task, register_task
from dlscale.train.tasks.randomness import SeededDraws, seeded_generator, step_draw


def task_generator(head: SeededDraws, device: torch.device, batch: dict | None, task: str) -> torch.Generator:
    """This forward's generator: the step's draw in training (see `step_draw`), the fixed evaluation one else."""
    if batch is None:
        return head.next_generator(device, training=False)
    return seeded_generator(device, head.seed_salt, step_draw(head, batch, task)[0])


class SeededMAEHead(SeededDraws, MAEHead):
    """`MAEHead` whose masks come from the task's reproducible per-step generators."""
    seed_salt = 1


@register_task
class MaskedAutoencoding(Task):
    """Hide most patches, rebuild them from the rest; scored on the hidden patches only. ViT encoders encode the
    visible patches alone; CNNs see the image with the hidden patches zeroed."""
    name = "mae"
    Config = MAEConfig
    uses_feature_map = False     # the encoder runs on the masked input, inside this task

    def build_head(self) -> nn.Module:
        if self.ctx.encoder is None:
            raise ValueError("task 'mae' needs the encoder in its TaskContext (its head masks the encoder's input)")
        head = SeededMAEHead(self.ctx.encoder, self.ctx.image_shape, self.ctx.options or MAEConfig())
        self.patch_size, self.norm_pix = head.patch_size, head.cfg.norm_pix
        return head

    def forward(self, head, feature_map, images, batch, model):
        out = head(model.encoder, images, task_generator(head, images.device, batch, self.name))
        return {"mae_pred": out["pred"], "mae_mask": out["mask"]}

    def loss(self, out, images, batch):
        return masked_patch_loss(out["mae_pred"], patchify(images, self.patch_size), out["mae_mask"], self.norm_pix)

    def collect(self, out, images, batch):
        """Per-image error on its hidden patches (fixed evaluation masks), as the loss scores it."""
        return {"mae_masked_mse": masked_patch_error(out["mae_pred"], patchify(images, self.patch_size),
                                                     out["mae_mask"], self.norm_pix)}

    def examples(self, out, images):
        """Inputs, and the inputs with their hidden patches replaced by the reconstruction (patch-standardised
        with norm_pix)."""
        target = patchify(images, self.patch_size)
        merged = torch.where(out["mae_mask"].unsqueeze(-1), out["mae_pred"].to(target.dtype), target)
        return {"examples": images, "recon_examples": unpatchify(merged, self.patch_size, tuple(images.shape[1:]))}
