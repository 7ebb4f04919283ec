"""Training data sources and backbones are registered parts: a source (`data.source`) and a backbone
(`model.encoder.name`) defined here, in the test file, with no library edit, train on 2 real ranks (gloo); the
built-in sources (`shards`, `simulate`) answer the protocol the runner and trainer use.

This file is also the launch script of its own 2-rank run: `torchrun ... tests/test_sources.py --data.source=blobs
...` imports it (registering the parts below) and calls `dlscale.train.main`.
"""
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dlscale.data.classes import CLASSES
from dlscale.models import BACKBONES, ENCODER_NAMES, Backbone, EncoderConfig, build_encoder, register_backbone
from dlscale.train.sources import SOURCES, TrainingSource, register_source, source_of, training_source

RECORDS = "BLOB_SOURCE_RECORDS"     # where each rank's blob stream writes the batches it served
TIMEOUT_S = 300
SIDE = 32                           # the eval set (separable_data) is 1x32x32


class BlobStream(torch.utils.data.IterableDataset):
    """Synthetic images: a class-dependent brightness plus noise; batch k of an epoch is a function of (seed, epoch,
    rank, k)."""

    def __init__(self, batch_size: int, rank: int, batches: int, seed: int) -> None:
        self.batch_size, self.rank, self.batches, self.seed, self.epoch = batch_size, rank, batches, seed, 0
        self.image_shape = (1, SIDE, SIDE)
        self.served: list[list[int]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for k in range(self.batches):
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank, k)) % 2**62)
            labels = torch.randint(0, len(CLASSES), (self.batch_size,), generator=g)
            images = torch.rand(self.batch_size, *self.image_shape, generator=g) + labels.view(-1, 1, 1, 1).float()
            ids = torch.stack([torch.full((self.batch_size,), self.epoch), torch.full((self.batch_size,), k),
                               torch.arange(self.batch_size)], 1)
            self.served.append([self.rank, self.epoch, k])
            self._write()
            yield {"image": images / len(CLASSES), "label": labels, "ids": ids}

    def _write(self) -> None:
        if os.environ.get(RECORDS):
            Path(os.environ[RECORDS], f"rank{self.rank}.json").write_text(json.dumps(self.served))


@register_source
class Blobs(TrainingSource):
    name = "blobs"
    description = "synthetic class-brightness blobs (test source)"

    def build(self, info, device):
        batches = self.cfg.schedule.batches_per_epoch or 3
        return BlobStream(self.cfg.data.batch_size, info.rank, batches, self.cfg.seed), batches

    def describe(self, stream, ids):
        return [f"blob epoch {e} batch {b} #{p}" for e, b, p in ids.tolist()]


@dataclass
class StridedConfig(EncoderConfig):
    width: int = 8
    """output channels"""


@register_backbone
class StridedEncoder(Backbone, nn.Module):
    """One stride-4 convolution: the smallest backbone that keeps the encoder contract."""
    name, Config = "strided", StridedConfig

    @classmethod
    def from_config(cls, cfg, image_shape=None):
        return cls(cfg.in_channels, cfg.width)

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(in_channels, width, kernel_size=4, stride=4), nn.ReLU()
        self.out_channels, self.downsample = width, 4

    def forward(self, x):
        return self.act(self.conv(x))


# ---- The registries -----------------------------------------------------------------------------------------------

def _cfg(*overrides, data_dir="-"):
    from dlscale.train.config import load_config
    return load_config(None, ["--model.encoder.name=small", "--model.encoder.width=8", "--data.batch_size=12",
                              "--data.num_workers=0", "--data.shuffle_buffer=24", *overrides],
                       stage="supervised", data_dir=str(data_dir), run_dir="-")


def test_the_registries_hold_the_built_ins_in_order_and_the_parts_of_this_file():
    assert list(SOURCES)[:2] == ["shards", "simulate"] and SOURCES["blobs"] is Blobs
    assert tuple(BACKBONES)[:len(ENCODER_NAMES)] == ENCODER_NAMES == (
        "resnet18", "small", "vit_tiny", "vit_small", "convnext_nano")
    assert BACKBONES["strided"] is StridedEncoder
    assert _cfg("--data.source=blobs").validate().data.source == "blobs"
    with pytest.raises(ValueError, match=r"data.source='nope': expected one of shards, simulate, .*blobs"):
        _cfg("--data.source=nope").validate()
    with pytest.raises(ValueError, match="a data source subclasses"):
        register_source(type("NotASource", (), {"name": "x"}))
    with pytest.raises(ValueError, match="needs a `name`"):
        register_source(type("Nameless", (TrainingSource,), {}))
    with pytest.raises(ValueError, match="from_config"):
        register_backbone(type("NoBuilder", (nn.Module,), {"name": "nobuilder"}))


