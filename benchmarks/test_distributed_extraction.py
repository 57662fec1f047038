"""One process against two under torchrun: extraction wall time on this machine, same outputs.

Run with ``python -m pytest benchmarks/test_distributed_extraction.py``. ``fol-vpr eval`` with
ViT-B at 322x322 (the shared fixture's weights, from a temporary torch.hub cache) on the toy
set's photos, global retrieval only, as one process and as ``torchrun --nproc_per_node 2``;
the two are alternated over 3 pairs after a warm-up run of each. ``extra_info`` has the median
ratio of the extraction seconds (``features_*`` timings of ``recalls.json``) and of the wall
time, one process over two (above 1: two processes are faster), with their ranges. Both runs
must give the same predictions.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA

PAIRS = 3


@pytest.fixture(scope="module")
def command(parity_torch_home, scratch):
    data = DATA / "toy_dataset"
    if not data.exists():
        pytest.skip("needs ../shared/data/toy_dataset")
    environment = {**os.environ, "TORCH_HOME": str(parity_torch_home)}
    args = [
        "-m",
        "fol_plugin",
        "eval",
        "--backbone",
        "vitb",
        "--database_folder",
        str(data / "database"),
        "--queries_folder",
        str(data / "queries"),
        "--no_labels",
        "--rerank_topk",
        "0",
    ]
    sides = {
        "one": [sys.executable, *args],
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
    }
    return sides, environment, scratch


def _run(sides, environment, folder: Path, side: str, index: int) -> tuple[float, float, np.ndarray]:
    output = folder / f"{side}_{index}"
    began = time.perf_counter()
    subprocess.run([*sides[side], "--output_dir", str(output)], env=environment, check=True, capture_output=True)
    wall = time.perf_counter() - began
    timings = json.loads((output / "recalls.json").read_text())["timings_s"]
    extraction = sum(seconds for stage, seconds in timings.items() if stage.startswith("features_"))
    return wall, extraction, np.load(output / "queries" / "predictions_global.npy")


def test_one_process_against_two(benchmark, command, report):
    sides, environment, folder = command
    _run(sides, environment, folder, "one", -1), _run(sides, environment, folder, "two", -1)  # warm-up
    results = {"one": [], "two": []}
    for pair in range(PAIRS):
        for side in ("one", "two") if pair % 2 == 0 else ("two", "one"):
            results[side].append(_run(sides, environment, folder, side, pair))
    benchmark.pedantic(lambda: None, rounds=1)
    wall = [one[0] / two[0] for one, two in zip(results["one"], results["two"])]
    extraction = [one[1] / two[1] for one, two in zip(results["one"], results["two"])]
    info = benchmark.extra_info
    info["one_process_extraction_s"] = round(statistics.median(r[1] for r in results["one"]), 1)
    info["two_processes_extraction_s"] = round(statistics.median(r[1] for r in results["two"]), 1)
    info["extraction_one_over_two_median"] = round(statistics.median(extraction), 2)
    info["extraction_one_over_two_range"] = [round(min(extraction), 2), round(max(extraction), 2)]
    info["wall_one_over_two_median"] = round(statistics.median(wall), 2)
    info["wall_one_over_two_range"] = [round(min(wall), 2), round(max(wall), 2)]
    for one, two in zip(results["one"], results["two"]):
        np.testing.assert_array_equal(one[2], two[2])
    report(
        f"two processes extract {info['extraction_one_over_two_median']}x as fast as one "
        f"(pairs {info['extraction_one_over_two_range']}; {info['one_process_extraction_s']} s vs "
        f"{info['two_processes_extraction_s']} s), identical predictions"
    )
