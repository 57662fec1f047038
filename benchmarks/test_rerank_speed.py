"""Re-ranking speed: FoL's exact engine against the original algorithm.

Run with ``python -m pytest benchmarks`` (not part of the default test run). Both sides are
warmed up, then timed in alternated pairs (the original first in even pairs, ours first in odd
ones); ``extra_info`` carries the median of the per-pair ratios ``original / ours`` and their
range, and the number of scores identical to the original's (all of them). The original algorithm follows its code path: padding to 3600 cells, one batched
product, arg-max both ways, the loop over candidates (``tests/original_protocol.py``).
"""
from __future__ import annotations

import importlib.util
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fol_plugin.data import normalize
from fol_plugin.models import FoLModel
from fol_plugin.rerank import mutual_match_scores
from tests.original_protocol import original_scores

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"

NUM_CANDIDATES = 100
PAIRS = 5


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
def workload():
    """One query and 100 candidates of ~3,400 cells: noisy subsets of real FoL local features
    (the shared reference images; synthetic stand-ins when ../shared is absent)."""
    generator = torch.Generator().manual_seed(0)
    features = fixture_local_features() or synthetic_local_features(generator)
    candidates = []
    for k in range(NUM_CANDIDATES):
        base = features[k % len(features)]
        picks = torch.randperm(len(base), generator=generator)[: min(len(base), 3300 + k % 150)]
        noise = 0.3 * base.std() * torch.randn(len(picks), base.shape[1], generator=generator)
        candidates.append(F.normalize(base[picks] + noise, dim=-1))
    query = features[0]
    original_scores(query, candidates)  # warm-up: the first run also pays its 5 GB tensor's page faults
    return {"query": query, "candidates": candidates, "original": original_scores(query, candidates)}


def _seconds(function, *args, **kwargs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def test_original_algorithm(benchmark, workload):
    scores = benchmark.pedantic(original_scores, args=(workload["query"], workload["candidates"]), rounds=1)
    assert torch.equal(scores, workload["original"])


def test_fol_engine(benchmark, workload):
    query, candidates, original = workload["query"], workload["candidates"], workload["original"]
    scores = benchmark.pedantic(mutual_match_scores, args=(query, candidates), rounds=3, warmup_rounds=1)
    ratios = []
    for pair in range(PAIRS):  # warm against warm, alternated
        sides = [(original_scores, {}), (mutual_match_scores, {})]
        timed = [_seconds(function, query, candidates, **kwargs)[0] for function, kwargs in sides[:: 1 if pair % 2 == 0 else -1]]
        original_s, ours_s = timed if pair % 2 == 0 else timed[::-1]
        ratios.append(original_s / ours_s)
    benchmark.extra_info["speedup_vs_original_median"] = round(statistics.median(ratios), 2)
    benchmark.extra_info["speedup_vs_original_range"] = [round(min(ratios), 2), round(max(ratios), 2)]
    benchmark.extra_info["identical_scores"] = int((scores == original).sum())
    assert torch.equal(scores, original)