def test_a_registered_backbone_builds_by_name_and_keeps_the_checks():
    encoder = build_encoder(EncoderConfig(name="strided", width=6))
    assert isinstance(encoder, StridedEncoder) and encoder(torch.zeros(2, 1, 32, 32)).shape == (2, 6, 8, 8)
    with pytest.raises(ValueError, match="patch_size=8 applies to ViT encoders \\(vit_tiny, vit_small\\), not to "
                                         "'strided'"):
        build_encoder(EncoderConfig(name="strided", patch_size=8), (1, 32, 32))
    with pytest.raises(ValueError, match="unknown encoder 'nope': expected one of resnet18, small, .*strided"):
        build_encoder(EncoderConfig(name="nope"))
    with pytest.raises(ValueError, match="'vit_tiny' needs the image shape"):
        build_encoder(EncoderConfig(name="vit_tiny"))
    assert _cfg("--model.encoder.name=strided", "--model.encoder.width=32").model.encoder == StridedConfig(
        name="strided", width=32)      # its own option, even at the value another backbone has by default


def test_the_shard_source_answers_the_protocol(separable_data, records):
    from dlscale.data.stream import TrainStream
    from dlscale.distributed import DistInfo
    from dlscale.train.data import describe_ids, epoch_loader, stream_image_shape, target_stats, training_skips
    cfg = _cfg("--data.targets=[theta_E]", data_dir=separable_data)
    source = training_source(cfg)
    assert source.name == "shards" and source.reads_train_split and not source.simulated_eval_set()
    stream, batches = source.open(DistInfo(0, 2, 0), torch.device("cpu"))
    assert isinstance(stream, TrainStream) and source_of(stream) is source and batches == 240 // (12 * 2)
    assert stream_image_shape(stream) == (1, 32, 32) and training_skips(stream) is stream
    batch = next(iter(epoch_loader(stream, cfg)))
    assert set(source.batch_keys) | {"target"} == set(batch) and batch["image"].shape == (12, 1, 32, 32)
    assert describe_ids(stream, batch["ids"][:1]) == stream.shards.describe(batch["ids"][:1])
    assert describe_ids(stream, batch["ids"][:1])[0].startswith("train-")
    train = records(separable_data, "train")   # target_stats: whole leading shards, the same on every rank
    sample = source.target_sample(stream, 5)
    assert len(sample) >= 5 and sample[:5, 0] == pytest.approx([s.meta["theta_E"] for s in train[:5]])
    stats = target_stats(cfg, stream)
    values = np.array([s.meta["theta_E"] for s in train])
    assert stats["mean"][0] == pytest.approx(values.mean(), rel=1e-5)   # 240 < 4096: the whole split


def test_the_simulation_source_answers_the_protocol(tmp_path):
    from dlscale.distributed import DistInfo
    from dlscale.sim.stream import SimulationStream
    from dlscale.train.data import describe_ids, epoch_loader, simulated_eval_set, stream_image_shape, training_skips
    cfg = _cfg("--data.source=simulate", "--schedule.batches_per_epoch=2", "--data.targets=[theta_E]",
               "--data.simulator.overrides={instrument.n_pix: 16}", data_dir="")
    cfg.run_dir = str(tmp_path / "run")
    source = training_source(cfg)
    assert source.name == "simulate" and not source.reads_train_split and simulated_eval_set(cfg)
    stream, batches = source.open(DistInfo(1, 2, 1), torch.device("cpu"))
    assert isinstance(stream, SimulationStream) and batches == 2 and stream_image_shape(stream) == (1, 16, 16)
    assert training_skips(stream) is None
    loaded = list(epoch_loader(stream, cfg))
    assert len(loaded) == 2 and set(loaded[0]) == set(source.batch_keys) | {"target"}
    assert torch.equal(loaded[1]["image"], stream.batch(0, 1 * 2 + 1)["image"])   # rank 1's 2nd: global batch 3
    assert describe_ids(stream, loaded[0]["ids"][:1]) == ["epoch 0:batch 1:sample 0"]
    sample = source.target_sample(stream, 20)   # the first global batches of epoch 0, whatever the rank
    assert sample[:12, 0] == pytest.approx(stream.batch(0, 0)["target"][:, 0].numpy())


