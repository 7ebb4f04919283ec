"""Per-image transforms of a batch (resize, normalise, dihedral augmentation), the same on a DataLoader worker's CPU
and on the training device, and `finish_batch`, which moves a batch to the device and transforms it there when the
stream left it raw."""
from __future__ import annotations

import numpy as np
import torch

from dlscale.data.stream_config import StreamConfig

EPS = 1e-8


def normalize(images: torch.Tensor, method: str, inplace: bool = False) -> torch.Tensor:
    """Per-image normalisation of a (B,C,H,W) batch (raw physical values stay in the shards).

    `inplace` reuses the batch's memory: fresh large tensors cost page faults on every batch (~0.7 ms per MB here).
    On a CPU the images go through in chunks of `chunk_rows`, so that the passes over each image (min, max,
    subtract, scale) find it in cache: ~27% less CPU than whole records at 1x64x64 and at 1x150x150 (measured here).
    """
    if method == "none":
        return images
    out = (images if inplace else images.clone()).contiguous()
    rows = chunk_rows(out[:1].nbytes) if out.device.type == "cpu" else len(out)
    for start in range(0, len(out), rows):
        _normalize(out[start:start + rows].flatten(1), method)
    return out


def chunk_rows(row_bytes: int) -> int:
    """Images per chunk of ~`CACHE_CHUNK_BYTES` (at least one) that a CPU normalises while they stay in cache."""
    return max(1, CACHE_CHUNK_BYTES // max(1, row_bytes))


CACHE_CHUNK_BYTES = 1 << 19


def _normalize(flat: torch.Tensor, method: str) -> None:
    """Normalise the rows of `flat` (one image each) in place."""
    if method == "log":
        log_rows(flat, flat)
    offset, scale = affine_terms(flat, method)
    torch.sub(flat, offset, out=flat).mul_(scale)


def log_rows(flat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """log(1 + row - its minimum) of each row of `flat` (one image each), into `out` (`flat` itself, or rows of the
    same shape)."""
    return torch.sub(flat, flat.amin(1, keepdim=True), out=out).log1p_()


def affine_terms(flat: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `flat` (one image each; after the log of `log`): (offset, scale) with normalised = (row - offset)
    x scale, each (rows, 1)."""
    if method == "none":
        return torch.zeros(len(flat), 1), torch.ones(len(flat), 1)
    if method == "standardize":
        var, mean = torch.var_mean(flat, dim=1, correction=0, keepdim=True)
        return mean, 1.0 / (var.sqrt() + EPS)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)   # faster than aminmax(dim=) on CPU here
    return lo, 1.0 / (hi - lo + EPS)


def resize(images: torch.Tensor, side: int, mode: str = "interpolate") -> torch.Tensor:
    """(B,C,H,W) -> (B,C,side,side): bilinear with antialiasing (`interpolate`), or the centre `crop`."""
    h, w = images.shape[-2:]
    if (h, w) == (side, side):
        return images
    if mode == "crop":
        top, left = (h - side) // 2, (w - side) // 2
        return images[..., top:top + side, left:left + side].contiguous()
    return torch.nn.functional.interpolate(images, size=(side, side), mode="bilinear", align_corners=False,
                                           antialias=True)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply one of the 8 dihedral transforms (90-degree rotations x optional flip), drawn per image
    (`dihedral_choices`), into fresh memory."""
    choices = dihedral_choices(images, generator)
    out = torch.empty_like(images)
    on_host = images.device.type == "cpu" and images.dtype != torch.bfloat16
    for k in torch.unique(choices).tolist():
        chosen = (choices == k).nonzero().flatten()
        if on_host:   # numpy's flips are views: two copies per image instead of up to four (~2.5x faster)
            index = chosen.numpy()
            out.numpy()[index] = _dihedral(images.numpy()[index], k, np)
        else:
            out.index_copy_(0, chosen, _dihedral(images.index_select(0, chosen), k, torch))
    return out


def dihedral_choices(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Which dihedral transform (`_dihedral`'s k) each image gets: drawn per image, in place of the images' order (a
    record's images may arrive grouped by class: the draw must not follow their order), 0-7 for square images,
    0-3 (the flips) for others."""
    square = images.shape[2] == images.shape[3]
    return torch.randint(0, 8 if square else 4, (len(images),), generator=generator)


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The images under every element of the dihedral group, identity first: 8 views of square images (4 rotations
    by 90 degrees, each with and without a flip), the 4 flips of other images (their rotations change the shape).
    What test-time augmentation averages over, as `augment` draws one of them per image in training."""
    square = images.shape[2] == images.shape[3]
    return [_dihedral(images, k, torch).contiguous() for k in range(8 if square else 4)]


def _dihedral(x, k: int, lib):
    """Dihedral transform k of (B,C,H,W) images `x`: a numpy array or a tensor, `lib` its module."""
    x = lib.flip(x, (3,)) if k % 2 else x
    x = lib.flip(x, (2,)) if (k // 2) % 2 else x
    return x.swapaxes(2, 3) if k >= 4 else x


RAW = "raw"
"""The one control key of a batch: present on a batch left raw by `transforms=device` (its images as stored), its
value the seed of the batch's augmentation (`NO_AUGMENTATION`: none). `finish_batch` reads and removes it; the model
never sees it. (0.x batches also had `augment_seed`: now the value of `raw`.)"""
NO_AUGMENTATION = -1


def transform(images: torch.Tensor, cfg: StreamConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Resize, normalise and, with a generator, augment a batch, on whatever device it sits, in place of `images`."""
    images = normalize(resize_to(images, cfg), cfg.normalize, inplace=True)
    return augment(images, generator) if generator is not None else images


def resize_to(images: torch.Tensor, cfg: StreamConfig) -> torch.Tensor:
    """`images` at the stream's `data.resize` (themselves without one)."""
    return images if cfg.resize is None else resize(images, cfg.resize, cfg.resize_mode)


def finish_batch(batch: dict, cfg: StreamConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """The batch on the training device: images moved (asynchronously from pinned memory) and, for a batch left raw
    by `transforms=device`, transformed there, so a GPU node's host only reads and pins records."""
    images = batch["image"].to(device, non_blocking=True)
    if RAW in batch:
        seed = int(batch[RAW])
        generator = None if seed == NO_AUGMENTATION else torch.Generator().manual_seed(seed)
        images = transform(images.float(), cfg, generator)
    rest = {k: finish_batch(v, cfg, device, dtype) if isinstance(v, dict) and "image" in v else v   # a second
            for k, v in batch.items() if k != RAW}                                                # domain's batch
    return {**rest, "image": images.to(dtype)}

