"""Reduced-precision extraction (``--extraction_precision bf16|fp16``) against fp32: speed and agreement.

Run with ``python -m pytest benchmarks/test_extraction_precision.py``. ViT-B at 322x322 under
the shared fixture's weights (random weights when ../shared is absent) on the toy set's 22
photos. Speed: images per second of FoL's extraction (global + local features, batches of 4,
decoding excluded), fp32 and the reduced precision timed in alternated pairs after a warm-up;
``extra_info`` has the median of the per-pair ratios and their range. Agreement, every photo
taken in turn as a query against the other 21: max |diff| of global descriptors, top-1 and
top-10 agreement of the global predictions, and FoL re-ranking scores of each query's 10
fp32 candidates computed from reduced-precision local features against fp32 ones.

``test_bf16_speed_per_kind`` times bf16 against fp32 once per kind of CPU this host can compute
as (its own natively, the kinds below it emulated: ``conftest.run_as_kind``), with the precision
``--extraction_precision auto`` picks there and the warning a user who asks for bf16 sees.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import pytest
import torch

from fol_plugin.data import load_image, preprocess
from fol_plugin.features import ExtractionConfig
from fol_plugin.features.extract import extraction_autocast, extraction_precision
from fol_plugin.host import emulated_precision_warning
from fol_plugin.models import FoLModel
from fol_plugin.rerank import mutual_match_scores
from tests.conftest import DATA

from .conftest import describe_process, run_as_kind
from .test_rerank_speed import FIXTURES

IMAGE_SIZE = (322, 322)
BATCH = 4
PAIRS = 5
KIND_PAIRS = 3  # per kind: an emulated bf16 batch takes 10-20 s
CANDIDATES = 10


@pytest.fixture(scope="module")
def model() -> FoLModel:
    import importlib.util
    import json

    torch.manual_seed(0)
    model = FoLModel("vitb").eval()
    folder = FIXTURES / "parity-vitb-322"
    if folder.exists():
        spec = importlib.util.spec_from_file_location("detweights", FIXTURES / "detweights.py")
        detweights = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(detweights)
        meta = json.loads((folder / "meta.json").read_text())
        model.load_state_dict(
            detweights.make_state_dict(json.loads((FIXTURES / "keys_vitb.json").read_text()), meta["seed"])
        )
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    paths = sorted((DATA / "toy_dataset").glob("*/*.jpg"))
    if not paths:
        pytest.skip("needs ../shared/data/toy_dataset")
    return torch.cat([preprocess(load_image(path), IMAGE_SIZE, "original") for path in paths])


def extract(model: FoLModel, images: torch.Tensor, precision: str):
    """Global descriptors [N, 8448] and local descriptors, batch by batch."""
    config = ExtractionConfig(image_size=IMAGE_SIZE, precision=precision)
    globals_, locals_ = [], []
    with torch.inference_mode(), extraction_autocast(config):
        for start in range(0, len(images), BATCH):
            features = model.extract(images[start : start + BATCH])
            globals_.append(torch.nn.functional.normalize(features.global_descriptors.float(), dim=-1))
            locals_.extend(features.local_descriptors)
    return torch.cat(globals_), locals_


def seconds(model: FoLModel, batch: torch.Tensor, precision: str) -> float:
    config = ExtractionConfig(image_size=IMAGE_SIZE, precision=precision)
    with torch.inference_mode(), extraction_autocast(config):
        start = time.perf_counter()
        model.extract(batch)
        return time.perf_counter() - start


def leave_one_out_predictions(descriptors: torch.Tensor, k: int) -> np.ndarray:
    distances = torch.cdist(descriptors, descriptors)
    distances.fill_diagonal_(float("inf"))
    return distances.argsort(dim=1, stable=True)[:, :k].numpy()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_extraction(benchmark, model, images, precision, report):
    batch = images[:BATCH]
    seconds(model, batch, "fp32"), seconds(model, batch, precision)  # warm-up
    pairs = []
    for pair in range(PAIRS):
        order = ["fp32", precision] if pair % 2 == 0 else [precision, "fp32"]
        pairs.append(dict(zip(order, (seconds(model, batch, side) for side in order))))
    ratios = [timed["fp32"] / timed[precision] for timed in pairs]
    reference_global, reference_local = extract(model, images, "fp32")
    reduced_global, reduced_local = benchmark.pedantic(extract, args=(model, images, precision), rounds=1)
    assert torch.isfinite(reduced_global).all()
    reference = leave_one_out_predictions(reference_global, CANDIDATES)
    reduced = leave_one_out_predictions(reduced_global, CANDIDATES)
    score_differences, exact_scores, equal_scores, same_best = [], [], 0, 0
    for q, candidates in enumerate(reference):
        exact = mutual_match_scores(reference_local[q], [reference_local[i] for i in candidates])
        approximate = mutual_match_scores(reduced_local[q], [reduced_local[i] for i in candidates])
        score_differences.append((exact - approximate).abs())
        exact_scores.append(exact)
        equal_scores += int((exact == approximate).sum())
        same_best += int(exact.argmax() == approximate.argmax())
    differences = torch.cat(score_differences)
    info = benchmark.extra_info
    info["speedup_vs_fp32_median"] = round(statistics.median(ratios), 2)
    info["speedup_vs_fp32_range"] = [round(min(ratios), 2), round(max(ratios), 2)]
    for side in ("fp32", precision):
        info[f"{side}_images_per_s"] = round(BATCH / statistics.median(timed[side] for timed in pairs), 2)
    info["global_max_abs_diff"] = float((reference_global - reduced_global).abs().max())
    info["global_min_cosine"] = float((reference_global * reduced_global).sum(dim=1).min())
    info["top1_agreement"] = float((reference[:, 0] == reduced[:, 0]).mean())
    info["top10_agreement"] = float(np.mean([len(set(a) & set(b)) / CANDIDATES for a, b in zip(reference, reduced)]))
    info["rerank_scores_equal"] = f"{equal_scores}/{len(differences)}"
    info["rerank_mean_abs_score_diff"] = round(float(differences.mean()), 2)
    info["rerank_mean_fp32_score"] = round(float(torch.cat(exact_scores).mean()), 1)
    info["rerank_same_best_candidate"] = f"{same_best}/{len(reference)}"
    report(
        f"{precision} extraction {info['speedup_vs_fp32_median']}x fp32's images/s (pairs {info['speedup_vs_fp32_range']}; "
        f"{info[f'{precision}_images_per_s']} vs {info['fp32_images_per_s']}), global min cosine "
        f"{info['global_min_cosine']:.6f}, re-rank scores equal {info['rerank_scores_equal']}"
    )


def bf16_speed() -> dict:
    """bf16 against fp32 on one batch, in this process (its kind is the environment's)."""
    paths = sorted((DATA / "toy_dataset").glob("*/*.jpg"))[:BATCH]
    batch = torch.cat([preprocess(load_image(path), IMAGE_SIZE, "original") for path in paths])
    torch.manual_seed(0)
    model = FoLModel("vitb").eval()  # random weights: the speed is the weights' shapes'
    seconds(model, batch, "fp32"), seconds(model, batch, "bf16")  # warm-up
    pairs = []
    for pair in range(KIND_PAIRS):
        order = ["fp32", "bf16"] if pair % 2 == 0 else ["bf16", "fp32"]
        pairs.append(dict(zip(order, (seconds(model, batch, side) for side in order))))
    ratios = [timed["fp32"] / timed["bf16"] for timed in pairs]
    return {
        "speedup_vs_fp32_median": round(statistics.median(ratios), 2),
        "speedup_vs_fp32_range": [round(min(ratios), 2), round(max(ratios), 2)],
        "images_per_s": {side: round(BATCH / statistics.median(t[side] for t in pairs), 2) for side in ("fp32", "bf16")},
        "auto": extraction_precision(ExtractionConfig(precision="auto")),
        "warning": emulated_precision_warning("bf16"),
        "host": describe_process(),
    }


def test_bf16_speed_per_kind(benchmark, kind, report):
    if not list((DATA / "toy_dataset").glob("*/*.jpg")):
        pytest.skip("needs ../shared/data/toy_dataset")
    record = benchmark.pedantic(run_as_kind, args=(kind, __name__), rounds=1)
    benchmark.extra_info.update({key: value for key, value in record.items() if key != "host"})
    rates = record["images_per_s"]
    report(
        f"bf16 extraction {record['speedup_vs_fp32_median']}x fp32's images/s (pairs "
        f"{'-'.join(map(str, record['speedup_vs_fp32_range']))}; {rates['bf16']} vs {rates['fp32']}); auto picks "
        f"{record['auto']}; asking for bf16 {'warns' if record['warning'] else 'does not warn'}",
        record["host"],
    )
    slow = record["speedup_vs_fp32_median"] < 1
    assert bool(record["warning"]) == slow and record["auto"] == ("fp32" if slow else "bf16")


if __name__ == "__main__":
    print(json.dumps(bf16_speed()))
