"""Re-ranking speed: FoL's exact engine against the original algorithm and against its own bare
bf16 products.

Run with ``python -m pytest benchmarks/test_rerank_speed.py`` (not part of the default test run;
about three minutes on 2 CPU cores). One query against 100 candidates of ~3,400 cells, two
workloads: noisy subsets of the shared reference images' real FoL local features, with noise of
30% and of 5% of the features' spread (synthetic stand-ins when ../shared is absent).

Three sides are timed: the original algorithm, following its code path (padding to 3600 cells,
one batched product, arg-max both ways, the loop over candidates: ``tests/original_protocol.py``);
``mutual_match_scores``; and ``engine.bf16_products``, the engine's bf16 products alone on the
same candidates, workers and buffers (the floor of this design). All are warmed up, then timed in
5 rounds, the order rotating from round to round. ``extra_info`` carries the medians of the
per-round ratios ``original / engine`` and ``engine / bare products`` with their ranges, the
seconds per query of each side, the number of scores identical to the original's (all of them)
and the host (``conftest.describe_host``); the summary line says the same with the host's kind.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
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
from fol_plugin.rerank.engine import bf16_products
from tests.original_protocol import original_scores

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


@pytest.fixture(scope="module")
def features() -> tuple[str, list[torch.Tensor]]:
    """(where the features come from, the features)."""
    real = fixture_local_features()
    if real is not None:
        return "shared reference features", real
    return "synthetic stand-ins", synthetic_local_features(torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(NOISE))
def workload(request, features):
    """One query and 100 candidates of ~3,400 cells: noisy subsets of the features."""
    source, cells = features
    generator = torch.Generator().manual_seed(0)
    candidates = []
    for k in range(NUM_CANDIDATES):
        base = cells[k % len(cells)]
        picks = torch.randperm(len(base), generator=generator)[: min(len(base), 3300 + k % 150)]
        noise = NOISE[request.param] * base.std() * torch.randn(len(picks), base.shape[1], generator=generator)
        candidates.append(F.normalize(base[picks] + noise, dim=-1))
    query = cells[0]
    original_scores(query, candidates)  # warm-up: the first run also pays its 5 GB tensor's page faults
    name = f"{source} + {NOISE[request.param]:.0%} noise"
    return {"name": name, "query": query, "candidates": candidates, "original": original_scores(query, candidates)}


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


def test_original_algorithm(benchmark, workload, report):
    scores = benchmark.pedantic(original_scores, args=(workload["query"], workload["candidates"]), rounds=1)
    report(f"{workload['name']}: {benchmark.stats.stats.median:.2f} s per query of {len(workload['candidates'])} candidates")
    assert torch.equal(scores, workload["original"])


def test_fol_engine(benchmark, workload, report):
    query, candidates, original = workload["query"], workload["candidates"], workload["original"]
    scores = benchmark.pedantic(mutual_match_scores, args=(query, candidates), rounds=3, warmup_rounds=1)
    query_bf16, candidates_bf16 = query.bfloat16(), [candidate.bfloat16() for candidate in candidates]
    bf16_products(query_bf16, candidates_bf16)  # warm-up
    seconds = alternated_seconds(
        {
            "original": lambda: original_scores(query, candidates),
            "engine": lambda: mutual_match_scores(query, candidates),
            "bare_products": lambda: bf16_products(query_bf16, candidates_bf16),
        },
        ROUNDS,
    )
    vs_original = ratio_summary(seconds["original"], seconds["engine"])
    vs_products = ratio_summary(seconds["engine"], seconds["bare_products"])
    identical = int((scores == original).sum())
    benchmark.extra_info.update(
        workload=workload["name"],
        seconds_per_query={name: round(statistics.median(values), 3) for name, values in seconds.items()},
        speedup_vs_original_median=vs_original[0],
        speedup_vs_original_range=list(vs_original[1:]),
        engine_over_bare_products_median=vs_products[0],
        engine_over_bare_products_range=list(vs_products[1:]),
        identical_scores=identical,
    )
    report(
        f"{workload['name']}: {vs_original[0]}x the original ({vs_original[1]}-{vs_original[2]}), "
        f"{vs_products[0]}x its bare bf16 products ({vs_products[1]}-{vs_products[2]}); "
        f"{statistics.median(seconds['engine']):.3f} s per query of {len(candidates)} candidates; "
        f"{identical}/{len(candidates)} scores identical"
    )
    assert torch.equal(scores, original)
