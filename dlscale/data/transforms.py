"""Per-image transforms of a batch (resize, normalise, dihedral augmentation), the same on a DataLoader worker's CPU
and on the training device, and `finish_batch`, which moves a batch to the device and transforms it there when the
stream left it raw."""
from __future__ import annotations

import numpy as np
import torch

from dlscale.data.stream_config import StreamConfig

EPS = 1e-8


def normalize(images: torch.Tensor, method: str, inplace: bool = False,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image normalisation of a (B,C,H,W) batch (raw physical values stay in the shards), into `out` if given
    (the first pass that writes reads `images`: no separate copy).

    `inplace` reuses the batch's memory: fresh large tensors cost page faults on every batch (~0.7 ms per MB here).
    On a CPU the images go through in chunks of ~`CACHE_CHUNK_BYTES`, so that the passes over each image (min, max,
    subtract, scale) find it in cache: ~27% less CPU than whole records at 1x64x64 and at 1x150x150 (measured here).
    """
    if out is None:
        if method == "none":
            return images
        images = out = (images if inplace else images.clone()).contiguous()
    rows = max(1, CACHE_CHUNK_BYTES // max(1, out[:1].nbytes) if out.device.type == "cpu" else len(out))
    for start in range(0, len(out), rows):
        _normalize(images[start:start + rows].flatten(1), method, out[start:start + rows].flatten(1))
    return out


CACHE_CHUNK_BYTES = 1 << 19


def _normalize(flat: torch.Tensor, method: str, out: torch.Tensor) -> None:
    """Normalise the rows of `flat` (one image each) into `out` (`flat` itself, or rows of the same shape)."""
    if method == "none":
        out.copy_(flat)
    elif method == "standardize":
        var, mean = torch.var_mean(flat, dim=1, correction=0, keepdim=True)
        torch.sub(flat, mean, out=out).mul_(1.0 / (var.sqrt() + EPS))
    else:
        if method == "log":
            flat = torch.sub(flat, flat.amin(1, keepdim=True), out=out).log1p_()
        lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)   # faster than aminmax(dim=) on CPU here
        torch.sub(flat, lo, out=out).mul_(1.0 / (hi - lo + EPS))


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


def augment(images: torch.Tensor, generator: torch.Generator, out: torch.Tensor | None = None,
            rows: np.ndarray | None = None) -> torch.Tensor:
    """Apply one of the 8 dihedral transforms (90-degree rotations x optional flip), drawn per image, in place of
    the images' order (a record's images may arrive grouped by class: the draw must not follow their order); the
    result goes into `out` if given, else into fresh memory; image i into `out`'s row `rows[i]` if given (host
    images: the batch ring's rows the shuffle plan gives them)."""
    square = images.shape[2] == images.shape[3]
    choices = torch.randint(0, 8 if square else 4, (len(images),), generator=generator)
    out = torch.empty_like(images) if out is None else out
    on_host = images.device.type == "cpu" and images.dtype != torch.bfloat16
    for k in torch.unique(choices).tolist():
        chosen = (choices == k).nonzero().flatten()
        if on_host:   # numpy's flips are views: two copies per image instead of up to four (~2.5x faster)
            index = chosen.numpy()
            out.numpy()[index if rows is None else rows[index]] = _dihedral(images.numpy()[index], k, np)
        else:
            out.index_copy_(0, chosen, _dihedral(images.index_select(0, chosen), k, torch))
    return out


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


def transform(images: torch.Tensor, cfg: StreamConfig, generator: torch.Generator | None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Resize, normalise and, with a generator, augment a batch, on whatever device it sits: in place of `images`,
    or, given `out` (and no generator: the training stream augments as it writes rows into their batches), into
    `out` without writing into `images`."""
    if cfg.resize is not None:
        images = resize(images, cfg.resize, cfg.resize_mode)
    if out is not None:
        return normalize(images, cfg.normalize, out=out)
    images = normalize(images, cfg.normalize, inplace=True)
    return augment(images, generator) if generator is not None else images


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

