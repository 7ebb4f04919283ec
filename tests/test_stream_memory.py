"""The training stream reuses its large buffers (records' bytes, the batch ring's slots) instead of fresh pages, never
one that is still held; its host augmentation (numpy views) is the device one (torch flips), image for image."""
import pytest
import torch

from dlscale.data.buffers import BufferPool
from dlscale.data.stream import train_loader
from dlscale.data.stream_config import StreamConfig
from dlscale.data.transforms import augment

BATCH_BYTES = 64 * 64 * 64 * 4      # a batch of 64 1x64x64 float32 images: large enough to be pooled


def test_a_pooled_buffer_is_lent_again_only_once_nothing_made_from_it_remains():
    pool = BufferPool(keep=2)
    first = pool.tensor((64, 1, 64, 64), torch.float32)
    address = first.data_ptr()
    view = first[3:5]
    del first
    assert pool.tensor((64, 1, 64, 64), torch.float32).data_ptr() != address   # a view still holds it
    del view
    assert pool.tensor((64, 1, 64, 64), torch.float32).data_ptr() == address


def test_a_full_pool_with_every_buffer_held_hands_out_fresh_memory():
    pool = BufferPool(keep=1)
    held = [pool.tensor((BATCH_BYTES,), torch.uint8) for _ in range(3)]
    assert len({t.data_ptr() for t in held}) == 3 and len(pool.buffers) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_a_consumer_keeps_are_never_written_over_by_later_ones(make_shards, workers):
    data = make_shards({"train": 384}, shard_size=128, samples_per_record=64, shape=(1, 64, 64))
    cfg = StreamConfig(batch_size=64, num_workers=workers, shuffle_buffer=128)
    kept, copies = [], []
    for batch in train_loader(data, cfg, batches=12):
        assert batch["image"].nbytes == BATCH_BYTES
        kept.append(batch)
        copies.append({k: v.clone() for k, v in batch.items()})
    assert len({b["image"].data_ptr() for b in kept}) == 12
    for batch, copy in zip(kept, copies):
        assert all(torch.equal(batch[k], copy[k]) for k in copy)


def test_batches_a_consumer_drops_lend_their_memory_to_the_next(make_shards):
    """The batches are views of the batch ring's slots; a slot the consumer let go of serves a later batch."""
    data = make_shards({"train": 384}, shard_size=128, samples_per_record=64, shape=(1, 64, 64))
    cfg = StreamConfig(batch_size=64, num_workers=0, shuffle_buffer=128)
    loader = train_loader(data, cfg, batches=36)
    addresses = {batch["image"].data_ptr() for batch in loader}
    store = loader.dataset.ring.store[0]
    assert len(addresses) <= loader.dataset.ring.slots < 36
    assert all(store.data_ptr() <= a < store.data_ptr() + store.nbytes for a in addresses)


@pytest.mark.parametrize("square", [True, False])
def test_host_augmentation_equals_the_device_path(square):
    images = torch.rand(64, 1, 16, 16 if square else 12).bfloat16().float()   # exact in bfloat16
    host = augment(images, torch.Generator().manual_seed(3))
    device_path = augment(images.bfloat16(), torch.Generator().manual_seed(3)).float()   # torch's flips
    assert torch.equal(host, device_path) and not torch.equal(host, images)
