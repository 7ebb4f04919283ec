"""WebDataset shards with a manifest (format ``dlscale-shards/1``): write, pack, verify, info.

A dataset directory holds ``<split>-%06d.tar`` shards and ``manifest.json``. Records are *stacked*: one tar record
holds up to ``samples_per_record`` samples as ``images.npy`` (float32 (n,C,H,W)), ``labels.npy`` (int64 (n,)) and
``meta.json`` (list of n dicts), because per-member tar parsing caps a stream at ~3,400 samples/s in Python. With
``samples_per_record=1`` the records are the classic per-sample ``image.npy`` / ``cls`` / ``json`` that any
WebDataset tool expects. Writers hand samples over with their classes spread evenly (`dlscale.data.mixing`), so
every shard holds every class in proportion; samples are shuffled inside each shard, and each shard's class counts
are recorded beside its sample count (`shards info` lists them; `shards verify` checks them and warns on a shard of
one class).

Writes are atomic: everything goes to a hidden sibling directory that is renamed into place at the end, so a crash
or Ctrl-C never leaves a dataset that looks complete; the next writer removes what a killed one left (`partial`), and
a full disk is a `DiskFullError` naming the directory and the sizes.

A manifest is data from outside: its shard names must be plain ``<split>-NNNNNN.tar`` file names, so a crafted one
cannot make a reader leave the dataset directory (``../x.tar``, an absolute path) or smuggle shell syntax into a
``pipe:`` URL.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlscale.formats import FORMAT_VERSION, format_version
from dlscale.data.classes import CLASSES, SPLITS
from dlscale.data.partial import OWNER, claim, disk_full_reported, partial_dir, remove_stale_partials
from dlscale.data.tario import BLOCK, CorruptShardError, add_member, iter_records, npy_from_buffer
from dlscale.io import write_json, write_text

FORMAT = "dlscale-shards/1"
MANIFEST = "manifest.json"
SHARD_NAME = re.compile(r"(?P<split>[a-z]+)-[0-9]{6,}\.tar")   # what `shard_name` writes
log = logging.getLogger(__name__)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def check_output_dir(out_dir: Path) -> None:
    """Refuse an output directory that exists and is not empty (it may hold another dataset's shards)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a directory")
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if held:
        what = "a dataset" if any(n.endswith(".tar") or n == MANIFEST for n in held) else "files"
        raise ValueError(f"{out_dir}: already holds {what} ({', '.join(held[:3])}{' ...' if len(held) > 3 else ''}); "
                         "choose a new output directory or delete this one")


@dataclass
class _SplitState:
    buffer: list[tuple[np.ndarray, int, dict]] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)
    class_counts: Counter = field(default_factory=Counter)


