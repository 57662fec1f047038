"""A dataset's peak memory in a benchmark: the process's resident set (the kernel's high-water
mark, reset per dataset where Linux allows it) and, on CUDA, torch's peak allocation."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

from ..files import MB


class PeakMemory:
    """Peak resident memory of this process (and of its GPU) while inside the ``with`` block.

    On Linux the kernel's high-water mark is reset on entry (``/proc/self/clear_refs``), so each
    dataset reports its own peak; elsewhere it is the peak since the process started
    (``since_start``).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.rss_mb: float | None = None
        self.gpu_mb: float | None = None
        self.since_start = False

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.since_start = True
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc_info) -> None:
        self.rss_mb = round(_peak_rss_bytes(self.since_start) / MB, 1)
        if self.device.startswith("cuda"):
            self.gpu_mb = round(torch.cuda.max_memory_allocated(self.device) / MB, 1)


def _peak_rss_bytes(since_start: bool) -> float:
    if not since_start:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere
