"""Row arrays on disk that survive interruptions and cannot be silently wrong.

An array is an ``.npy`` file, pre-allocated at creation, filled in row order through a memory
map, and a commit log ``<name>.commits`` with one record (end row, checksum of the rows since
the previous record) per committed part. Reopening verifies the file's size and every part's
checksum: rows after the first damaged part (truncated, zero-padded or altered) are reported and
computed again; nothing damaged is reused.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..cache.integrity import COMMITS_SUFFIX, CommitLog, checksum, preallocate

logger = logging.getLogger(__name__)

COMMIT_FIELDS = 2  # end row, checksum of the part


class ResumableArray:
    """An .npy file filled in row order; the first ``rows_done`` rows are committed and verified.

    Args:
        path: the .npy file; created (and its disk reserved) when missing, verified and resumed
            when present.
        shape: [N, ...] rows and their shape.
        dtype: element type.

    Raises:
        ValueError: the file holds another shape or dtype (it belongs to another run).
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype: str | np.dtype = np.float32) -> None:
        self.path = Path(path)
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self._log = CommitLog(self.path.with_suffix(COMMITS_SUFFIX), COMMIT_FIELDS)
        header = _read_header(self.path) if self.path.exists() else None
        if header is None:
            self._create()
        else:
            self._reopen(*header)

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._log.keep(0)
        self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=self.shape)
        preallocate(self.path, self.array.offset + self.array.nbytes)
        self.rows_done = 0

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
        self.array = np.lib.format.open_memmap(self.path, mode="r+")
        self.rows_done = self._verify(valid_bytes=size - offset)

    def _verify(self, valid_bytes: int) -> int:
        """Rows covered by intact parts, in order; the log is cut at the first damaged part."""
        records = self._log.read()
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        done = 0
        for index, (end, expected) in enumerate(records):
            end = int(end)
            if not done < end <= len(self.array):
                problem = f"an impossible commit record (rows {done}-{end})"
            elif end * row_bytes > valid_bytes:
                problem = "missing bytes (truncated file)"
            elif checksum(self.array[done:end]) != expected:
                problem = "a checksum mismatch (altered or zero-padded data)"
            else:
                done = end
                continue
            logger.warning(
                "%s: rows %d-%d are damaged (%s); computing rows %d-%d again",
                self.path, done, min(end, len(self.array)) - 1, problem, done, len(self.array) - 1,
            )
            self._log.keep(index)
            return done
        self._log.keep(len(records))  # drop a partial record
        return done

    @property
    def complete(self) -> bool:
        return self.rows_done == len(self.array)

    def commit(self, rows_done: int) -> None:
        """Make rows ``[self.rows_done, rows_done)`` durable, then record them with their checksum."""
        if rows_done <= self.rows_done:
            return
        self.array.flush()
        self._log.append(np.array([[rows_done, checksum(self.array[self.rows_done : rows_done])]]))
        self.rows_done = int(rows_done)


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
