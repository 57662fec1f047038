"""The README's SF-XL resource table: ``--plan``'s projection for SF-XL test, calibrated here.

Run with ``python -m pytest benchmarks/test_sfxl_plan.py -s``. Per-item costs are measured on
this machine (:func:`fol_plugin.evaluation.plan.calibrate`: ViT-L at 322x322 on the toy set's
photos, batches of 4; FoL scores of their local features; a faiss search of random rows) in fp32
and bf16, then projected onto SF-XL test (2.8 M database images; queries v1, v2, night and
occlusion) with ``--rerank_topk 100``. The GPU rows use assumed, not measured, costs (no GPU was
available): ViT-L's FLOPs per image at an assumed sustained rate on one H100, an assumed 1 ms
per FoL score, and this machine's measured cost per global distance. ``extra_info`` has every
row; ``-s`` prints them as a Markdown table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fol_plugin.evaluation.config import EvalConfig
from fol_plugin.evaluation.plan import Costs, calibrate, duration, project
from fol_plugin.features import ExtractionConfig
from fol_plugin.models import FoLModel
from fol_plugin.models.backbone import VIT_CONFIGS
from tests.conftest import DATA

SFXL_DATABASE = 2_800_000
SFXL_QUERIES = {"v1": 1000, "v2": 598, "night": 466, "occlusion": 76}
IMAGE_SIZE = (322, 322)
# Assumptions for the GPU rows (not measured here): sustained dense throughput of one H100 on
# ViT-L inference, and the cost of one FoL score with the plain float32 algorithm on CUDA.
ASSUMED_H100_FLOPS = {"fp32": 40e12, "bf16": 300e12}
ASSUMED_GPU_PAIR_S = 1e-3


def vit_flops(image_size: tuple[int, int], backbone: str = "vitl") -> float:
    """Multiply-adds x 2 of the ViT on one image: 24 T d^2 per block plus 4 T^2 d of attention."""
    config = VIT_CONFIGS[backbone]
    tokens = 1 + (image_size[0] // 14) * (image_size[1] // 14)
    per_block = 24 * tokens * config.embed_dim**2 + 4 * tokens**2 * config.embed_dim
    return config.depth * per_block


@pytest.fixture(scope="module")
def paths() -> list[str]:
    found = sorted(str(p) for p in (DATA / "toy_dataset").glob("*/*.jpg"))
    if not found:
        pytest.skip("needs ../shared/data/toy_dataset")
    return found


def sfxl_config(precision: str, device: str = "cpu") -> EvalConfig:
    return EvalConfig(
        database_folder=Path("SF_XL/test/database"),
        queries_folders=[],
        output_dir=Path("runs/sfxl"),
        extraction=ExtractionConfig(image_size=IMAGE_SIZE, precision=precision, device=device),
        rerank_topk=100,
    )


def test_sfxl_projection(benchmark, paths, report):
    torch.manual_seed(0)
    model = FoLModel("vitl").eval()  # random weights: the cost does not depend on them
    rows, measured = [], {}
    queries = sum(SFXL_QUERIES.values())
    for precision in ("fp32", "bf16"):
        config = sfxl_config(precision)
        costs = (
            benchmark.pedantic(calibrate, args=(config, model, paths), rounds=1)
            if precision == "fp32"
            else calibrate(config, model, paths)
        )
        measured[precision] = costs
        rows.append(
            ("this CPU (2 cores), measured costs", precision, 1, project(config, costs, SFXL_DATABASE, queries, 1))
        )
    for precision in ("fp32", "bf16"):
        gpu = Costs(
            image=vit_flops(IMAGE_SIZE) / ASSUMED_H100_FLOPS[precision],
            pair=ASSUMED_GPU_PAIR_S,
            distance=measured[precision].distance,
            model_bytes=measured[precision].model_bytes,
        )
        for processes in (1, 8):
            name = f"{processes} x H100, assumed costs"
            rows.append(
                (
                    name,
                    precision,
                    processes,
                    project(sfxl_config(precision, "cuda"), gpu, SFXL_DATABASE, queries, processes),
                )
            )
    table = []
    for name, precision, processes, projection in rows:
        seconds = projection["seconds"]
        table.append(
            {
                "where": name,
                "extraction": precision,
                "processes": processes,
                **{stage: duration(value) for stage, value in seconds.items()},
                "total": duration(projection["total_seconds"]),
                "disk_GB": round(projection["disk_bytes"] / 1e9),
                "RAM_GB_per_process": round(projection["ram_bytes_per_process"] / 1e9, 1),
            }
        )
    benchmark.extra_info["measured"] = {
        precision: {
            "images_per_s": round(1 / c.image, 3),
            "ms_per_fol_score": round(c.pair * 1e3, 2),
            "ns_per_distance": round(c.distance * 1e9, 2),
        }
        for precision, c in measured.items()
    }
    benchmark.extra_info["vitl_gflop_per_image"] = round(vit_flops(IMAGE_SIZE) / 1e9)
    benchmark.extra_info["table"] = table
    header = list(table[0])
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))  # the README's table, with -s
    for row in table:
        print("| " + " | ".join(str(row[column]) for column in header) + " |")
    assert all(row["total"] for row in table)
    here = {row["extraction"]: row["total"] for row in table if row["processes"] == 1 and "this CPU" in row["where"]}
    report(f"SF-XL test projected here: {here['fp32']} (fp32), {here['bf16']} (bf16); the table in extra_info")
