"""Row arrays on disk that survive an interruption: an .npy memory map plus its filled row count."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class ResumableArray:
    """An .npy file filled in row order; ``rows_done`` rows are complete (kept in ``<name>.done``).

    Reopening the same path with the same shape and dtype resumes it; anything else is an error.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype: str | np.dtype = np.float32) -> None:
        self.path = Path(path)
        self._done_path = self.path.with_suffix(".done")
        dtype = np.dtype(dtype)
        if self.path.exists():
            self.array = np.lib.format.open_memmap(self.path, mode="r+")
            if self.array.shape != tuple(shape) or self.array.dtype != dtype:
                raise ValueError(
                    f"{self.path} holds {self.array.shape} {self.array.dtype}, not {tuple(shape)} {dtype}: it is from "
                    f"another run; use another --output_dir or delete it"
                )
            self.rows_done = json.loads(self._done_path.read_text())["rows"] if self._done_path.exists() else 0
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=dtype, shape=tuple(shape))
            self.rows_done = 0

    @property
    def complete(self) -> bool:
        return self.rows_done == len(self.array)

    def commit(self, rows_done: int) -> None:
        """Flush the data, then record that the first ``rows_done`` rows are complete."""
        self.array.flush()
        temporary = self._done_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"rows": int(rows_done)}))
        os.replace(temporary, self._done_path)
        self.rows_done = int(rows_done)
