"""The output folder of a run while it works: the lock, the cache checked against this run's
inputs, the projected resources and the disk check, and a full disk turned into a message.

Rank 0 alone holds the lock and decides whether the cache is resumed, started afresh or refused
(:mod:`fol_plugin.cache.run_cache`); the other processes of a distributed run wait for it, then
share the same ``<output_dir>/cache``. Rank 0 discards the cache at the end, after everyone is done.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..cache import RunCache, checkpoint_digest, disk_full_guard, listing_digest
from ..cache.integrity import folder_bytes
from ..cache.run_cache import CACHE_FOLDER
from ..checkpoint import weights_file
from ..data.datasets import ImageSet
from ..distributed import Processes
from ..features.extract import extraction_precision
from .config import EvalConfig, QuerySet
from ..files import GB, MB
from .resources import check_disk, project_resources

logger = logging.getLogger(__name__)


def cache_inputs(config: EvalConfig, database: ImageSet, query_sets: list[QuerySet], weights: Path) -> dict:
    """What every cached file depends on (see :mod:`fol_plugin.cache.run_cache`)."""

    def listing(images: ImageSet) -> dict:
        return {"images": len(images), "listing": listing_digest(images.folder, images.paths)}

    return {
        "backbone": str(config.backbone),
        "weights": checkpoint_digest(weights),
        "image_size": list(config.extraction.image_size),
        "resize_mode": config.extraction.resize_mode,
        "extraction_precision": extraction_precision(config.extraction),
        "database": listing(database),
        "queries": {query_set.key: listing(query_set.images) for query_set in query_sets},
    }


def num_queries(query_sets: list[QuerySet]) -> int:
    return sum(len(query_set.images) for query_set in query_sets)


def _report_and_check(
    config: EvalConfig, cache: Path, num_database: int, query_sets: list[QuerySet], k: int, global_retrieval: bool
) -> float:
    """Log the projected resources and refuse a run the disk cannot hold; returns the projected disk bytes."""
    queries = num_queries(query_sets)
    num_candidates = min(num_database, queries * min(config.rerank_topk, k))
    projection = project_resources(config, num_database, queries, num_candidates, global_retrieval)
    logger.info(
        "Projected: up to %.2f GB on disk in %s, %.2f GB of RAM beyond the model; local features up to %.2f MB per "
        "image (%s)",
        projection["disk"] / GB,
        cache,
        projection["ram"] / GB,
        projection["local_bytes_per_image"] / MB,
        "float32 in RAM" if config.in_memory else config.store_dtype,
    )
    check_disk(config.output_dir, projection["disk"], folder_bytes(cache))
    return projection["disk"]


@contextmanager
def open_workspace(
    config: EvalConfig,
    processes: Processes,
    database: ImageSet,
    query_sets: list[QuerySet],
    k: int,
    global_retrieval: bool,
) -> Iterator[tuple[Path, Path, dict | None]]:
    """Lock the output folder, check its cache against this run, refuse a run the disk cannot
    hold, and turn a full disk into a message (rank 0; the others wait for it); yields (cache
    folder, local checkpoint file, the run's inputs as :func:`cache_inputs` records them on rank 0,
    None on the others)."""
    if config.in_memory and processes.distributed:
        raise ValueError(
            "--in_memory holds features in one process's RAM: run it without torchrun, or drop --in_memory"
        )
    cache = config.output_dir / CACHE_FOLDER
    needed, inputs = 0.0, None
    with RunCache(config.output_dir) if processes.is_main else contextlib.nullcontext() as run_cache:
        if run_cache is not None:  # rank 0 downloads the weights and checks the cache first
            weights = weights_file(config.backbone, config.weights)
            inputs = cache_inputs(config, database, query_sets, weights)
            run_cache.check(inputs)
            needed = _report_and_check(config, cache, len(database), query_sets, k, global_retrieval)
        processes.barrier()
        if run_cache is None:
            weights = weights_file(config.backbone, config.weights)
        with disk_full_guard(config.output_dir, lambda: needed - folder_bytes(cache)):
            yield cache, weights, inputs
        processes.barrier()  # everyone is done with the cache
        if run_cache is None:
            return
        if config.keep_cache:
            logger.info("Cache kept in %s", cache)
        else:
            run_cache.discard()

