"""Re-ranking speed: FoL's exact engine against the original algorithm and against its own bare
screen products, on every kind of CPU this host can compute as.

Run with ``python -m pytest benchmarks/test_rerank_speed.py`` (not part of the default test run;
about four minutes per kind on 2 CPU cores). One query against 100 candidates of ~3,400 cells,
two workloads: noisy subsets of the shared reference images' real FoL local features, with noise
of 30% and of 5% of the features' spread (synthetic stand-ins when ../shared is absent).

Each kind (``conftest.kinds_here``: this host's own, natively, and each kind below it, emulated)
runs in a process of its own (``python -m benchmarks.test_rerank_speed WORKLOAD``), where three
sides are timed: the original algorithm, following its code path (padding to 3600 cells, one
batched product, arg-max both ways, the loop over candidates: ``tests/original_protocol.py``);
``mutual_match_scores`` with the kind's own screen product (:func:`fol_plugin.host.screen_product`);
and ``engine.screen_products``, that screen's products alone on the same candidates, panels,
workers and buffers (the floor of this design). All are warmed up, then timed in 5 rounds, the
order rotating from round to round. ``extra_info`` carries the medians of the per-round ratios
``original / engine`` and ``engine / bare products`` with their ranges, the seconds per query of
each side, the number of scores identical to the original's (all of them), the screen product
and the host; the summary line says the same with the kind, native or emulated.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fol_plugin.data import normalize
from fol_plugin.models import FoLModel
from fol_plugin.rerank import mutual_match_scores
from fol_plugin.host import screen_product
from fol_plugin.rerank.engine import SCREEN_DTYPES, screen_products
from tests.original_protocol import original_scores

from .conftest import describe_process, run_as_kind

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"

NUM_CANDIDATES = 100
ROUNDS = 5
NOISE = {"noise30": 0.3, "noise5": 0.05}  # workload: noise added to the features, x their spread


def fixture_local_features() -> list[torch.Tensor] | None:
    """Local features of the shared reference images under the reference weights, if present."""
    folder = FIXTURES / "parity-vitb-322"
    if not folder.exists():
        return None
    spec = importlib.util.spec_from_file_location("detweights", FIXTURES / "detweights.py")
    detweights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(detweights)
    meta = json.loads((folder / "meta.json").read_text())
    keys = json.loads((FIXTURES / "keys_vitb.json").read_text())
    model = FoLModel("vitb").eval()
    model.load_state_dict(detweights.make_state_dict(keys, meta["seed"]))
    images = np.load(folder / "expected.npz")["images_uint8"]
    with torch.inference_mode():
        return model.extract(normalize(torch.from_numpy(images).float() / 255)).local_descriptors


def synthetic_local_features(generator: torch.Generator) -> list[torch.Tensor]:
    """Stand-ins with shared low-rank directions, so similarities crowd near the top."""
    basis = torch.randn(48, 128, generator=generator)
    return [F.normalize(torch.randn(3400, 48, generator=generator) @ basis, dim=-1) for _ in range(3)]


def features() -> tuple[str, list[torch.Tensor]]:
    """(where the features come from, the features)."""
    real = fixture_local_features()
    if real is not None:
        return "shared reference features", real
    return "synthetic stand-ins", synthetic_local_features(torch.Generator().manual_seed(0))


def workload(noise: str) -> dict:
    """One query and 100 candidates of ~3,400 cells: noisy subsets of the features."""
    source, cells = features()
    generator = torch.Generator().manual_seed(0)
    candidates = []
    for k in range(NUM_CANDIDATES):
        base = cells[k % len(cells)]
        picks = torch.randperm(len(base), generator=generator)[: min(len(base), 3300 + k % 150)]
        spread = NOISE[noise] * base.std() * torch.randn(len(picks), base.shape[1], generator=generator)
        candidates.append(F.normalize(base[picks] + spread, dim=-1))
    return {"name": f"{source} + {NOISE[noise]:.0%} noise", "query": cells[0], "candidates": candidates}


def alternated_seconds(sides: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each side in each of ``rounds`` rounds, the order rotating from round to round."""
    names = list(sides)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            sides[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def ratio_summary(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the per-round ratios, rounded."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return round(statistics.median(ratios), 2), round(min(ratios), 2), round(max(ratios), 2)


def measure(noise: str) -> dict:
    """The three sides on one workload, in this process (its kind is the environment's)."""
    work = workload(noise)
    query, candidates = work["query"], work["candidates"]
    product = screen_product()
    dtype = SCREEN_DTYPES[product]
    query_screen, candidates_screen = query.to(dtype), [candidate.to(dtype) for candidate in candidates]
    original = original_scores(query, candidates)  # warm-up: the first run also pays its 5 GB tensor's page faults
    scores = mutual_match_scores(query, candidates)  # warm-up, and the scores compared
    screen_products(query_screen, candidates_screen)  # warm-up
    seconds = alternated_seconds(
        {
            "original": lambda: original_scores(query, candidates),
            "engine": lambda: mutual_match_scores(query, candidates),
            "bare_products": lambda: screen_products(query_screen, candidates_screen),
        },
        ROUNDS,
    )
    vs_original = ratio_summary(seconds["original"], seconds["engine"])
    vs_products = ratio_summary(seconds["engine"], seconds["bare_products"])
    return {
        "workload": work["name"],
        "candidates": len(candidates),
        "screen_product": product,
        "seconds_per_query": {name: round(statistics.median(values), 3) for name, values in seconds.items()},
        "speedup_vs_original_median": vs_original[0],
        "speedup_vs_original_range": list(vs_original[1:]),
        "engine_over_bare_products_median": vs_products[0],
        "engine_over_bare_products_range": list(vs_products[1:]),
        "identical_scores": int((scores == original).sum()),
        "host": describe_process(),
    }


@pytest.mark.parametrize("noise", list(NOISE))
def test_fol_engine(benchmark, kind, noise, report):
    record = benchmark.pedantic(run_as_kind, args=(kind, __name__, noise), rounds=1)
    benchmark.extra_info.update({key: value for key, value in record.items() if key != "host"})
    report(
        f"{record['workload']}: {record['speedup_vs_original_median']}x the original "
        f"({'-'.join(map(str, record['speedup_vs_original_range']))}), {record['engine_over_bare_products_median']}x its "
        f"bare {record['screen_product']} products ({'-'.join(map(str, record['engine_over_bare_products_range']))}); "
        f"{record['seconds_per_query']['engine']:.3f} s per query of {record['candidates']} candidates (original "
        f"{record['seconds_per_query']['original']:.2f} s); {record['identical_scores']}/{record['candidates']} scores identical",
        record["host"],
    )
    assert record["identical_scores"] == record["candidates"]


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
