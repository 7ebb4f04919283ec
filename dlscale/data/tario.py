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

BLOCK = 512


class CorruptShardError(ValueError):
    """A shard that is truncated, has a bad header, or holds a record that does not decode."""


def add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _read_exact(stream: BinaryIO, n: int, where: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise CorruptShardError(f"{where}: truncated (wanted {n} bytes, got {len(data)})")
    return data


def iter_members(stream: BinaryIO, where: str) -> Iterator[tuple[str, bytes]]:
    """Yield (name, data) of the regular files of a tar stream, in order."""
    long_name = None
    while True:
        header = stream.read(BLOCK)
        if len(header) == 0 or header == bytes(BLOCK):
            return
        if len(header) != BLOCK:
            raise CorruptShardError(f"{where}: truncated header")
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as err:
            raise CorruptShardError(f"{where}: bad tar header ({err})") from None
        data = _read_exact(stream, info.size, where)
        _read_exact(stream, -info.size % BLOCK, where)
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type == tarfile.XHDTYPE:
            for line in data.decode("utf-8", "surrogateescape").splitlines():
                key, _, value = line.partition(" ")[2].partition("=")
                if key == "path":
                    long_name = value
        elif info.isreg():
            yield (long_name or info.name), data
            long_name = None


def iter_records(stream: BinaryIO, where: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members by WebDataset key (basename up to its first dot): yield (key, {suffix: bytes})."""
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
