"""Adaptive re-ranking: the re-ranking stage's time against ``--rerank_fraction``.

Run with ``python -m pytest benchmarks/test_rerank_fraction.py`` (not part of the default test
run; about three minutes on 2 CPU cores). A labelled set of 48 edited copies of the toy photos
(cropped and brightened, none a near duplicate, whose matching costs more) against their 17
originals, a random ViT-B at 322x322 (real-sized local features), every query's
17 candidates re-ranked: ``extra_info`` holds the seconds of the ``rerank_queries`` stage at each
fraction and their ratio to the full run's. Only ``round(F x Q)`` queries are scored, so the
time falls with F; here faster than F, since the least confident queries are the most edited
copies, whose pairs the exact engine scores faster than near duplicates (measured on 2 shared
cores of an Intel Xeon with AMX: 14.2 s at F = 1, 3.6 s at 0.5, 1.9 s at 0.25). The host's kind
goes to ``extra_info`` and the summary line.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageEnhance

from fol_plugin.evaluation import EvalConfig, run_eval
from fol_plugin.features import ExtractionConfig
from fol_plugin.models import FoLModel
from tests.conftest import SPACING, toy_database_on_a_line, utm_name

FRACTIONS = (1.0, 0.5, 0.25)
COPIES = 48


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(the labelled set's root, random ViT-B weights)."""
    root = tmp_path_factory.mktemp("fraction")
    sources = toy_database_on_a_line(root)
    for q in range(COPIES):
        i = q % len(sources)
        margin = 60 + q  # pixels cropped on each side, of 512
        with Image.open(sources[i]) as image:
            cropped = image.convert("RGB").crop((margin, margin // 2, 512 - margin // 2, 512 - margin)).resize(image.size)
        edited = ImageEnhance.Brightness(cropped).enhance(0.6 + 0.8 * q / COPIES)
        edited.save(root / "queries" / utm_name(SPACING * i + 10, 0.0, f"q{q:02d}"))
    torch.manual_seed(0)
    weights = root / "vitb.pth"
    torch.save({"model_state_dict": FoLModel("vitb").state_dict()}, weights)
    return root, weights


def test_rerank_time_falls_with_the_fraction(benchmark, dataset, tmp_path, report):
    root, weights = dataset

    def rerank_seconds(fraction: float, name: str) -> float:
        config = EvalConfig(
            database_folder=root / "database", queries_folders=[root / "queries"], output_dir=tmp_path / name,
            backbone="vitb", weights=str(weights), rerank_topk=17, rerank_fraction=fraction,
            extraction=ExtractionConfig(image_size=(322, 322), batch_size=4, num_workers=0, progress=False),
        )  # fmt: skip
        return run_eval(config)["timings_s"]["rerank_queries"]

    rerank_seconds(min(FRACTIONS), "warm-up")  # the first run in a process compiles the engine's kernels
    seconds = {}

    def run_all() -> None:
        for fraction in FRACTIONS:
            seconds[fraction] = rerank_seconds(fraction, str(fraction))

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    for fraction, rerank in seconds.items():
        benchmark.extra_info[f"rerank_s_at_{fraction}"] = rerank
        benchmark.extra_info[f"rerank_vs_full_at_{fraction}"] = round(rerank / seconds[1.0], 3)
    report("re-ranking stage " + ", ".join(f"{rerank:.1f} s at F = {fraction}" for fraction, rerank in seconds.items()))
    assert seconds[0.25] < seconds[0.5] < seconds[1.0]
