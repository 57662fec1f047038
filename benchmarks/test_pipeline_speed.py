"""Evaluation pipeline: feature extraction speed and local-feature store size.

Run with ``python -m pytest benchmarks`` (not part of the default test run). ``extra_info``
carries images per second (extraction), bytes per image (store) and their ratios to a baseline
measured in the same run: global-only inference for extraction, the original's padded float32
local features (3600 x 128 x 4 bytes) for the store.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fol_plugin.features import LocalFeatureStore
from fol_plugin.models import FoLModel

IMAGE_SIZE = (322, 322)
BATCH = 4
ORIGINAL_BYTES_PER_IMAGE = 3600 * 128 * 4
STORE_IMAGES = 100
CELLS = 3400


@pytest.fixture(scope="module")
def vitb() -> FoLModel:
    torch.manual_seed(0)
    return FoLModel("vitb").eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(BATCH, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def global_only_seconds(vitb, images) -> float:
    with torch.inference_mode():
        vitb(images)
        start = time.perf_counter()
        vitb(images)
    return time.perf_counter() - start


def test_extraction_images_per_second(benchmark, vitb, images, global_only_seconds, report):
    """ViT-B at 322x322 on this CPU: global descriptors plus local features of a batch of 4."""
    with torch.inference_mode():
        features = benchmark.pedantic(vitb.extract, args=(images,), rounds=3, warmup_rounds=1)
    assert len(features.local_descriptors) == BATCH
    benchmark.extra_info["images_per_s"] = round(BATCH / benchmark.stats.stats.mean, 2)
    benchmark.extra_info["global_only_images_per_s"] = round(BATCH / global_only_seconds, 2)
    benchmark.extra_info["time_vs_global_only"] = round(benchmark.stats.stats.mean / global_only_seconds, 3)
    info = benchmark.extra_info
    report(
        f"ViT-B 322x322 extracts {info['images_per_s']} images/s with local features, {info['global_only_images_per_s']} "
        f"global only ({info['time_vs_global_only']}x the time)"
    )


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_store_bytes_per_image_and_reads(benchmark, tmp_path, dtype, report):
    """Write 100 images of ~3,400 cells, then time reading one query's 100 candidates back."""
    generator = torch.Generator().manual_seed(0)
    store = LocalFeatureStore(tmp_path / dtype, num_ids=STORE_IMAGES, dtype=dtype)
    counts = [CELLS + k % 200 for k in range(STORE_IMAGES)]
    descriptors = [F.normalize(torch.randn(n, 128, generator=generator), dim=-1) for n in counts]
    start = time.perf_counter()
    store.add(list(range(STORE_IMAGES)), descriptors, [torch.zeros(n, 2) for n in counts])
    write_seconds = time.perf_counter() - start
    read = benchmark.pedantic(lambda: [store[i] for i in range(STORE_IMAGES)], rounds=3, warmup_rounds=1)
    assert [len(r) for r in read] == counts
    bytes_per_image = store.bytes_per_image()
    benchmark.extra_info["bytes_per_image"] = round(bytes_per_image)
    benchmark.extra_info["size_vs_original"] = round(bytes_per_image / ORIGINAL_BYTES_PER_IMAGE, 3)
    benchmark.extra_info["write_MB_per_s"] = round(bytes_per_image * STORE_IMAGES / write_seconds / 1e6, 1)
    benchmark.extra_info["max_abs_descriptor_error"] = float(
        max((r - d).abs().max() for r, d in zip(read, descriptors))
    )
    assert np.isfinite(bytes_per_image)
    info = benchmark.extra_info
    report(
        f"{dtype} store: {info['bytes_per_image'] / 1e6:.2f} MB per image ({info['size_vs_original']}x the original's "
        f"padding), writes {info['write_MB_per_s']} MB/s, reads 100 candidates in {benchmark.stats.stats.median * 1e3:.1f} ms"
    )
