"""Scale: peak RAM of global search and re-ranking as the database grows, and float16 database
descriptors against float32.

Run with ``python -m pytest benchmarks/test_scale_memory.py`` (about 18 GB of temporary disk).
The database is synthetic: 300,000 rows of 8448-d descriptors, ten noisy views of each of
30,000 places, so that nearest neighbours mean something; each measurement runs in a fresh
process and reports its peak RSS (``VmHWM``). ``extra_info`` holds the table of the README:

- search: 100 queries against the first 10 k / 100 k / 300 k rows, read from the .npy file
  chunk by chunk (:class:`fol_plugin.features.RowFile`, 65,536 rows a chunk) as ``fol-vpr eval`` does;
- re-ranking: 20 queries x 100 candidates drawn from local-feature stores of 10 k / 100 k / 300 k
  images (small synthetic entries of 32 cells: the store's index, verification and maps are
  what could grow with its size);
- float16: top-1 / top-10 agreement of the 300 k search on a float16 copy against float32.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fol_plugin.features import LocalFeatureStore, RowFile
from fol_plugin.models import GLOBAL_DIM, LOCAL_DIM
from fol_plugin.retrieval import exact_search

SIZES = (10_000, 100_000, 300_000)
VIEWS_PER_PLACE = 10
QUERIES = 100
WRITE_ROWS = 10_000
STORE_CELLS = 32
RERANK_QUERIES, RERANK_CANDIDATES = 20, 100
K = 10
DATABASE_FILES = (("database.npy", np.float32), ("database16.npy", np.float16))

SEARCH = """
import json, sys, time, numpy as np
from fol_plugin.features import RowFile
from fol_plugin.retrieval import exact_search
path, rows, queries = sys.argv[1], int(sys.argv[2]), np.load(sys.argv[3])
began = time.perf_counter()
exact_search(RowFile(path, range(rows)), queries, 10, progress=False)
seconds = time.perf_counter() - began
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(json.dumps({"seconds": seconds, "peak_rss_mb": int(peak) * 1024 / 1e6}))  # VmHWM is in KiB; MB = 1e6 bytes
"""

RERANK = """
import json, sys, time, numpy as np
from fol_plugin.features import LocalFeatureStore
from fol_plugin.rerank import score_candidates
folder, size = sys.argv[1], int(sys.argv[2])
store = LocalFeatureStore(folder, size, 128, "float16", mode="r")
generator = np.random.default_rng(0)
predictions = generator.integers(0, size, (20, 100))
began = time.perf_counter()
score_candidates(predictions, store, store, 100, progress=False)
seconds = time.perf_counter() - began
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(json.dumps({"seconds": seconds, "peak_rss_mb": int(peak) * 1024 / 1e6}))  # VmHWM is in KiB; MB = 1e6 bytes
"""


@pytest.fixture(scope="module")
def database(scratch):
    """The 300 k-row database (float32 and float16 copies, 15 GB) and 100 queries near random
    places (removed after the module)."""
    folder = scratch / "database"
    folder.mkdir()
    generator = np.random.default_rng(0)
    places = SIZES[-1] // VIEWS_PER_PLACE
    centroids = generator.standard_normal((places, GLOBAL_DIM), np.float32)  # 1 GB in RAM
    # Written chunk by chunk through files, not memory maps: a process's mapped pages count in
    # its RSS, and 15 GB of them would take this machine's RAM.
    rows32, rows16 = (open(_npy(folder / name, dtype), "ab") for name, dtype in DATABASE_FILES)
    with rows32, rows16:
        for start in range(0, SIZES[-1], WRITE_ROWS):
            place = (np.arange(start, start + WRITE_ROWS) // VIEWS_PER_PLACE) % places
            views = centroids[place] + 0.7 * generator.standard_normal((WRITE_ROWS, GLOBAL_DIM), np.float32)
            views /= np.linalg.norm(views, axis=1, keepdims=True)
            rows32.write(views.tobytes())
            rows16.write(views.astype(np.float16).tobytes())
    chosen = generator.integers(0, places // 30, QUERIES)  # places present in every database size
    queries = centroids[chosen] + 0.7 * generator.standard_normal((QUERIES, GLOBAL_DIM), np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    np.save(folder / "queries.npy", queries)
    return folder


def _npy(path, dtype) -> object:
    """``path`` holding the .npy header of a [SIZES[-1], GLOBAL_DIM] array, its rows to append."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": (SIZES[-1], GLOBAL_DIM)}  # fmt: skip
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
    return path


