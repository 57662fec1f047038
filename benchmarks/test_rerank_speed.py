"""Re-ranking speed: FoL's exact engine and bf16 mode against the original algorithm.

Run with ``python -m pytest benchmarks`` (not part of the default test run). Each result
carries ``speedup_vs_original`` (the original's seconds on its second, warm run / ours, both
measured in this run; ``..._first_run`` against its first run) and its agreement with the
original's scores (identical for the exact engine, measured for bf16) in ``extra_info``.
"""
from __future__ import annotations

import importlib.util
import json
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
    seconds = []
    for _ in range(2):  # the first run also pays the page faults of its 5 GB similarity tensor
        start = time.perf_counter()
        reference = original_scores(query, candidates)
        seconds.append(time.perf_counter() - start)
    return {"query": query, "candidates": candidates, "original": reference, "original_s": seconds}


def test_original_algorithm(benchmark, workload):
    scores = benchmark.pedantic(original_scores, args=(workload["query"], workload["candidates"]), rounds=1)
    assert torch.equal(scores, workload["original"])


@pytest.mark.parametrize("precision", ["exact", "bf16"])
def test_fol_engine(benchmark, workload, precision):
    query, candidates = workload["query"], workload["candidates"]
    scores = benchmark.pedantic(mutual_match_scores, args=(query, candidates), kwargs={"precision": precision}, rounds=3, warmup_rounds=1)
    original = workload["original"]
    first, warm = workload["original_s"]
    benchmark.extra_info["speedup_vs_original"] = round(warm / benchmark.stats.stats.mean, 2)
    benchmark.extra_info["speedup_vs_original_first_run"] = round(first / benchmark.stats.stats.mean, 2)
    benchmark.extra_info["identical_scores"] = int((scores == original).sum())
    benchmark.extra_info["mean_abs_score_difference"] = float((scores - original).abs().mean())
    benchmark.extra_info["top10_overlap"] = len(set(scores.argsort(descending=True, stable=True)[:10].tolist())
                                                & set(original.argsort(descending=True, stable=True)[:10].tolist()))
    if precision == "exact":
        assert torch.equal(scores, original)
