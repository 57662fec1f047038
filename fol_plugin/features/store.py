"""Disk-backed, ragged store of FoL local features, written incrementally by one or more writers
(the processes of a distributed run).

Layout of a store folder (writer 0's files have no number, writer ``w``'s carry ``.<w>`` before
their extension):

- ``meta.json``: format, descriptor dimension and dtype, and the number of image ids.
- ``descriptors[.w].bin``: the writer's images' descriptors [N_i, D] concatenated (float16 or float32).
- ``keypoints[.w].bin``: their keypoints [N_i, 2] float32, (x, y) in network-input pixels.
- ``entries[.w].commits``: one int64 record (image id, first row, rows, checksum of the image's
  descriptor and keypoint bytes) per stored image, appended and fsynced after its data, so a
  record never points at missing data.
- ``.lock[.w]``: held by the writer (fcntl).

Opening a store verifies every record of every writer against the data (bounds and checksum):
an image whose data is truncated, zero-padded or altered is reported and left out, so it is
computed again; nothing damaged is read. A writer (``mode="a"``) also cuts what an interruption
left half-written in its own files, then appends. A reader sees the images whose records were
complete when it opened, or when it last called :meth:`LocalFeatureStore.refresh`. Verifying
and reading use ``pread``, never a memory map: RAM holds the small index (18 bytes per image id)
and what is being read, whatever the size of the store.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..cache.integrity import COMMITS_SUFFIX, CommitLog, checksum, checksum_of_ranges, fsync_append, read_into
from ..cache.lock import DirectoryLock
from ..files import write_text
from ..options import STORE_DTYPES

logger = logging.getLogger(__name__)

STORE_FORMAT = 2
KEYPOINT_DTYPE = np.float32
ENTRY_FIELDS = 4  # image id, first row, number of rows, checksum
ENTRY_BYTES = ENTRY_FIELDS * 8
META_FILE = "meta.json"
LOCK_FILE = ".lock"
STORE_MODES = ("a", "r")
MAX_LISTED_IDS = 10


class _Part:
    """The files of one writer of a store, and how far its verified records reach."""

    def __init__(self, folder: Path, writer: int) -> None:
        suffix = "" if writer == 0 else f".{writer}"
        self.writer = writer
        self.descriptors = folder / f"descriptors{suffix}.bin"
        self.keypoints = folder / f"keypoints{suffix}.bin"
        self.entries = CommitLog(folder / f"entries{suffix}{COMMITS_SUFFIX}", ENTRY_FIELDS)
        self.lock_file = f"{LOCK_FILE}{suffix}"
        self.records_read = 0  # records of the entries log indexed so far
        self.rows = 0  # data rows covered by the intact records


class LocalFeatureStore:
    """Ragged local features of images addressed by integer ids in ``[0, num_ids)``.

    Args:
        folder: the store's folder; created when missing, reopened (and resumed) when present.
        num_ids: size of the id space (e.g. the number of database images).
        dim: descriptor dimension.
        dtype: "float16" (default, half the disk) or "float32" (bit-exact descriptors).
        mode: "a" to add images (one writer per ``writer`` number; others are refused), "r" to
            read only.
        writer: with ``mode="a"``, the files this writer appends to (a distributed run's rank).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        num_ids: int,
        dim: int = 128,
        dtype: str = "float16",
        mode: str = "a",
        writer: int = 0,
    ) -> None:
        if dtype not in STORE_DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose one of {STORE_DTYPES}")
        if mode not in STORE_MODES:
            raise ValueError(f"mode={mode!r}; choose one of {STORE_MODES}")
        self.folder = Path(folder)
        self.mode = mode
        self.num_ids, self.dim, self.dtype = int(num_ids), int(dim), np.dtype(dtype)
        self._own = _Part(self.folder, writer)
        self._lock = None
        if mode == "a":
            self.folder.mkdir(parents=True, exist_ok=True)
            name = "the local-feature store" if writer == 0 else f"writer {writer} of the local-feature store"
            self._lock = DirectoryLock(self.folder, self._own.lock_file, f"{name} {self.folder}")
            self._lock.acquire()
        self._check_meta({"format": STORE_FORMAT, "num_ids": self.num_ids, "dim": self.dim, "dtype": dtype})
        self._parts: dict[int, _Part] = {}
        self._start = np.full(self.num_ids, -1, np.int64)
        self._count = np.zeros(self.num_ids, np.int64)
        self._writer_of = np.zeros(self.num_ids, np.int16)
        began = time.perf_counter()
        checked = self.refresh()
        if checked:
            logger.debug("Verified %d images of %s in %.2f s", checked, self.folder, time.perf_counter() - began)

    def _check_meta(self, meta: dict) -> None:
        meta_path = self.folder / META_FILE
        if not meta_path.exists():
            if self.mode == "r":
                raise FileNotFoundError(f"{self.folder} holds no local-feature store ({META_FILE} is missing)")
            write_text(meta_path, json.dumps(meta))
            return
        try:
            stored = json.loads(meta_path.read_text())
        except ValueError as error:
            raise ValueError(f"{meta_path} is damaged ({error}); delete {self.folder} to compute it again") from None
        if stored != meta:
            raise ValueError(
                f"the local-feature store in {self.folder} was written with {stored}, not {meta}; "
                f"use another folder or delete this one"
            )

    def close(self) -> None:
        """Release the writer's lock (reading stays possible)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> LocalFeatureStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _row_bytes(self) -> tuple[int, int]:
        """Bytes per row of the descriptor and keypoint files."""
        return self.dim * self.dtype.itemsize, 2 * np.dtype(KEYPOINT_DTYPE).itemsize

    def _writers(self) -> list[int]:
        """The writers whose entries log exists, and this store's own writer."""
        found = {self._own.writer}
        for path in self.folder.glob(f"entries*{COMMITS_SUFFIX}"):
            number = path.name[len("entries") : -len(COMMITS_SUFFIX)].lstrip(".")
            if number == "" or number.isdigit():
                found.add(int(number or 0))
        return sorted(found)

    def refresh(self) -> int:
        """Index the records other writers committed since the last look, verifying each;
        returns the number of records checked. (A writer's own records are indexed as it adds them.)"""
        checked = 0
        for writer in self._writers():
            if writer not in self._parts:
                self._parts[writer] = self._own if writer == self._own.writer else _Part(self.folder, writer)
                checked += self._index(self._parts[writer], own=writer == self._own.writer and self.mode == "a")
            elif writer != self._own.writer or self.mode == "r":
                checked += self._index(self._parts[writer], own=False)
        return checked

    def _index(self, part: _Part, own: bool) -> int:
        """Index ``part``'s new intact records; report damaged ones. A writer opening its own
        part also cuts partial writes and drops damaged records."""
        records = part.entries.read()
        new = records[part.records_read :]
        if not len(new):
            if own:
                self._cut(part, records, np.ones(len(records), bool))
            return 0
        sizes = [path.stat().st_size if path.exists() else 0 for path in (part.descriptors, part.keypoints)]
        available = min(size // row_bytes for size, row_bytes in zip(sizes, self._row_bytes()))
        descriptor_bytes, keypoint_bytes = self._row_bytes()
        files = [os.open(path, os.O_RDONLY) if available else -1 for path in (part.descriptors, part.keypoints)]
        intact = np.ones(len(records), bool)
        damaged: dict[str, list[int]] = {}
        try:
            for index, (image_id, start, count, expected) in enumerate(new, start=part.records_read):
                if not (0 <= image_id < self.num_ids and 0 <= start and 0 <= count):
                    problem = "an impossible record"
                elif start + count > available:
                    problem = "missing data (truncated files)"
                elif checksum_of_ranges([
                    (files[0], int(start) * descriptor_bytes, int(count) * descriptor_bytes),
                    (files[1], int(start) * keypoint_bytes, int(count) * keypoint_bytes),
                ]) != expected:
                    problem = "a checksum mismatch (altered or zero-padded data)"
                else:
                    if self._start[image_id] < 0:  # the first intact copy of an image is the one read
                        self._start[image_id], self._count[image_id] = start, count
                        self._writer_of[image_id] = part.writer
                    part.rows = max(part.rows, int(start + count))
                    continue
                intact[index] = False
                damaged.setdefault(problem, []).append(int(image_id))
        finally:
            for descriptor in files:
                if descriptor >= 0:
                    os.close(descriptor)
        for problem, image_ids in damaged.items():
            shown = ", ".join(map(str, image_ids[:MAX_LISTED_IDS])) + (" ..." if len(image_ids) > MAX_LISTED_IDS else "")
            logger.warning(
                "%s: %d image(s) with %s, left out so they are computed again: ids %s",
                self.folder, len(image_ids), problem, shown,
            )
        if own:
            self._cut(part, records, intact)
        part.records_read = len(records)
        return len(new)

    def _cut(self, part: _Part, records: np.ndarray, intact: np.ndarray) -> None:
        """Keep the intact records of this writer's own part and cut its data after them."""
        if intact.all():
            part.entries.keep(len(records))  # drops a partial record
        else:
            part.entries.rewrite(records[intact])
        for path, row_bytes in zip((part.descriptors, part.keypoints), self._row_bytes()):
            path.touch()
            os.truncate(path, part.rows * row_bytes)

    def __contains__(self, image_id: int) -> bool:
        return bool(self._start[image_id] >= 0)

    def __len__(self) -> int:
        return int((self._start >= 0).sum())

    def missing(self, image_ids: np.ndarray) -> np.ndarray:
        """The ids among ``image_ids`` not stored yet, in their given order."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        return image_ids[self._start[image_ids] < 0]

    def add(self, image_ids: list[int], descriptors: list[torch.Tensor], keypoints: list[torch.Tensor]) -> None:
        """Append images: per image, descriptors [N_i, D] and keypoints [N_i, 2]. The batch is
        durable once this returns (one fsync per file and batch)."""
        if self.mode != "a" or self._lock is None:
            raise ValueError(f"the local-feature store {self.folder} is open read-only (or closed); open it with mode='a'")
        for image_id, image_descriptors, image_keypoints in zip(image_ids, descriptors, keypoints, strict=True):
            if not 0 <= image_id < self.num_ids:
                raise ValueError(f"image id {image_id} is outside [0, {self.num_ids}) of the store {self.folder}")
            if image_id in self:
                raise ValueError(f"image id {image_id} is already in the store {self.folder}")
            if image_descriptors.ndim != 2 or image_descriptors.shape[1] != self.dim or tuple(image_keypoints.shape) != (
                len(image_descriptors),
                2,
            ):
                raise ValueError(
                    f"expected descriptors [N, {self.dim}] and keypoints [N, 2], got "
                    f"{tuple(image_descriptors.shape)} and {tuple(image_keypoints.shape)}"
                )
        if not image_ids:
            return
        part = self._own
        descriptor_arrays = [d.detach().cpu().numpy().astype(self.dtype) for d in descriptors]
        keypoint_arrays = [k.detach().cpu().numpy().astype(KEYPOINT_DTYPE) for k in keypoints]
        counts = [len(array) for array in descriptor_arrays]
        starts = part.rows + np.cumsum([0, *counts[:-1]], dtype=np.int64)
        sums = [checksum(d, k) for d, k in zip(descriptor_arrays, keypoint_arrays)]
        fsync_append(part.descriptors, descriptor_arrays)
        fsync_append(part.keypoints, keypoint_arrays)
        records = np.stack(
            [np.asarray(image_ids, np.int64), starts, np.asarray(counts, np.int64), np.asarray(sums, np.int64)], axis=1
        )
        part.entries.append(records)
        part.records_read += len(records)
        self._start[records[:, 0]], self._count[records[:, 0]] = starts, records[:, 2]
        self._writer_of[records[:, 0]] = part.writer
        part.rows += int(sum(counts))

    def _read(self, image_id: int, keypoints: bool) -> np.ndarray:
        """One image's descriptors [N, D] (store dtype) or keypoints [N, 2], read with pread."""
        if image_id not in self:
            raise KeyError(f"image id {image_id} is not in the local-feature store {self.folder}")
        part = self._parts[int(self._writer_of[image_id])]
        path, dtype, width = (part.keypoints, KEYPOINT_DTYPE, 2) if keypoints else (part.descriptors, self.dtype, self.dim)
        out = np.empty((int(self._count[image_id]), width), dtype)
        descriptor = os.open(path, os.O_RDONLY)
        try:
            return read_into(descriptor, out, int(self._start[image_id]) * width * np.dtype(dtype).itemsize, path)
        finally:
            os.close(descriptor)

    def __getitem__(self, image_id: int) -> torch.Tensor:
        """Descriptors [N, D] float32 of one image."""
        return torch.from_numpy(self._read(image_id, keypoints=False).astype(np.float32, copy=False))

    def keypoints(self, image_id: int) -> torch.Tensor:
        """Keypoints [N, 2] float32 of one image."""
        return torch.from_numpy(self._read(image_id, keypoints=True))

    def bytes_per_image(self) -> float:
        """Mean disk bytes per stored image (descriptors, keypoints and index records)."""
        stored = len(self)
        files = [path for part in self._parts.values() for path in (part.descriptors, part.keypoints, part.entries.path)]
        total = sum(path.stat().st_size for path in files if path.exists())
        return total / stored if stored else 0.0


class InMemoryFeatures:
    """The same reading interface as :class:`LocalFeatureStore`, held in RAM (small runs)."""

    def __init__(self) -> None:
        self._descriptors: dict[int, torch.Tensor] = {}
        self._keypoints: dict[int, torch.Tensor] = {}

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._descriptors

    def __len__(self) -> int:
        return len(self._descriptors)

    def missing(self, image_ids: np.ndarray) -> np.ndarray:
        image_ids = np.asarray(image_ids, dtype=np.int64)
        return np.array([i for i in image_ids if int(i) not in self._descriptors], dtype=np.int64)

    def add(self, image_ids: list[int], descriptors: list[torch.Tensor], keypoints: list[torch.Tensor]) -> None:
        for image_id, image_descriptors, image_keypoints in zip(image_ids, descriptors, keypoints, strict=True):
            self._descriptors[int(image_id)] = image_descriptors.detach().float().cpu()
            self._keypoints[int(image_id)] = image_keypoints.detach().float().cpu()

    def __getitem__(self, image_id: int) -> torch.Tensor:
        return self._descriptors[int(image_id)]

    def keypoints(self, image_id: int) -> torch.Tensor:
        return self._keypoints[int(image_id)]