@pytest.fixture(scope="module")
def stores(scratch) -> dict[int, str]:
    """Per database size, a float16 local-feature store of that many images of 32 cells each."""
    root = scratch / "stores"
    generator = torch.Generator().manual_seed(0)
    folders = {}
    for size in SIZES:
        folders[size] = str(root / str(size))
        with LocalFeatureStore(folders[size], size, LOCAL_DIM, "float16") as writer:
            for start in range(0, size, WRITE_ROWS):
                descriptors = F.normalize(torch.randn(WRITE_ROWS, STORE_CELLS, LOCAL_DIM, generator=generator), dim=-1)
                keypoints = torch.rand(WRITE_ROWS, STORE_CELLS, 2, generator=generator)
                writer.add(list(range(start, start + WRITE_ROWS)), list(descriptors), list(keypoints))
    return folders


def _measure(script: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_peak_memory_stays_flat_as_the_database_grows(benchmark, database, stores, report):
    def measure_all() -> dict:
        table = {}
        for size in SIZES:
            search = _measure(SEARCH, str(database / "database.npy"), str(size), str(database / "queries.npy"))
            rerank = _measure(RERANK, stores[size], str(size))
            table[size] = {
                "search_peak_rss_mb": round(search["peak_rss_mb"]),
                "search_s": round(search["seconds"], 1),
                "rerank_peak_rss_mb": round(rerank["peak_rss_mb"]),
                "rerank_s": round(rerank["seconds"], 2),
                "database_gb": round(size * GLOBAL_DIM * 4 / 1e9, 2),
            }
        return table

    table = benchmark.pedantic(measure_all, rounds=1)
    benchmark.extra_info["table"] = table
    largest, smallest = table[SIZES[-1]], table[SIZES[0]]
    # RAM holds one search chunk, not the database: 30x the rows, nowhere near 30x the memory.
    assert largest["search_peak_rss_mb"] < 2 * smallest["search_peak_rss_mb"] + 3000
    assert largest["rerank_peak_rss_mb"] < smallest["rerank_peak_rss_mb"] + 200
    report(
        f"peak RSS {smallest['search_peak_rss_mb']} -> {largest['search_peak_rss_mb']} MB (search) and "
        f"{smallest['rerank_peak_rss_mb']} -> {largest['rerank_peak_rss_mb']} MB (re-ranking) from {SIZES[0]:,} to "
        f"{SIZES[-1]:,} database rows ({smallest['database_gb']} -> {largest['database_gb']} GB)"
    )


def test_float16_database_search_agrees_with_float32(benchmark, database, report):
    queries = np.load(database / "queries.npy")
    reference = exact_search(RowFile(database / "database.npy"), queries, K, progress=False)
    half = benchmark.pedantic(
        exact_search, args=(RowFile(database / "database16.npy"), queries, K), kwargs={"progress": False}, rounds=1
    )
    top1 = float((reference[1][:, 0] == half[1][:, 0]).mean())
    top10 = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(reference[1], half[1])]))
    benchmark.extra_info.update(
        {
            "rows": SIZES[-1],
            "top1_agreement": top1,
            "top10_agreement": top10,
            "max_abs_distance_diff": float(np.abs(reference[0] - half[0]).max()),
            "disk_gb": {
                "float32": round(SIZES[-1] * GLOBAL_DIM * 4 / 1e9, 2),
                "float16": round(SIZES[-1] * GLOBAL_DIM * 2 / 1e9, 2),
            },
        }
    )
    assert top1 >= 0.9
    report(f"float16 database search of {SIZES[-1]:,} rows: top-1 agreement {top1:.3f}, top-10 {top10:.3f} with float32")
