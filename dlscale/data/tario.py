"""Minimal, fast tar record I/O for shards.

Writing goes through `tarfile` (USTAR, fixed mtime, so shards are ordinary tars that `webdataset` reads). Reading
parses the 512-byte headers with `tarfile.TarInfo.frombuf` but streams the member bytes itself: `tarfile`'s stream
mode (what WebDataset uses) parses ~20k samples/s here, a plain sequential reader ~10x that, and it works the same
on local files and on `pipe:` streams.
"""
from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

BLOCK = 512


class CorruptShardError(ValueError):
    """A shard that is truncated, has a bad header, or holds a record that does not decode."""


def add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _read_exact(stream: BinaryIO, n: int, where: str) -> np.ndarray:
    """Read exactly n bytes into a fresh writable uint8 buffer (arrays then view it without another copy)."""
    data = np.empty(n, dtype=np.uint8)   # unlike bytearray(n), not zero-filled first
    view, got = memoryview(data), 0
    while got < n:   # pipes may return short reads
        step = stream.readinto(view[got:])
        if not step:
            raise CorruptShardError(f"{where}: truncated (wanted {n} bytes, got {got})")
        got += step
    return data


class ReadIntoAdapter:
    """Give `readinto` to file-like objects that only `read` (e.g. webdataset's gopen pipes)."""

    def __init__(self, stream):
        self.stream = stream

    def read(self, n: int) -> bytes:
        return self.stream.read(n)

    def readinto(self, buffer) -> int:
        chunk = self.stream.read(len(buffer))
        buffer[:len(chunk)] = chunk
        return len(chunk)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()


def npy_from_buffer(data: np.ndarray, where: str) -> np.ndarray:
    """View a .npy member as a numpy array without copying; object dtypes (pickle) are refused."""
    f = io.BytesIO(data[:4096].tobytes())
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
    except ValueError as err:
        raise CorruptShardError(f"{where}: not a .npy member ({err})") from None
    if dtype.hasobject:
        raise CorruptShardError(f"{where}: object array refused (shards never hold pickles)")
    count = int(np.prod(shape))
    if len(data) - f.tell() != count * dtype.itemsize:
        raise CorruptShardError(f"{where}: .npy payload of {len(data) - f.tell()} bytes, expected {count * dtype.itemsize}")
    return np.frombuffer(data, dtype, count, f.tell()).reshape(shape, order="F" if fortran else "C")


def iter_members(stream: BinaryIO, where: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, data as a uint8 array) of the regular files of a tar stream, in order."""
    long_name = None
    while True:
        header = stream.read(BLOCK)
        if header == bytes(BLOCK):
            return
        if len(header) != BLOCK:   # a shard cut at a member boundary ends without the end-of-archive block
            raise CorruptShardError(f"{where}: truncated ({'no end-of-archive block' if not header else 'partial header'})")
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as err:
            raise CorruptShardError(f"{where}: bad tar header ({err})") from None
        data = _read_exact(stream, info.size, where)
        _read_exact(stream, -info.size % BLOCK, where)
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.tobytes().rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type == tarfile.XHDTYPE:
            for line in data.tobytes().decode("utf-8", "surrogateescape").splitlines():
                key, _, value = line.partition(" ")[2].partition("=")
                if key == "path":
                    long_name = value
        elif info.isreg():
            yield (long_name or info.name), data
            long_name = None


def iter_records(stream: BinaryIO, where: str) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Group consecutive members by WebDataset key (basename up to its first dot): yield (key, {suffix: data})."""
    key, record = None, {}
    for name, data in iter_members(stream, where):
        prefix, _, base = name.rpartition("/")
        stem, _, suffix = base.partition(".")
        member_key = f"{prefix}/{stem}" if prefix else stem
        if member_key != key:
            if record:
                yield key, record
            key, record = member_key, {}
        record[suffix] = data
    if record:
        yield key, record
