"""Integrity of cached work: checksummed commit logs, pre-allocated files, disk-full errors.

Work is committed in parts (a batch of images, a query's scores). A part's data is written and
fsynced first, then one fixed-size record describing it (with a checksum of its bytes) is
appended to a commit log and fsynced. A record therefore never points at missing data; a reader
takes the complete records only, and a verifier recomputes the checksums, so truncation, zero
padding and bit rot are found instead of reused.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import xxhash

from ..files import (  # cache re-exports DiskFullError
    DISK_FULL_ERRNOS, DiskFullError, atomic_write, disk_full_message, free_bytes, open_in_place,
)  # fmt: skip

CHECKSUM_MASK = (1 << 63) - 1  # checksums are kept in int64 records
COMMITS_SUFFIX = ".commits"  # every commit log's name ends so; a non-empty one means finished work


def checksum(*buffers: np.ndarray | bytes) -> int:
    """xxh3-64 of the bytes of ``buffers`` (C-contiguous arrays or bytes), as a non-negative int64."""
    digest = xxhash.xxh3_64()
    for buffer in buffers:
        digest.update(np.ascontiguousarray(buffer) if isinstance(buffer, np.ndarray) else buffer)
    return digest.intdigest() & CHECKSUM_MASK


def read_into(descriptor: int, out: np.ndarray, offset: int, name: os.PathLike | str) -> np.ndarray:
    """Fill the C-contiguous ``out`` with the bytes of the open file ``descriptor`` from
    ``offset`` (``pread``: no memory map, so nothing stays resident once ``out`` is freed)."""
    view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
    while view.nbytes:
        read = os.preadv(descriptor, [view], offset)
        if read == 0:
            raise ValueError(f"{name} ends at byte {offset}, before the data it should hold: it is truncated")
        view, offset = view[read:], offset + read
    return out


def checksum_of_ranges(ranges: list[tuple[int, int, int]], piece_bytes: int = 64 * 2**20) -> int:
    """:func:`checksum` of the bytes ``(descriptor, offset, length)`` of open files, in order,
    read in pieces of at most ``piece_bytes`` (RAM stays at one piece)."""
    digest = xxhash.xxh3_64()
    for descriptor, offset, length in ranges:
        end = offset + length
        while offset < end:
            piece = read_into(descriptor, np.empty(min(piece_bytes, end - offset), np.uint8), offset, f"file {descriptor}")
            digest.update(piece)
            offset += len(piece)
    return digest.intdigest() & CHECKSUM_MASK


def fsync_append(path: Path, chunks: list[np.ndarray | bytes]) -> None:
    """Append ``chunks`` to ``path`` and make them durable before returning."""
    with os.fdopen(open_in_place(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as handle:
        for chunk in chunks:
            handle.write(np.ascontiguousarray(chunk).tobytes() if isinstance(chunk, np.ndarray) else chunk)
        handle.flush()
        os.fsync(handle.fileno())


class CommitLog:
    """An append-only file of int64 records with ``fields`` fields each.

    Only complete records are read: a record cut by an interruption (or being written by
    another process right now) is not there yet.
    """

    def __init__(self, path: str | os.PathLike, fields: int) -> None:
        self.path = Path(path)
        self.fields = fields
        self.record_bytes = fields * 8

    def read(self) -> np.ndarray:
        """The complete records [R, fields] int64."""
        if not self.path.exists():
            return np.zeros((0, self.fields), np.int64)
        with open(self.path, "rb") as handle:
            data = handle.read()
        complete = len(data) // self.record_bytes
        return np.frombuffer(data[: complete * self.record_bytes], np.int64).reshape(complete, self.fields).copy()

    def append(self, records: np.ndarray) -> None:
        """Append [R, fields] records durably."""
        fsync_append(self.path, [np.asarray(records, np.int64).reshape(-1, self.fields)])

    def keep(self, count: int) -> None:
        """Keep the first ``count`` records (drops partial and damaged ones; writers only)."""
        self.path.touch()
        os.truncate(self.path, count * self.record_bytes)

    def rewrite(self, records: np.ndarray) -> None:
        """Replace the log by ``records`` [R, fields], atomically (drops damaged records; writers only)."""
        data = np.ascontiguousarray(records, np.int64).reshape(-1, self.fields).tobytes()
        atomic_write(self.path, lambda handle: handle.write(data))


def preallocate(path: Path, size: int) -> None:
    """Reserve ``size`` bytes of disk for ``path``, so that writes through a memory map cannot
    fail later (a full disk under a memory map is a SIGBUS, not an error)."""
    with os.fdopen(open_in_place(path, os.O_RDWR), "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate
                raise


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it does not exist)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.exists() else 0


def holds_commits(folder: Path) -> bool:
    """Whether any commit log under ``folder`` records finished work."""
    return folder.exists() and any(path.stat().st_size for path in folder.rglob(f"*{COMMITS_SUFFIX}"))


@contextmanager
def disk_full_guard(folder: Path, still_needed: Callable[[], float]) -> Iterator[None]:
    """Turn a full disk under ``folder`` into :class:`DiskFullError` with what to free.

    Args:
        still_needed: bytes the run still has to write, asked when the disk is full.
    """
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        free = free_bytes(folder)
        raise DiskFullError(
            disk_full_message(
                error.filename or folder, still_needed() - free,
                "rerun the same command to resume (everything finished so far is kept)",
            )
        ) from error
