"""Row arrays on disk that survive interruptions, take several writers, and cannot be silently wrong.

An array is an ``.npy`` file, pre-allocated at creation and filled in parts (a batch of images,
a query's scores) in any order. Each writer (a process of a distributed run; ``writer=0`` in a
plain run) has its own commit log, ``<name>.commits`` for writer 0 and ``<name>.<writer>.commits``
for the others, with one record (first row, end row, checksum of those rows) per part, appended
after the part's bytes are durable. Writers therefore never write the same bytes or the same log.

Opening verifies the file's size and the checksum of every record that touches the rows the
opener is responsible for (``rows``): rows whose record is damaged (truncated, zero-padded or
altered data) are reported and computed again; nothing damaged is reused. A later run with
another number of processes reuses every intact part, whoever wrote it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..cache.integrity import (
    COMMITS_SUFFIX,
    CommitLog,
    checksum,
    checksum_of_ranges,
    preallocate,
    read_into,
)
from ..files import check_target, open_in_place

logger = logging.getLogger(__name__)

COMMIT_FIELDS = 3  # first row, end row, checksum of the part


def commit_log_path(path: Path, writer: int) -> Path:
    """The commit log of ``writer`` for the array file ``path``."""
    return path.with_suffix(COMMITS_SUFFIX if writer == 0 else f".{writer}{COMMITS_SUFFIX}")


class ResumableArray:
    """An .npy file filled in parts; :meth:`todo` lists the rows still to compute.

    Args:
        path: the .npy file; created (and its disk reserved) when missing, verified and resumed
            when present. With several writers, one creates it before the others open it.
        shape: [N, ...] rows and their shape.
        dtype: element type.
        rows: the rows this writer is responsible for (all by default): the rows it verifies
            and may write.
        writer: this writer's number (its commit log).

    Raises:
        ValueError: the file holds another shape or dtype (it belongs to another run).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: tuple[int, ...],
        dtype: str | np.dtype = np.float32,
        rows: range | None = None,
        writer: int = 0,
    ) -> None:
        self.path = Path(path)
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self.rows = range(self.shape[0]) if rows is None else rows
        if self.rows.step != 1 or not 0 <= self.rows.start <= self.rows.stop <= self.shape[0]:
            raise ValueError(f"rows {self.rows} are not a contiguous part of the {self.shape[0]} rows of {self.path}")
        self.writer = writer
        self._log = CommitLog(commit_log_path(self.path, writer), COMMIT_FIELDS)
        self._done = np.zeros(self.shape[0], bool)
        header = _read_header(self.path) if self.path.exists() else None
        if header is None:
            self._create()
        else:
            self._reopen(*header)

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for log in self._log_paths():
            log.unlink()  # records of an earlier file are void
        self._log.keep(0)
        check_target(self.path)  # numpy opens the file itself: never through a link
        array = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=self.shape)
        preallocate(self.path, array.offset + array.nbytes)
        self._offset = array.offset
        del array
        self.array = np.lib.format.open_memmap(self.path, mode="r")

    def _reopen(self, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> None:
        if tuple(shape) != self.shape or np.dtype(dtype) != self.dtype:
            raise ValueError(
                f"{self.path} holds {tuple(shape)} {np.dtype(dtype)}, not {self.shape} {self.dtype}: it is from "
                f"another run; use another --output_dir or delete it"
            )
        size = self.path.stat().st_size
        expected = offset + int(np.prod(self.shape)) * self.dtype.itemsize
        if size < expected:  # the missing rows are recomputed below, never read as zeros
            logger.warning("%s is truncated (%d of %d bytes)", self.path, size, expected)
        preallocate(self.path, expected)  # also where a creation was cut before its disk was reserved
        self._offset = offset
        self.array = np.lib.format.open_memmap(self.path, mode="r")
        self._verify(valid_bytes=size - offset)

    def _log_paths(self) -> list[Path]:
        """The commit logs of every writer of this file that exist."""
        first = commit_log_path(self.path, 0)
        others = sorted(self.path.parent.glob(f"{self.path.stem}.*{COMMITS_SUFFIX}"))
        return ([first] if first.exists() else []) + others

    def _logs(self) -> list[CommitLog]:
        """Every writer's commit log of this file, this writer's first."""
        others = [CommitLog(path, COMMIT_FIELDS) for path in self._log_paths() if path != self._log.path]
        return [self._log, *others]

    def _verify(self, valid_bytes: int) -> None:
        """Mark the rows of intact records that touch ``self.rows``; drop this writer's damaged records."""
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        descriptor = os.open(self.path, os.O_RDONLY)  # read with pread: nothing stays resident
        try:
            for log in self._logs():
                self._verify_log(log, descriptor, row_bytes, valid_bytes)
        finally:
            os.close(descriptor)

    def _verify_log(self, log: CommitLog, descriptor: int, row_bytes: int, valid_bytes: int) -> None:
        """Mark the intact records of one commit log (see :meth:`_verify`)."""
        records = log.read()
        intact = np.ones(len(records), bool)
        for index, (begin, end, expected) in enumerate(records):
            begin, end = int(begin), int(end)
            if not 0 <= begin < end <= len(self.array):
                problem = f"an impossible commit record (rows {begin}-{end})"
            elif end <= self.rows.start or begin >= self.rows.stop:
                continue  # another writer's rows: verified by that writer
            elif end * row_bytes > valid_bytes:
                problem = "missing bytes (truncated file)"
            elif (
                checksum_of_ranges([(descriptor, self._offset + begin * row_bytes, (end - begin) * row_bytes)])
                != expected
            ):
                problem = "a checksum mismatch (altered or zero-padded data)"
            else:
                self._done[begin:end] = True
                continue
            intact[index] = False
            logger.warning("%s: rows %d-%d are damaged (%s); computing them again", self.path, begin, end - 1, problem)
        if log is not self._log:
            return
        if intact.all():
            self._log.keep(len(records))  # drops a partial record
        else:
            self._log.rewrite(records[intact])

    def todo(self) -> list[range]:
        """The runs of rows in ``self.rows`` still to compute, in order."""
        missing = np.flatnonzero(~self._done[self.rows.start : self.rows.stop]) + self.rows.start
        if len(missing) == 0:
            return []
        breaks = np.flatnonzero(np.diff(missing) != 1) + 1
        return [range(int(run[0]), int(run[-1]) + 1) for run in np.split(missing, breaks)]

    @property
    def complete(self) -> bool:
        """Whether every row of ``self.rows`` is computed."""
        return bool(self._done[self.rows.start : self.rows.stop].all())

    def write(self, start: int, values: np.ndarray) -> None:
        """Write ``values`` [n, ...] at rows ``[start, start + n)`` of ``self.rows``, make them
        durable, then commit them with their checksum."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        end = start + len(values)
        if values.shape[1:] != self.shape[1:] or not self.rows.start <= start < end <= self.rows.stop:
            raise ValueError(
                f"cannot write {values.shape} at row {start} of {self.path}: rows {self.rows} of {self.shape} are this "
                "writer's"
            )
        row_bytes = values.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        descriptor = open_in_place(self.path, os.O_WRONLY)
        try:
            os.pwrite(descriptor, values.tobytes(), self._offset + start * row_bytes)
            os.fdatasync(descriptor)
        finally:
            os.close(descriptor)
        self._log.append(np.array([[start, end, checksum(values)]]))
        self._done[start:end] = True


class RowFile:
    """Rows ``rows`` of an .npy file [N, ...], read with ``pread`` into fresh arrays, never
    memory-mapped: reading a file larger than RAM chunk by chunk keeps RAM at one chunk.

    ``file[a:b]`` is rows ``rows.start + a`` to ``rows.start + b``, as an ndarray.
    """

    def __init__(self, path: str | os.PathLike, rows: range | None = None) -> None:
        self.path = Path(path)
        header = _read_header(self.path)
        if header is None:
            raise ValueError(f"{self.path} is not a readable .npy file")
        shape, self.dtype, self._offset = header
        self.rows = range(shape[0]) if rows is None else rows
        self.shape = (len(self.rows), *shape[1:])
        self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise ValueError("RowFile reads contiguous rows only")
        count = max(stop - start, 0)
        out = np.empty((count, *self.shape[1:]), self.dtype)
        if out.size == 0:
            return out
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            return read_into(descriptor, out, self._offset + (self.rows.start + start) * self._row_bytes, self.path)
        finally:
            os.close(descriptor)


def _read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """(shape, dtype, data offset) of an .npy file, or None (with a warning) when its header is damaged."""
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(handle)
        except (ValueError, OSError) as error:
            logger.warning("%s has a damaged header (%s): computing it again", path, error)
            return None
        return tuple(shape), np.dtype(dtype), handle.tell()
