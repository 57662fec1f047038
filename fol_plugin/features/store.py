"""Disk-backed, memory-mapped, ragged store of FoL local features, written incrementally.

Layout of a store folder:

- ``meta.json``: format, descriptor dimension and dtype, and the number of image ids.
- ``descriptors.bin``: every image's descriptors [N_i, D] concatenated (float16 or float32).
- ``keypoints.bin``: their keypoints [N_i, 2] float32, (x, y) in network-input pixels.
- ``entries.commits``: one int64 record (image id, first row, rows, checksum of the image's
  descriptor and keypoint bytes) per stored image, appended and fsynced after its data, so a
  record never points at missing data.
- ``.lock``: held by the one writer (fcntl).

Opening a store verifies every record against the data (bounds and checksum): an image whose
data is truncated, zero-padded or altered is reported and left out, so it is computed again;
nothing damaged is read. A writer (``mode="a"``) also cuts what an interruption left
half-written, then appends. A reader (``mode="r"``) never writes: opened beside a writer, it
sees the images whose records were complete when it opened. Reads are memory-mapped: RAM does
not grow with the number of stored images beyond a small index (16 bytes per image id).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..cache.integrity import COMMITS_SUFFIX, CommitLog, checksum, fsync_append
from ..cache.lock import DirectoryLock
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


class LocalFeatureStore:
    """Ragged local features of images addressed by integer ids in ``[0, num_ids)``.

    Args:
        folder: the store's folder; created when missing, reopened (and resumed) when present.
        num_ids: size of the id space (e.g. the number of database images).
        dim: descriptor dimension.
        dtype: "float16" (default, half the disk) or "float32" (bit-exact descriptors).
        mode: "a" to add images (one writer at a time; others are refused), "r" to read only.
    """

    def __init__(
        self, folder: str | os.PathLike, num_ids: int, dim: int = 128, dtype: str = "float16", mode: str = "a"
    ) -> None:
        if dtype not in STORE_DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose one of {STORE_DTYPES}")
        if mode not in STORE_MODES:
            raise ValueError(f"mode={mode!r}; choose one of {STORE_MODES}")
        self.folder = Path(folder)
        self.mode = mode
        self.num_ids, self.dim, self.dtype = int(num_ids), int(dim), np.dtype(dtype)
        self._lock = None
        if mode == "a":
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock = DirectoryLock(self.folder, LOCK_FILE, f"the local-feature store {self.folder}")
            self._lock.acquire()
        self._check_meta({"format": STORE_FORMAT, "num_ids": self.num_ids, "dim": self.dim, "dtype": dtype})
        self._descriptors_path = self.folder / "descriptors.bin"
        self._keypoints_path = self.folder / "keypoints.bin"
        self._entries = CommitLog(self.folder / f"entries{COMMITS_SUFFIX}", ENTRY_FIELDS)
        self._start = np.full(self.num_ids, -1, np.int64)
        self._count = np.zeros(self.num_ids, np.int64)
        self._rows = self._recover()
        self._descriptor_map: np.ndarray | None = None
        self._keypoint_map: np.ndarray | None = None

    def _check_meta(self, meta: dict) -> None:
        meta_path = self.folder / META_FILE
        if not meta_path.exists():
            if self.mode == "r":
                raise FileNotFoundError(f"{self.folder} holds no local-feature store ({META_FILE} is missing)")
            meta_path.write_text(json.dumps(meta))
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

    def _data_files(self) -> list[tuple[Path, int]]:
        """The data files with their bytes per row."""
        return [
            (self._descriptors_path, self.dim * self.dtype.itemsize),
            (self._keypoints_path, 2 * np.dtype(KEYPOINT_DTYPE).itemsize),
        ]

    def _recover(self) -> int:
        """Index the intact records; report damaged ones. A writer also cuts partial writes and
        drops damaged records. Returns the row where new data goes."""
        began = time.perf_counter()
        records = self._entries.read()
        available = min(
            path.stat().st_size // row_bytes if path.exists() else 0 for path, row_bytes in self._data_files()
        )
        descriptors = _memmap(self._descriptors_path, self.dtype, (available, self.dim))
        keypoints = _memmap(self._keypoints_path, KEYPOINT_DTYPE, (available, 2))
        intact = np.zeros(len(records), bool)
        damaged: dict[str, list[int]] = {}
        for index, (image_id, start, count, expected) in enumerate(records):
            if not (0 <= image_id < self.num_ids and 0 <= start and 0 <= count):
                problem = "an impossible record"
            elif start + count > available:
                problem = "missing data (truncated files)"
            elif checksum(descriptors[start : start + count], keypoints[start : start + count]) != expected:
                problem = "a checksum mismatch (altered or zero-padded data)"
            else:
                intact[index] = True
                self._start[image_id], self._count[image_id] = start, count
                continue
            damaged.setdefault(problem, []).append(int(image_id))
        for problem, image_ids in damaged.items():
            shown = ", ".join(map(str, image_ids[:MAX_LISTED_IDS])) + (" ..." if len(image_ids) > MAX_LISTED_IDS else "")
            logger.warning(
                "%s: %d image(s) with %s, left out so they are computed again: ids %s",
                self.folder, len(image_ids), problem, shown,
            )
        kept = records[intact]
        end = int((kept[:, 1] + kept[:, 2]).max()) if len(kept) else 0
        if self.mode == "a":
            if damaged:
                temporary = self._entries.path.with_suffix(".tmp")
                temporary.unlink(missing_ok=True)
                fsync_append(temporary, [kept])
                os.replace(temporary, self._entries.path)
            else:
                self._entries.keep(len(records))  # drop a partial record
            for path, row_bytes in self._data_files():
                path.touch()
                os.truncate(path, end * row_bytes)
        if len(records):
            logger.debug("Verified %d images of %s in %.2f s", len(records), self.folder, time.perf_counter() - began)
        return end

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
        descriptor_arrays = [d.detach().cpu().numpy().astype(self.dtype) for d in descriptors]
        keypoint_arrays = [k.detach().cpu().numpy().astype(KEYPOINT_DTYPE) for k in keypoints]
        counts = [len(array) for array in descriptor_arrays]
        starts = self._rows + np.cumsum([0, *counts[:-1]], dtype=np.int64)
        sums = [checksum(d, k) for d, k in zip(descriptor_arrays, keypoint_arrays)]
        fsync_append(self._descriptors_path, descriptor_arrays)
        fsync_append(self._keypoints_path, keypoint_arrays)
        records = np.stack(
            [np.asarray(image_ids, np.int64), starts, np.asarray(counts, np.int64), np.asarray(sums, np.int64)], axis=1
        )
        self._entries.append(records)
        self._start[records[:, 0]], self._count[records[:, 0]] = starts, records[:, 2]
        self._rows += int(sum(counts))
        self._descriptor_map = self._keypoint_map = None

    def _maps(self) -> tuple[np.ndarray, np.ndarray]:
        if self._descriptor_map is None:
            self._descriptor_map = _memmap(self._descriptors_path, self.dtype, (self._rows, self.dim))
            self._keypoint_map = _memmap(self._keypoints_path, KEYPOINT_DTYPE, (self._rows, 2))
        return self._descriptor_map, self._keypoint_map

    def _span(self, image_id: int) -> slice:
        if image_id not in self:
            raise KeyError(f"image id {image_id} is not in the local-feature store {self.folder}")
        start = int(self._start[image_id])
        return slice(start, start + int(self._count[image_id]))

    def __getitem__(self, image_id: int) -> torch.Tensor:
        """Descriptors [N, D] float32 of one image."""
        return torch.from_numpy(np.array(self._maps()[0][self._span(image_id)], dtype=np.float32))

    def keypoints(self, image_id: int) -> torch.Tensor:
        """Keypoints [N, 2] float32 of one image."""
        return torch.from_numpy(np.array(self._maps()[1][self._span(image_id)]))

    def bytes_per_image(self) -> float:
        """Mean disk bytes per stored image (descriptors, keypoints and index record)."""
        stored = len(self)
        total = sum(path.stat().st_size for path in (self._descriptors_path, self._keypoints_path, self._entries.path))
        return total / stored if stored else 0.0


def _memmap(path: Path, dtype: np.dtype, shape: tuple[int, int]) -> np.ndarray:
    if shape[0] == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


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
