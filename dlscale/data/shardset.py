"""The shards of one split, where they are and how their records decode into tensors."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from dlscale.data.shards import decode_record, load_manifest
from dlscale.data.stream_config import StreamConfig
from dlscale.data.tario import CorruptShardError, MappedFile, ReadIntoAdapter, iter_records


class ShardSet:
    """The shards of one split: where they are and how to read their records."""

    def __init__(self, data_dir: Path | str, split: str, cfg: StreamConfig):
        self.data_dir, self.split, self.cfg = Path(data_dir), split, cfg
        self.manifest = load_manifest(data_dir)
        if split not in self.manifest["splits"]:
            raise ValueError(f"{data_dir}: no {split!r} split (has {', '.join(self.manifest['splits'])})")
        self.shards = self.manifest["splits"][split]["shards"]
        self.num_samples = self.manifest["splits"][split]["samples"]
        self.urls = [self._url(s["name"]) for s in self.shards]
        self.image_shape = tuple(self.manifest["image_shape"])

    def _url(self, name: str) -> str:
        template = self.cfg.url_template
        if not template:
            return str(self.data_dir / name)
        import shlex   # a name goes into a shell command line as one quoted word, whatever it holds
        url = template.format(name=shlex.quote(name) if template.startswith("pipe:") else name)
        if url.startswith("pipe:") and not self.cfg.allow_pipe:
            raise ValueError(f"shard URL {url!r} runs a shell command; set data.allow_pipe=true to allow it")
        return url

    def open(self, index: int, mapped: bool = False) -> BinaryIO:
        """Shard `index` as a stream; `mapped`: a local file through a memory map (`MappedFile`: records' bytes are
        not copied out of the page cache; only for readers that do not write into what they decode)."""
        url = self.urls[index]
        if "://" in url or url.startswith("pipe:"):
            from webdataset.gopen import gopen
            return ReadIntoAdapter(gopen(url, "rb"))
        return MappedFile(url) if mapped else open(url, "rb", buffering=1 << 20)

    def records(self, index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Decoded records of shard `index`: images, labels, ids (shard, record, position), targets or None."""
        with self.open(index) as stream:
            for r, (key, record) in enumerate(iter_records(stream, self.shards[index]["name"])):
                yield self.decode(index, r, key, record)

    def decode(self, index: int, r: int, key: str, record: dict) -> tuple:
        """Record `r` (tar key `key`) of shard `index` as (images, labels, ids, targets or None) tensors."""
        where = f"{self.shards[index]['name']}:{key}"
        images, labels, metas = decode_record(record, self.manifest["record_layout"], self.image_shape,
                                              len(self.manifest["classes"]), where, bool(self.cfg.targets))
        if len(labels) > self.manifest["record_layout"]["samples_per_record"]:
            raise CorruptShardError(f"{where}: {len(labels)} samples, the manifest's records hold at most "
                                    f"{self.manifest['record_layout']['samples_per_record']}")
        ids = np.stack([np.full(len(labels), index), np.full(len(labels), r), np.arange(len(labels))], 1)
        return (torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(ids),
                torch.tensor(extract_targets(metas, self.cfg.targets, where)) if self.cfg.targets else None)

    def describe(self, ids: torch.Tensor) -> list[str]:
        """Human-readable sample keys ("train-000003.tar:record 5:sample 17") for ids from a batch."""
        return [f"{self.shards[s]['name']}:record {r}:sample {p}" for s, r, p in ids.tolist()]


def extract_targets(metas: list[dict], keys: list[str], where: str) -> np.ndarray:
    try:
        return np.array([[float(m[k]) for k in keys] for m in metas], dtype=np.float32)
    except KeyError as err:
        raise ValueError(f"{where}: sample metadata has no regression target {err}; available: "
                         f"{sorted(metas[0]) if metas else []}") from None