def test_the_simulation_stream_transforms_its_batches_as_the_shard_streams():
    from dlscale.data.stream_config import StreamConfig
    from dlscale.data.transforms import transform
    from dlscale.sim.stream import SimulationSourceConfig, SimulationStream
    source = SimulationSourceConfig(overrides={"instrument.n_pix": 16})
    cfg = StreamConfig(batch_size=6, num_workers=0, normalize="standardize", resize=8, augment=False)
    raw = SimulationStream(source, StreamConfig(batch_size=6, num_workers=0, normalize="none", augment=False),
                           0, 1, 1, seed=3)
    made = SimulationStream(source, cfg, 0, 1, 1, seed=3).batch(0, 0)["image"]
    assert made.shape == (6, 1, 8, 8)
    assert torch.allclose(made, transform(raw.batch(0, 0)["image"], cfg, None), atol=1e-6)


def test_an_in_memory_stream_needs_no_source_name():
    from dlscale.train.data import InMemoryStream, describe_ids, epoch_loader
    batch = {"image": torch.zeros(2, 1, 4, 4), "label": torch.zeros(2, dtype=torch.long),
             "ids": torch.tensor([[0, 1, 2], [0, 1, 3]])}
    stream = InMemoryStream([batch])
    assert source_of(stream).name == "in_memory" and "in_memory" not in SOURCES
    assert [b["ids"].tolist() for b in epoch_loader(stream, None)] == [batch["ids"].tolist()]
    assert describe_ids(stream, batch["ids"]) == ["in-memory sample 0:1:2", "in-memory sample 0:1:3"]


def test_a_raw_batch_carries_one_control_key_which_finish_batch_removes(separable_data):
    from dataclasses import replace

    from dlscale.data.stream import train_loader
    from dlscale.data.stream_config import StreamConfig
    from dlscale.data.transforms import NO_AUGMENTATION, RAW, finish_batch
    cfg = StreamConfig(batch_size=16, num_workers=0, shuffle_buffer=64, transforms="device")
    for config in (cfg, replace(cfg, augment=False)):
        batch = next(iter(train_loader(separable_data, config, batches=1)))
        assert set(batch) == {"image", "label", "ids", RAW}
        assert (int(batch[RAW]) == NO_AUGMENTATION) == (not config.augment)
        assert set(finish_batch(batch, config, torch.device("cpu"))) == {"image", "label", "ids"}


# ---- A source and a backbone of this file train on 2 ranks ----------------------------------------------------

@pytest.fixture(scope="module")
def blob_run(tmp_path_factory, launch, venv_bin, separable_data, tiny_args):
    root = tmp_path_factory.mktemp("blobs")
    records = root / "records"
    records.mkdir()
    started = launch([venv_bin / "torchrun", "--standalone", "--nproc_per_node", "2", Path(__file__),
                      "--stage", "supervised", "--data", separable_data, "--run-dir", root / "run", *tiny_args,
                      "--data.source=blobs", "--model.encoder.name=strided", "--schedule.batches_per_epoch=3",
                      "--schedule.epochs=2"], root / "torchrun.log", root, env={RECORDS: str(records)})
    code = started.wait(TIMEOUT_S)
    assert code == 0, started.output()[-4000:]
    return root / "run", records


def test_a_source_and_a_backbone_defined_in_a_test_file_train_on_two_ranks(blob_run):
    run_dir, records = blob_run
    log = (run_dir / "log.txt").read_text()
    assert "strided encoder" in log and "2 rank(s)" in log and "2 epochs x 3 batches of 16 per rank" in log
    assert "source: blobs" in (run_dir / "config.yaml").read_text()
    assert "name: strided" in (run_dir / "config.yaml").read_text()
    served = {r: json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert served == {r: [[r, e, k] for e in (0, 1) for k in range(3)] for r in (0, 1)}   # every batch, both epochs
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["val/n_samples"] == 61 and 0.0 <= metrics["val/auc_macro"] <= 1.0
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert state["encoder.conv.weight"].shape == (8, 1, 4, 4)   # tiny_args: width 8
    import dlscale
    encoder = dlscale.load_encoder(run_dir)
    assert isinstance(encoder, StridedEncoder) and encoder(torch.zeros(1, 1, 32, 32)).shape == (1, 8, 8, 8)
    assert not (run_dir / "simulation.json").exists()


if __name__ == "__main__":
    from dlscale.train import main
    sys.exit(main())
