"""``--plan``: what a run will cost before it starts, per stage, for a number of processes.

Owns the calibration (a few real batches of this run's images through this device, FoL
re-ranking of their local features, a faiss search of random rows) and the projection of those
per-item costs onto the run's sizes. Disk and RAM come from :mod:`.resources`. Nothing is
written: the projection is printed as a table and every figure says whether it was measured or
projected.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..checkpoint import load_model, weights_file
from ..data.images import describe_image_size
from ..features.extract import extraction_autocast, extraction_precision, image_batches
from ..host import detect_host, screen_product
from ..models import GLOBAL_DIM, FoLModel
from ..options import usable_cores
from ..rerank.engine import mutual_match_scores
from ..retrieval import exact_search
from .config import EvalConfig, num_predictions, prepare
from ..files import GB
from .resources import project_resources

logger = logging.getLogger(__name__)

CALIBRATION_BATCHES = 3  # timed after one warm-up batch
CALIBRATION_CANDIDATES = 20  # FoL scores timed per calibration
SEARCH_CALIBRATION_ROWS = 20000
SEARCH_CALIBRATION_QUERIES = 200
MINUTE, HOUR = 60.0, 3600.0


@dataclass
class Costs:
    """Measured seconds per item on this device."""

    image: float  # one image through the loader and FoL (global + local features)
    pair: float  # one FoL score (query x candidate)
    distance: float  # one query-database distance in the global search
    model_bytes: int  # the model's weights in memory
    screen: str = "fp32"  # the product FoL's re-ranking screens with (fol_plugin.host.screen_product)


def calibrate(config: EvalConfig, model: FoLModel, paths: list[str]) -> Costs:
    """Per-item costs of ``model`` measured on ``paths`` (a few batches of the run's own images)."""
    device = config.extraction.device
    needed = (CALIBRATION_BATCHES + 1) * config.extraction.batch_size
    chosen = [paths[i % len(paths)] for i in range(needed)]
    local = []
    with torch.inference_mode(), extraction_autocast(config.extraction):
        batches = image_batches(chosen, range(needed), config.extraction)
        features = model.extract(next(batches)[0].to(device))  # warm-up
        local.extend(features.local_descriptors)
        _synchronize(device)
        began, timed = time.perf_counter(), 0
        for images, _ in batches:
            features = model.extract(images.to(device))
            local.extend(features.local_descriptors)
            timed += len(images)
        _synchronize(device)
        image = (time.perf_counter() - began) / max(timed, 1)
    candidates = [local[(1 + i) % len(local)] for i in range(CALIBRATION_CANDIDATES)]
    mutual_match_scores(local[0], candidates[:2])  # warm-up
    began = time.perf_counter()
    mutual_match_scores(local[0], candidates)
    _synchronize(device)
    pair = (time.perf_counter() - began) / CALIBRATION_CANDIDATES
    generator = np.random.default_rng(0)
    database = generator.standard_normal((SEARCH_CALIBRATION_ROWS, GLOBAL_DIM), np.float32)
    queries = generator.standard_normal((SEARCH_CALIBRATION_QUERIES, GLOBAL_DIM), np.float32)
    began = time.perf_counter()
    exact_search(database, queries, 10, progress=False)
    distance = (time.perf_counter() - began) / (SEARCH_CALIBRATION_ROWS * SEARCH_CALIBRATION_QUERIES)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    screen = screen_product() if torch.device(device).type == "cpu" else "fp32"
    return Costs(image=image, pair=pair, distance=distance, model_bytes=model_bytes, screen=screen)


def feedable_processes(device: str, processes: int) -> int:
    """How many of ``processes`` the device can run at once: each its own GPU, but on the CPU
    the calibration already used every core (torch's threads), so processes beyond
    cores / threads share the same cores and gain nothing (2 processes on 2 cores measured 0.86x
    the speed of one)."""
    if torch.device(device).type != "cpu":
        return processes
    return max(1, min(processes, usable_cores() // max(torch.get_num_threads(), 1)))


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def project(
    config: EvalConfig,
    costs: Costs,
    num_database: int,
    num_queries: int,
    processes: int,
    global_retrieval: bool = True,
    top_k: int | None = None,
) -> dict:
    """Projected seconds per stage, disk and RAM per process of a run of these sizes.

    Database local features are counted for at most ``reranked x top_k`` candidates (fewer when
    candidates are shared; none when the database pass extracts them, as the run does when the
    candidates may cover the database), re-ranking for the ``top_k`` candidates of each of the
    ``reranked`` queries: all of them, or their ``--rerank_fraction``.
    """
    top_k = config.rerank_topk if top_k is None else top_k
    reranked = num_queries * config.rerank_fraction
    candidates = min(num_database, reranked * top_k) if config.rerank_topk else 0
    single_pass = global_retrieval and (config.in_memory or reranked * top_k >= num_database)
    seconds = {
        "queries (global + local)": num_queries * costs.image,
        "database global": num_database * costs.image if global_retrieval else 0.0,
        "global search": num_queries * num_database * costs.distance if global_retrieval else 0.0,
        "candidates' local features (at most)": 0.0 if single_pass else candidates * costs.image,
        "re-ranking": reranked * top_k * costs.pair if config.rerank_topk else 0.0,
    }
    feedable = feedable_processes(config.extraction.device, processes)
    seconds = {stage: value / feedable for stage, value in seconds.items()}
    resources = project_resources(config, num_database, num_queries, candidates, global_retrieval)
    return {
        "processes": processes,
        "feedable_processes": feedable,
        "top_k": top_k,
        "seconds": seconds,
        "total_seconds": sum(seconds.values()),
        "disk_bytes": resources["disk"],
        "ram_bytes_per_process": resources["ram"] + costs.model_bytes,
    }


def plan_run(config: EvalConfig, processes: int, global_retrieval: bool = True) -> str:
    """The table ``--plan`` prints for this run's folders, device and number of processes."""
    database, query_sets = prepare(config)
    num_queries = sum(len(query_set.images) for query_set in query_sets)
    k = num_predictions(config, len(database))
    model = load_model(config.backbone, weights_file(config.backbone, config.weights), config.extraction.device)
    costs = calibrate(config, model, database.paths)
    projection = project(
        config, costs, len(database), num_queries, processes, global_retrieval, min(config.rerank_topk, k)
    )
    return format_plan(config, costs, projection, len(database), num_queries)


def format_plan(config: EvalConfig, costs: Costs, projection: dict, num_database: int, num_queries: int) -> str:
    """A plain-text table of a projection, saying what was measured and what is projected."""
    extraction = config.extraction
    lines = [
        f"Plan for {num_database} database images, {num_queries} queries, {projection['processes']} process(es) on "
        f"{extraction.device} ({config.backbone}, {describe_image_size(extraction.image_size)}, "
        f"{extraction_precision(extraction)} extraction, re-ranking top {projection['top_k']})",
        f"measured here: {1 / costs.image:.2f} images/s, {costs.pair * 1e3:.1f} ms per FoL score ({costs.screen} "
        f"screen products, {_device_kind(extraction.device)}), {costs.distance * 1e9:.2f} ns per global distance",
    ]
    if projection["feedable_processes"] < projection["processes"]:
        lines.append(
            f"the calibration used all {torch.get_num_threads()} CPU threads: {projection['processes']} processes would "
            f"share the same cores, so {projection['feedable_processes']} is projected (2 processes on 2 cores measured "
            "0.86x the speed of one)"
        )
    lines.append("projected (measured costs x sizes / processes the device can feed):")
    rows = [(stage, duration(value)) for stage, value in projection["seconds"].items()]
    rows += [
        ("total", duration(projection["total_seconds"])),
        ("disk (the shared --output_dir)", f"{projection['disk_bytes'] / GB:.2f} GB"),
        ("RAM per process", f"{projection['ram_bytes_per_process'] / GB:.2f} GB"),
    ]
    width = max(len(name) for name, _ in rows)
    lines += [f"  {name:<{width}}  {value:>10}" for name, value in rows]
    return "\n".join(lines)


def _device_kind(device: str) -> str:
    return f"CPU: {detect_host().describe()}" if torch.device(device).type == "cpu" else str(device)


def duration(seconds: float) -> str:
    """``seconds`` in s, min or h."""
    if seconds < MINUTE:
        return f"{seconds:.1f} s"
    if seconds < HOUR:
        return f"{seconds / MINUTE:.1f} min"
    return f"{seconds / HOUR:.1f} h"
