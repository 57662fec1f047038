"""Disk-backed, memory-mapped, ragged store of FoL local features, written incrementally.

Layout of a store folder:

- ``meta.json``: descriptor dimension and dtype, and the number of image ids.
- ``descriptors.bin``: every image's descriptors [N_i, D] concatenated (float16 or float32).
- ``keypoints.bin``: their keypoints [N_i, 2] float32, (x, y) in network-input pixels.
- ``entries.bin``: one int64 record (image id, first row, rows) per stored image, appended after
  its data is on disk, so a record never points at missing data.

Opening an existing store keeps every complete record and cuts whatever an interruption left
half-written, so extraction resumes where it stopped without recomputing or corrupting stored
images. Reads are memory-mapped: RAM does not grow with the number of stored images beyond a
small index (16 bytes per image id).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

STORE_DTYPES = ("float16", "float32")
KEYPOINT_DTYPE = np.float32
ENTRY_FIELDS = 3  # image id, first row, number of rows
ENTRY_BYTES = ENTRY_FIELDS * 8
META_FILE = "meta.json"


class LocalFeatureStore:
    """Ragged local features of images addressed by integer ids in ``[0, num_ids)``.

    Args:
        folder: the store's folder; created when missing, reopened (and resumed) when present.
        num_ids: size of the id space (e.g. the number of database images).
        dim: descriptor dimension.
        dtype: "float16" (default, half the disk) or "float32" (bit-exact descriptors).
    """

    def __init__(self, folder: str | os.PathLike, num_ids: int, dim: int = 128, dtype: str = "float16") -> None:
        if dtype not in STORE_DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose one of {STORE_DTYPES}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"num_ids": int(num_ids), "dim": int(dim), "dtype": dtype}
        meta_path = self.folder / META_FILE
        if meta_path.exists():
            stored = json.loads(meta_path.read_text())
            if stored != meta:
                raise ValueError(
                    f"the local-feature store in {self.folder} was written with {stored}, not {meta}; "
                    f"use another folder or delete this one"
                )
        else:
            meta_path.write_text(json.dumps(meta))
        self.num_ids, self.dim, self.dtype = int(num_ids), int(dim), np.dtype(dtype)
        self._descriptors_path = self.folder / "descriptors.bin"
        self._keypoints_path = self.folder / "keypoints.bin"
        self._entries_path = self.folder / "entries.bin"
        self._start = np.full(self.num_ids, -1, np.int64)
        self._count = np.zeros(self.num_ids, np.int64)
        self._rows = self._recover()
        self._descriptor_map: np.ndarray | None = None
        self._keypoint_map: np.ndarray | None = None

    def _recover(self) -> int:
        """Load the complete records; cut partial records and data past the last one."""
        for path in (self._entries_path, self._descriptors_path, self._keypoints_path):
            path.touch()
        complete = self._entries_path.stat().st_size // ENTRY_BYTES
        os.truncate(self._entries_path, complete * ENTRY_BYTES)
        entries = np.fromfile(self._entries_path, dtype=np.int64).reshape(-1, ENTRY_FIELDS)
        rows = 0
        for image_id, start, count in entries:
            if start != rows or not 0 <= image_id < self.num_ids:
                raise ValueError(f"{self._entries_path} is corrupt (record {image_id}, {start}, {count}); delete {self.folder}")
            self._start[image_id], self._count[image_id] = start, count
            rows += count
        os.truncate(self._descriptors_path, rows * self.dim * self.dtype.itemsize)
        os.truncate(self._keypoints_path, rows * 2 * np.dtype(KEYPOINT_DTYPE).itemsize)
        return rows

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
        counts = [len(image_descriptors) for image_descriptors in descriptors]
        starts = self._rows + np.cumsum([0, *counts[:-1]], dtype=np.int64)[: len(counts)]
        _append(self._descriptors_path, [d.detach().cpu().numpy().astype(self.dtype) for d in descriptors])
        _append(self._keypoints_path, [k.detach().cpu().numpy().astype(KEYPOINT_DTYPE) for k in keypoints])
        records = np.stack([np.asarray(image_ids, np.int64), starts, np.asarray(counts, np.int64)], axis=1)
        _append(self._entries_path, [records])
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
        total = sum(path.stat().st_size for path in (self._descriptors_path, self._keypoints_path, self._entries_path))
        return total / stored if stored else 0.0


def _append(path: Path, arrays: list[np.ndarray]) -> None:
    with open(path, "ab") as handle:
        for array in arrays:
            handle.write(np.ascontiguousarray(array).tobytes())
        handle.flush()
        os.fsync(handle.fileno())


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
