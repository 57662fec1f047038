"""What verifying a cache costs: reopening a multi-GB cache (a local-feature store and a global
descriptor array) verifies every committed part's checksum.

Run with ``python -m pytest benchmarks/test_cache_verification.py`` (not part of the default
test run; it writes about 4 GB under the temporary folder). ``extra_info`` carries the cache
size, the verification time warm (files in the page cache) and cold (caches dropped, where this
process may), and its ratio to plainly reading the same bytes (the floor), measured in
alternated pairs, median of the pairs; and the write time of the same cache for scale.
"""
from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fol_plugin.features import LocalFeatureStore, ResumableArray
from fol_plugin.models import GLOBAL_DIM

STORE_IMAGES = 1500
CELLS = 3400  # local features per image at 322x322
GLOBAL_ROWS = 40_000
BATCH = 16
PAIRS = 3


def _read_bytes(folder: Path) -> int:
    """The floor: read every file of ``folder`` once, without hashing."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                while chunk := handle.read(16 * 2**20):
                    total += len(chunk)
    return total


def _drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def cache(scratch) -> tuple[Path, float]:
    """A ~4 GB cache written as a run writes it (batches of 16); returns it and the write seconds
    (removed after the module)."""
    folder = scratch
    block = torch.randn(CELLS + BATCH, 128, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with LocalFeatureStore(folder / "store", STORE_IMAGES, dtype="float32") as store:
        for first in range(0, STORE_IMAGES, BATCH):
            ids = list(range(first, min(first + BATCH, STORE_IMAGES)))
            store.add(ids, [block[i % BATCH : i % BATCH + CELLS] for i in ids], [torch.zeros(CELLS, 2)] * len(ids))
    array = ResumableArray(folder / "database_global.npy", (GLOBAL_ROWS, GLOBAL_DIM))
    rows = np.random.default_rng(0).standard_normal((BATCH, GLOBAL_DIM)).astype(np.float32)
    for first in range(0, GLOBAL_ROWS, BATCH):
        array.write(first, rows[: GLOBAL_ROWS - first])
    return folder, time.perf_counter() - start


def _verify(folder: Path) -> None:
    store = LocalFeatureStore(folder / "store", STORE_IMAGES, dtype="float32", mode="r")
    array = ResumableArray(folder / "database_global.npy", (GLOBAL_ROWS, GLOBAL_DIM))
    assert len(store) == STORE_IMAGES and array.complete


def test_verification_cost_of_a_multi_gb_cache(benchmark, cache, report):
    folder, write_seconds = cache
    size = _read_bytes(folder)
    pairs = []
    for _ in range(PAIRS):  # warm: both sides read from the page cache
        start = time.perf_counter()
        _read_bytes(folder)
        read_seconds = time.perf_counter() - start
        start = time.perf_counter()
        _verify(folder)
        pairs.append((time.perf_counter() - start, read_seconds))
    benchmark.pedantic(_verify, args=(folder,), rounds=1, warmup_rounds=0)
    cold = None
    if _drop_page_cache():
        start = time.perf_counter()
        _verify(folder)
        cold = time.perf_counter() - start
    verify_warm = statistics.median(v for v, _ in pairs)
    benchmark.extra_info.update({
        "cache_GB": round(size / 1e9, 2),
        "write_s": round(write_seconds, 2),
        "verify_warm_s": round(verify_warm, 2),
        "verify_warm_GB_per_s": round(size / 1e9 / verify_warm, 2),
        "verify_vs_plain_read_median": round(statistics.median(v / r for v, r in pairs), 2),
        "verify_vs_plain_read_range": [round(min(v / r for v, r in pairs), 2), round(max(v / r for v, r in pairs), 2)],
        "verify_cold_s": None if cold is None else round(cold, 2),
        "verify_vs_write": round(verify_warm / write_seconds, 3),
    })
    info = benchmark.extra_info
    report(
        f"verifying a {info['cache_GB']} GB cache takes {info['verify_warm_s']} s warm "
        f"({info['verify_vs_plain_read_median']}x a plain read), {info['verify_cold_s']} s cold; writing it {info['write_s']} s"
    )