class DatasetWriter:
    """Write samples into shards + manifest; use as a context manager so an error leaves nothing behind.

    >>> with DatasetWriter(out, image_shape=(1, 64, 64), source={"kind": "simulator"}) as w:
    ...     w.add_batch("train", images, labels, metas)
    """

    def __init__(self, out_dir: Path | str, image_shape: tuple[int, ...], source: dict, shard_size: int = 2048,
                 samples_per_record: int = 256, seed: int = 0, classes: tuple[str, ...] = CLASSES):
        if shard_size < 1 or samples_per_record < 1:
            raise ValueError(f"shard_size ({shard_size}) and samples_per_record ({samples_per_record}) must be >= 1")
        self.out_dir = Path(out_dir)
        check_output_dir(self.out_dir)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.source, self.classes = source, tuple(classes)
        self.shard_size, self.samples_per_record = shard_size, samples_per_record
        self.rng = np.random.default_rng(seed)
        self.mtime = int(time.time())
        self.splits: dict[str, _SplitState] = {}
        self.rejected: list[dict] = []
        self.tmp_dir = partial_dir(self.out_dir)
        self.written = 0                 # shard bytes in tmp_dir so far

    def __enter__(self) -> "DatasetWriter":
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.out_dir.parent)
        with disk_full_reported(self.out_dir.parent, f"the partial directory {self.tmp_dir}", BLOCK, 0):
            claim(self.tmp_dir)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def add(self, split: str, image: np.ndarray, label: int, meta: dict) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {SPLITS}")
        if tuple(image.shape) != self.image_shape:
            raise ValueError(f"{meta.get('source_file', 'sample')}: image shape {tuple(image.shape)}, "
                             f"expected {self.image_shape}")
        if not 0 <= int(label) < len(self.classes):
            raise ValueError(f"label {label} outside 0..{len(self.classes) - 1}")
        state = self.splits.setdefault(split, _SplitState())
        state.buffer.append((np.asarray(image, dtype=np.float32), int(label), meta))
        state.class_counts[self.classes[int(label)]] += 1
        if len(state.buffer) >= self.shard_size:
            self._flush(split)

    def add_batch(self, split: str, images: np.ndarray, labels: np.ndarray, metas: list[dict]) -> None:
        if not len(images) == len(labels) == len(metas):
            raise ValueError(f"add_batch: {len(images)} images, {len(labels)} labels, {len(metas)} metas")
        for image, label, meta in zip(images, labels, metas):
            self.add(split, image, int(label), meta)

    def reject(self, path: str, reason: str) -> None:
        """Record a source file left out (written to rejected.json)."""
        self.rejected.append({"file": path, "reason": reason})

    def _flush(self, split: str) -> None:
        state = self.splits[split]
        samples = [state.buffer[i] for i in self.rng.permutation(len(state.buffer))]
        state.buffer = []
        name = shard_name(split, len(state.shards))
        path = self.tmp_dir / name
        step = self.samples_per_record
        members = [(f"{split}-{len(state.shards):06d}-{r:06d}.{suffix}", data)
                   for r, start in enumerate(range(0, len(samples), step))
                   for suffix, data in self._record_members(samples[start:start + step])]
        needed = sum(BLOCK + -(-len(data) // BLOCK) * BLOCK for _, data in members) + 2 * BLOCK
        with disk_full_reported(self.out_dir.parent, f"shard {name} of {self.out_dir}", needed, self.written), \
                open(path, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for member, data in members:
                    add_member(tar, member, data, self.mtime)
            f.flush()
            os.fsync(f.fileno())
        self.written += path.stat().st_size
        held = Counter(label for _, label, _ in samples)
        state.shards.append({"name": name, "samples": len(samples), "records": -(-len(samples) // step),
                             "class_counts": {c: held.get(i, 0) for i, c in enumerate(self.classes)},
                             "bytes": path.stat().st_size, "sha256": sha256_file(path)})

    def _record_members(self, chunk: list[tuple[np.ndarray, int, dict]]) -> list[tuple[str, bytes]]:
        if self.samples_per_record == 1:
            image, label, meta = chunk[0]
            return [("image.npy", npy_bytes(image)), ("cls", str(label).encode()), ("json", json.dumps(meta).encode())]
        return [("images.npy", npy_bytes(np.stack([c[0] for c in chunk]))),
                ("labels.npy", npy_bytes(np.array([c[1] for c in chunk], dtype=np.int64))),
                ("meta.json", json.dumps([c[2] for c in chunk]).encode())]

    def _finish(self) -> None:
        for split, state in self.splits.items():
            if state.buffer:
                self._flush(split)
        if not any(s.shards for s in self.splits.values()):
            raise ValueError(f"{self.out_dir}: no samples to write")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "record_layout": self.record_layout(),
            "classes": list(self.classes),
            "image_shape": list(self.image_shape),
            "dtype": "float32",
            "splits": {split: {"samples": sum(s["samples"] for s in st.shards),
                               "class_counts": {c: st.class_counts.get(c, 0) for c in self.classes},
                               "shards": st.shards}
                       for split, st in sorted(self.splits.items(), key=lambda kv: SPLITS.index(kv[0]))},
            "source": self.source,
            "rejected": len(self.rejected),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        rejected = json.dumps(self.rejected, indent=1)
        with disk_full_reported(self.out_dir.parent, f"the manifest of {self.out_dir}",
                                len(json.dumps(manifest, indent=1)) + len(rejected), self.written):
            if self.rejected:
                write_text(self.tmp_dir / "rejected.json", rejected)
            write_json(self.tmp_dir / MANIFEST, manifest)
        (self.tmp_dir / OWNER).unlink()
        if self.out_dir.is_dir():   # an empty directory the user made beforehand
            check_output_dir(self.out_dir)
            self.out_dir.rmdir()
        os.replace(self.tmp_dir, self.out_dir)
        self.manifest = manifest

    def record_layout(self) -> dict:
        if self.samples_per_record == 1:
            return {"kind": "sample", "samples_per_record": 1,
                    "members": {"image.npy": "float32 (C,H,W)", "cls": "class index (ascii)", "json": "metadata"}}
        return {"kind": "stacked", "samples_per_record": self.samples_per_record,
                "members": {"images.npy": "float32 (n,C,H,W)", "labels.npy": "int64 (n,)",
                            "meta.json": "list of n metadata dicts"}}


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_manifest(data_dir: Path | str) -> dict:
    """Read and check a dataset's manifest.json."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {data_dir} a dataset made by `dlscale pack` or "
                                "`dlscale simulate`?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    format_version(manifest, str(path))   # absent: written before versions were recorded (still loads)
    for key in ("record_layout", "classes", "image_shape", "splits"):
        if key not in manifest:
            raise ValueError(f"{path}: missing key {key!r}")
    check_shard_entries(manifest["splits"], path)
    return manifest


def check_shard_entries(splits: object, path: Path) -> None:
    """Every split is a known one and lists its shards by plain `<split>-NNNNNN.tar` names, each once."""
    if not isinstance(splits, dict):
        raise ValueError(f"{path}: 'splits' is a {type(splits).__name__}, expected an object of split -> info")
    seen: set[str] = set()
    for split, info in splits.items():
        if split not in SPLITS:
            raise ValueError(f"{path}: split {split!r}: expected one of {SPLITS}")
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            raise ValueError(f"{path}: splits.{split}: expected an object with a 'shards' list")
        _need_count(info, "samples", f"{path}: splits.{split}")
        _need_counts(info.get("class_counts"), f"{path}: splits.{split}.class_counts")
        for i, shard in enumerate(shards):
            name = shard.get("name") if isinstance(shard, dict) else None
            match = SHARD_NAME.fullmatch(name) if isinstance(name, str) else None
            if match is None or match["split"] != split or name in seen:
                why = "listed twice" if name in seen else f"expected a plain file name like {shard_name(split, i)!r}"
                raise ValueError(f"{path}: splits.{split}.shards[{i}] name {name!r}: {why}")
            seen.add(name)
            for key in ("samples", "records"):
                _need_count(shard, key, f"{path}: splits.{split}.shards[{i}] ({name})")
            if "class_counts" in shard:     # absent from manifests written before shards recorded them
                _need_counts(shard["class_counts"], f"{path}: splits.{split}.shards[{i}] ({name}).class_counts")
            if not isinstance(shard.get("sha256"), str):
                raise ValueError(f"{path}: splits.{split}.shards[{i}] ({name}) sha256 {shard.get('sha256')!r}: "
                                 "expected a hex string")


def _need_counts(counts: object, where: str) -> None:
    if not isinstance(counts, dict):
        raise ValueError(f"{where}: expected an object of class -> count")
    for name in counts:
        _need_count(counts, name, where)


def _need_count(entry: dict, key: str, where: str) -> None:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where}: {key} = {value!r}: expected an integer >= 0")


def decode_record(record: dict[str, np.ndarray], layout: dict, image_shape: tuple[int, ...], n_classes: int,
                  where: str, with_meta: bool = True) -> tuple[np.ndarray, np.ndarray, list[dict] | None]:
    """Decode one tar record (no pickle): images (n,C,H,W) float32, labels (n,) int64, metas or None."""
    try:
        if layout["kind"] == "sample":
            images = npy_from_buffer(record["image.npy"], where)[None]
            labels = np.array([int(bytes(record["cls"]))], dtype=np.int64)
            metas = [json.loads(bytes(record["json"]))] if with_meta else None
        else:
            images = npy_from_buffer(record["images.npy"], where)
            labels = npy_from_buffer(record["labels.npy"], where)
            metas = json.loads(bytes(record["meta.json"])) if with_meta else None
    except (KeyError, ValueError, EOFError, OSError) as err:
        raise CorruptShardError(f"{where}: record does not decode ({type(err).__name__}: {err})") from None
    if images.dtype != np.float32 or tuple(images.shape[1:]) != tuple(image_shape) or labels.shape != images.shape[:1]:
        raise CorruptShardError(f"{where}: images {images.dtype} {images.shape} / labels {labels.shape}, expected "
                                f"float32 (n,{','.join(map(str, image_shape))}) and (n,)")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise CorruptShardError(f"{where}: label outside 0..{n_classes - 1}")
    if metas is not None and len(metas) != len(labels):
        raise CorruptShardError(f"{where}: {len(metas)} metadata entries for {len(labels)} samples")
    return images, labels, metas


def verify(data_dir: Path | str) -> list[str]:
    """Recompute every shard's checksum and contents and compare them with the manifest: samples, records and
    per-class counts per shard, samples and per-class counts per split. Return the problems found (empty list =
    dataset intact); a shard of one class in a split of several is logged as a warning (intact, but it starves a
    rank, a worker or the linear probe of the other classes)."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    classes = manifest["classes"]
    problems = []
    for split, info in manifest["splits"].items():
        where = f"{data_dir / MANIFEST}: split {split!r}"
        listed = sum(shard["samples"] for shard in info["shards"])
        if info["samples"] != listed:
            problems.append(f"{where}: {info['samples']} samples, but its shard entries add up to {listed}")
        unknown = sorted(set(info["class_counts"]) - set(classes))
        if unknown:
            problems.append(f"{where}: class_counts names {unknown}, not among the classes {classes}")
        claimed = {c: info["class_counts"].get(c, 0) for c in classes}
        held: Counter = Counter()
        readable = True
        several = sum(1 for n in claimed.values() if n) > 1
        for shard in info["shards"]:
            labels = _verify_shard(data_dir / shard["name"], shard, manifest, problems)
            readable = readable and labels is not None
            held.update(labels.tolist() if labels is not None else ())
            if several and labels is not None and len(np.unique(labels)) == 1:
                log.warning("%s: holds only class %r (%d samples) in split %r of classes %s; rewrite the dataset "
                            "with this dlscale (pack / simulate spread every class over every shard)",
                            data_dir / shard["name"], classes[int(labels[0])], len(labels), split,
                            {c: n for c, n in claimed.items() if n})
        found = {c: held.get(i, 0) for i, c in enumerate(classes)}
        if readable and found != claimed:
            problems.append(f"{where}: its shards hold per class {found}, the manifest says {claimed}")
        elif not readable and sum(claimed.values()) != info["samples"]:
            problems.append(f"{where}: class_counts add up to {sum(claimed.values())}, not to its "
                            f"{info['samples']} samples")
    return problems


def _verify_shard(path: Path, shard: dict, manifest: dict, problems: list[str]) -> np.ndarray | None:
    """Check one shard against its manifest entry, adding to `problems`; its labels, or None if it cannot be read."""
    if not path.is_file():
        problems.append(f"{path}: missing")
        return None
    if sha256_file(path) != shard["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest")
    shape, n_classes = tuple(manifest["image_shape"]), len(manifest["classes"])
    labels, records = [], 0
    try:
        with open(path, "rb") as f:
            for key, record in iter_records(f, str(path)):
                _, record_labels, _ = decode_record(record, manifest["record_layout"], shape, n_classes,
                                                    f"{path}:{key}")
                labels.append(record_labels)
                records += 1
    except CorruptShardError as err:
        problems.append(str(err))
        return None
    found = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    if (len(found), records) != (shard["samples"], shard["records"]):
        problems.append(f"{path}: {len(found)} samples in {records} records, manifest says "
                        f"{shard['samples']} in {shard['records']}")
    if "class_counts" in shard:
        classes = manifest["classes"]
        counted = {c: int(n) for c, n in zip(classes, np.bincount(found, minlength=n_classes))}
        claimed = {c: shard["class_counts"].get(c, 0) for c in classes}
        if counted != claimed or set(shard["class_counts"]) - set(classes):
            problems.append(f"{path}: holds per class {counted}, the manifest says {shard['class_counts']}")
    return found


def summary_table(manifest: dict) -> str:
    """Counts per split and class as an aligned text table."""
    classes = manifest["classes"]
    rows = [["split", "shards", *classes, "total"]]
    for split, info in manifest["splits"].items():
        rows.append([split, str(len(info["shards"])), *(str(info["class_counts"].get(c, 0)) for c in classes),
                     str(info["samples"])])
    return _aligned(rows)


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def info_text(data_dir: Path | str) -> str:
    manifest = load_manifest(data_dir)
    src = manifest.get("source", {})
    lines = [f"dataset   {data_dir}", f"format    {manifest['format']} ({manifest['record_layout']['kind']} records, "
             f"{manifest['record_layout']['samples_per_record']} samples each)",
             f"images    {'x'.join(map(str, manifest['image_shape']))} {manifest.get('dtype', 'float32')}",
             f"source    {json.dumps(src)[:200]}", f"created   {manifest.get('created', '?')}",
             f"rejected  {manifest.get('rejected', 0)} source files", "", summary_table(manifest), "",
             shard_table(manifest)]
    return "\n".join(lines)


def shard_table(manifest: dict) -> str:
    """Samples per shard and class as an aligned text table ("-" where the manifest predates per-shard counts)."""
    classes = manifest["classes"]
    rows = [["shard", "samples", *classes]]
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            counts = shard.get("class_counts")
            rows.append([shard["name"], str(shard["samples"]),
                         *(str(counts.get(c, 0)) if counts is not None else "-" for c in classes)])
    return _aligned(rows)
