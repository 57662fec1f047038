"""Per-stage wall-clock times that survive a resume.

A run interrupted after hours of extraction and resumed would otherwise report the resumed
process's minutes only. :class:`StageClock` keeps the seconds of each stage in
``<output_dir>/cache/timings.json``, adds each process's own time to them as a stage ends (or is
interrupted), and counts the processes that worked on the cache: ``recalls.json`` holds the sums
(``timings_s``) and that count (``timings_runs``, more than 1 after a resume), which the report and
the benchmark tables show. Under torchrun rank 0 keeps the clock.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..files import DamagedFileError, read_json, write_json

logger = logging.getLogger(__name__)

TIMINGS_FILE = "timings.json"
SECONDS_DIGITS = 3


class StageClock:
    """Seconds per stage summed over every process that worked on one cache."""

    def __init__(self, cache: Path | None) -> None:
        """``cache``: the run's cache folder (None: a clock kept in memory only, as on ranks > 0)."""
        self.path = None if cache is None else Path(cache) / TIMINGS_FILE
        record: dict = {}
        if self.path is not None and self.path.exists():
            try:
                record = read_json(self.path, fix="it is rewritten")
            except DamagedFileError as error:
                logger.warning("%s; the earlier processes' times are lost, this one's are counted", error)
        self.seconds: dict[str, float] = {str(k): float(v) for k, v in dict(record.get("seconds", {})).items()}
        self.runs = int(record.get("runs", 0)) + 1
        self._save()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times the block as stage ``name``, added to its earlier seconds even if interrupted."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + spent, SECONDS_DIGITS)
            logger.info("%s: %.1f s", name, spent)
            self._save()

    def summary(self) -> dict:
        """``timings_s`` (stage -> seconds, summed) and ``timings_runs`` for ``recalls.json``."""
        return {"timings_s": dict(self.seconds), "timings_runs": self.runs}

    def _save(self) -> None:
        if self.path is not None:
            write_json(self.path, {"seconds": self.seconds, "runs": self.runs})
