"""Host images written into their batch rows in one compiled pass each (normalised and put through their dihedral
transform on the way) are, bit for bit, what the plain per-image computation gives: `normalize`, then torch's
flips and transposes; in the training stream, for every normalisation and any number of workers."""
import numpy as np
import pytest
import torch

from dlscale.data.rowwrite import write_rows
from dlscale.data.shardset import ShardSet
from dlscale.data.stream import StreamConfig, train_loader
from dlscale.data.transforms import chunk_rows, dihedral_views, normalize

METHODS = ["minmax", "standardize", "log", "none"]


def reference(image: torch.Tensor, method: str, k: int) -> torch.Tensor:
    """Dihedral transform k (bit 0 flips W, bit 1 flips H, k >= 4 then swaps H and W) of one normalised image."""
    x = normalize(image[None].clone(), method)[0]
    x = x.flip(2) if k % 2 else x
    x = x.flip(1) if (k // 2) % 2 else x
    return x.transpose(1, 2) if k >= 4 else x


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("square", [True, False])
def test_rows_written_equal_the_per_image_reference_for_every_transform(method, square, monkeypatch):
    monkeypatch.setattr("dlscale.data.transforms.CACHE_CHUNK_BYTES", 7 * 2 * 9 * 9 * 4)   # chunks of 7 images
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(40, 2, 9, 9 if square else 6, generator=generator) * 100 - 3
    source = images.clone()
    transforms = 8 if square else 4
    choices = np.arange(len(images)) % transforms          # every transform, several times, in every chunk
    rows = np.random.default_rng(0).permutation(len(images) + 5)[:len(images)]
    out = torch.full((len(images) + 5, *images.shape[1:]), float("nan"))
    work = torch.empty(chunk_rows(images[:1].nbytes), *images.shape[1:])
    write_rows(images, method, choices, out, rows, work)
    for i, (k, row) in enumerate(zip(choices, rows)):
        assert torch.equal(out[row], reference(images[i], method, int(k))), f"image {i}, transform {k}"
    untouched = np.setdiff1d(np.arange(len(out)), rows)
    assert torch.isnan(out[untouched]).all() and torch.equal(images, source)


@pytest.mark.parametrize("method", METHODS)
def test_rows_of_images_with_special_values_equal_the_reference(method):
    """The compiled pass's own minimum and maximum (over keys that order as the floats do) give torch's terms for
    negative, constant, signed-zero, infinite and NaN images, every transform."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 1, 5, 5, generator=generator) * 1e3
    images[1] = -images[1].abs() - 1           # all negative
    images[2] = 7.5                            # constant: scale 1 / EPS
    images[3, 0, 0] = -0.0
    images[3, 0, 1] = 0.0
    images[4, 0, 2, 2] = float("inf")
    images[5, 0, 1, 3] = float("-inf")
    images[6, 0, 4, 0] = float("nan")
    images[7, 0, 0, 4] = -float("nan")
    choices = np.arange(len(images)) % 8
    rows = np.arange(len(images))[::-1].copy()
    out = torch.zeros_like(images)
    work = torch.empty(chunk_rows(images[:1].nbytes), *images.shape[1:])
    write_rows(images, method, choices, out, rows, work)
    for i, (k, row) in enumerate(zip(choices, rows)):
        expected = reference(images[i], method, int(k))
        assert torch.equal(out[row].isnan(), expected.isnan()), f"image {i}"
        assert torch.equal(out[row].nan_to_num(0.0), expected.nan_to_num(0.0)), f"image {i}"


@pytest.mark.parametrize("method", METHODS)
def test_stream_rows_are_a_transform_of_the_normalised_image_for_any_worker_count(make_shards, monkeypatch, method):
    """Spill rows too (a window of one batch); the batches are the same for 0, 1, 2 and 4 workers."""
    monkeypatch.setattr("dlscale.data.stream.WINDOW_FILLS", 0)
    data = make_shards({"train": 60}, shard_size=20, samples_per_record=6)
    stored = {tuple(i): image for images, _, ids, _ in (r for index in range(3) for r in
                                                         ShardSet(data, "train", StreamConfig()).records(index))
              for i, image in zip(ids.tolist(), images)}
    first = None
    for workers in (0, 1, 2, 4):
        cfg = StreamConfig(batch_size=4, num_workers=workers, shuffle_buffer=8, normalize=method)
        batches = [(batch["ids"].tolist(), batch["image"].clone()) for batch in train_loader(data, cfg, batches=20)]
        first = first or batches
        assert all(a == c and torch.equal(b, d) for (a, b), (c, d) in zip(first, batches, strict=True)), workers
    for ids, images in first:
        for i, image in zip(ids, images):
            views = dihedral_views(normalize(stored[tuple(i)][None].clone(), method))
            assert any(torch.equal(image, view[0]) for view in views), i
