"""FoL through onnxruntime against PyTorch: images per second of the whole extraction.

Run with ``python -m pytest benchmarks/test_onnx_speed.py`` (needs the ``[onnx]`` extra; about two
minutes on 2 CPU cores). ViT-B at 322x322 with random weights (the speed is the shapes'), a batch
of 4 images: ``FoLModel.extract`` in fp32 against ``OnnxFoL.extract`` (the graph, then the same
selection), both warmed up, then timed in 5 alternated pairs; ``extra_info`` has the median of
the per-pair ratios with their range and each side's images/s, the summary line the host's kind.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from fol_plugin.models import FoLModel

pytest.importorskip("onnxruntime", reason='needs the [onnx] extra: pip install -e ".[onnx]"')
from fol_plugin.export import OnnxFoL, export_onnx  # noqa: E402

IMAGE_SIZE = (322, 322)
BATCH = 4
PAIRS = 5


def seconds(extract, images: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        extract(images)
        return time.perf_counter() - start


def test_onnxruntime_against_pytorch(benchmark, report, scratch):
    torch.manual_seed(0)
    model = FoLModel("vitb").eval()
    onnx_model = OnnxFoL(export_onnx(model, IMAGE_SIZE, scratch / "vitb.onnx"))
    images = torch.randn(BATCH, 3, *IMAGE_SIZE)
    sides = {"pytorch": model.extract, "onnxruntime": onnx_model.extract}
    for extract in sides.values():
        seconds(extract, images)  # warm-up
    pairs = []
    for pair in range(PAIRS):
        order = list(sides) if pair % 2 == 0 else list(sides)[::-1]
        pairs.append({name: seconds(sides[name], images) for name in order})
    ratios = [timed["pytorch"] / timed["onnxruntime"] for timed in pairs]
    rates = {name: round(BATCH / statistics.median(t[name] for t in pairs), 2) for name in sides}
    benchmark.pedantic(onnx_model.extract, args=(images,), rounds=1)
    benchmark.extra_info.update(
        images_per_s=rates,
        onnx_speedup_median=round(statistics.median(ratios), 2),
        onnx_speedup_range=[round(min(ratios), 2), round(max(ratios), 2)],
    )
    report(
        f"ViT-B {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, batches of {BATCH}: onnxruntime {rates['onnxruntime']} images/s, "
        f"PyTorch fp32 {rates['pytorch']}: onnxruntime {statistics.median(ratios):.2f}x PyTorch's speed "
        f"(pairs {min(ratios):.2f}-{max(ratios):.2f})"
    )
