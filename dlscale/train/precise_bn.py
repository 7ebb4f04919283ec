"""Precise BatchNorm statistics (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"): after the last step, every
BatchNorm's statistics re-estimated exactly on the run's own training images with the final weights, as AdaBN does
for another domain (`adabn.adapt_statistics`: layer by layer, float64 sums over every image; the run's evaluation
transforms, no augmentation). The running averages of training are averages of per-batch statistics, taken while the
weights changed; they need not be the statistics the final weights give over the data. In a long fine-tuning run
they were far enough off to shift every eval-mode prediction of a regression head by a constant (log10 axion mass,
27,000 steps: -0.17 dex; after re-estimation the error fell from 0.172 to 0.055 dex)."""
from __future__ import annotations

import torch
from torch import nn

from dlscale.data.shards import load_manifest
from dlscale.train.adabn import (AdaBNConfig, adapt_statistics, batchnorm_layers, check_target, read_target,
                                 stream_settings)


def precise_batchnorm(model: nn.Module, cfg, image_shape: tuple[int, ...], device: torch.device) -> dict:
    """Re-estimate `model`'s BatchNorm statistics on the first `cfg.eval.precise_bn` images of the run's train split
    (-1: all; 0: nothing is done). Every rank computes the same statistics from the same images. Returns metrics."""
    if cfg.eval.precise_bn == 0 or not batchnorm_layers(model):
        return {}
    available = load_manifest(cfg.data_dir)["splits"]["train"]["samples"]
    wanted = available if cfg.eval.precise_bn < 0 else min(cfg.eval.precise_bn, available)
    ab = AdaBNConfig(cfg.run_dir, cfg.data_dir, cfg.run_dir, split="train", max_images=wanted)
    stream = stream_settings(cfg, ab, min(cfg.data.batch_size, wanted))   # the statistics do not depend on it
    used = check_target(ab, load_manifest(cfg.data_dir), stream, image_shape)
    dtype = next(model.parameters()).dtype
    batches = [b.to(dtype) for b in read_target(ab, stream, used, device)]
    was_training = model.training
    layers = adapt_statistics(model, batches, progress=False)["adapted"]
    model.train(was_training)
    return {"precise_bn/images": used, "precise_bn/layers": len(layers)}
