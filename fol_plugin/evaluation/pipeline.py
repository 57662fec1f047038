"""The two-stage evaluation: images -> FoL features -> global retrieval -> FoL re-ranking -> recalls.

:func:`run_eval` runs FoL end to end (``fol-vpr eval``); :func:`run_rerank` re-ranks another
method's predictions with FoL (``fol-vpr rerank``). Both are short drivers over the stages of
:mod:`.stages`; intermediate results live in ``<output_dir>/cache`` (:mod:`.workspace`) and
every stage resumes from them after an interruption. Under ``torchrun`` every process runs the
same driver on its part of the work and rank 0 writes the outputs (:mod:`fol_plugin.distributed`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..checkpoint import load_model
from ..distributed import SINGLE_PROCESS, Processes
from ..features import LocalFeatureStore
from ..features.extract import FeatureStore
from ..files import MB
from ..models import FoLModel
from . import stages
from .confidence import global_confidence, num_reranked, select_queries
from .config import (
    DATABASE_DESCRIPTORS_FILE,
    EvalConfig,
    QuerySet,
    check_predictions,
    num_predictions,
    prepare,
    warn_shallow_predictions,
)
from .outputs import keep_descriptors, write_run_outputs
from .timings import StageClock
from .workspace import open_workspace

logger = logging.getLogger(__name__)


def _candidate_ids(query_sets: list[QuerySet], top_k: int) -> np.ndarray:
    """The database images among the first ``top_k`` predictions of any query to re-rank, sorted."""
    rows = [s.global_predictions if s.selected is None else s.global_predictions[s.selected] for s in query_sets]
    return np.unique(np.concatenate([predictions[:, :top_k].ravel() for predictions in rows]))


def _select(config: EvalConfig, query_sets: list[QuerySet]) -> None:
    """``--rerank_fraction`` below 1: set each query set's queries to re-rank, those of lowest
    global confidence (:mod:`.confidence`)."""
    if config.rerank_fraction >= 1:
        return
    for query_set in query_sets:
        if query_set.global_distances is None:
            raise ValueError(
                f"--rerank_fraction {config.rerank_fraction} re-ranks the queries whose global top-1 is least confident, "
                "which needs the global distances: give --database_descriptors and --queries_descriptors instead of "
                "--predictions, or drop --rerank_fraction"
            )
        query_set.selected = select_queries(global_confidence(query_set.global_distances), config.rerank_fraction)
        logger.info(
            "%s: re-ranking the %d of %d queries of lowest global confidence (--rerank_fraction %g)",
            query_set.key, len(query_set.selected), len(query_set.images), config.rerank_fraction,
        )


def _extract_queries(
    config: EvalConfig, processes: Processes, model: FoLModel, cache: Path, query_set: QuerySet, need_global: bool
) -> tuple[np.ndarray | None, FeatureStore | None]:
    """A query set's global descriptors [Q, 8448] (when ``need_global``: local features of every
    query come with them) and local features (else of the queries to re-rank only)."""
    paths, folder = query_set.images.paths, cache / query_set.key
    local = stages.open_local(config, processes, folder / "local", len(paths)) if config.rerank_topk else None
    descriptors = None
    if need_global:
        descriptors = np.array(
            stages.extract_global_part(
                config, processes, model, paths, folder / "queries_global.npy", local, f"Queries {query_set.key}"
            ).array
        )
    elif local is not None:
        ids = np.arange(len(paths)) if query_set.selected is None else query_set.selected
        stages.extract_local_part(config, processes, model, paths, ids, local, f"Queries {query_set.key} (local)")
    return descriptors, local


def _rerank(
    config: EvalConfig,
    processes: Processes,
    model: FoLModel,
    cache: Path,
    database_paths: list[str],
    query_sets: list[QuerySet],
    query_local: dict[str, FeatureStore],
    database_local: FeatureStore,
    clock: StageClock,
) -> dict:
    """The candidates' local features, then each query set re-ranked; returns extra summary fields."""
    candidates = _candidate_ids(query_sets, config.rerank_topk)
    with clock.stage("features_database_local"):
        stages.extract_local_part(
            config, processes, model, database_paths, candidates, database_local, "Database (local)"
        )
    for query_set in query_sets:
        with clock.stage(f"rerank_{query_set.key}"):
            stages.rerank(config, processes, cache, query_set, query_local[query_set.key], database_local)
    if not isinstance(database_local, LocalFeatureStore):
        return {}
    logger.info("Local features on disk: %.2f MB per image", database_local.bytes_per_image() / MB)
    return {"store_bytes_per_image": round(database_local.bytes_per_image())}


def _database_file(config: EvalConfig) -> str:
    """The cached database descriptors' file name (its dtype in the name unless float32)."""
    return "database_global.npy" if config.global_dtype == "float32" else f"database_global_{config.global_dtype}.npy"


def _search(
    config: EvalConfig, processes: Processes, database: Path, query_sets: list[QuerySet], query_global: dict, k: int
) -> None:
    """Global predictions and distances of every query set, in one pass over the database."""
    distances, predictions = stages.search(
        config, processes, database, np.concatenate([query_global[s.key] for s in query_sets]), k
    )
    end = 0
    for query_set in query_sets:
        begin, end = end, end + len(query_set.images)
        query_set.global_distances, query_set.global_predictions = distances[begin:end], predictions[begin:end]


def _keep_all_descriptors(config: EvalConfig, cache: Path, query_sets: list[QuerySet]) -> None:
    """``--save_descriptors``: the cached descriptors linked into the output folder."""
    keep_descriptors(cache / _database_file(config), config.output_dir / DATABASE_DESCRIPTORS_FILE)
    for query_set in query_sets:
        folder = config.output_dir / query_set.key
        folder.mkdir(parents=True, exist_ok=True)
        keep_descriptors(cache / query_set.key / "queries_global.npy", folder / "queries_descriptors.npy")


def run_eval(config: EvalConfig, processes: Processes = SINGLE_PROCESS) -> dict:
    """``fol-vpr eval``: FoL global retrieval, then FoL re-ranking, on one database and its query sets.

    Args:
        processes: this process's place in a distributed run (a single process by default).

    Returns:
        The summary written to ``recalls.json``; empty on the processes other than rank 0.
    """
    database, query_sets = prepare(config)
    k = num_predictions(config, len(database))
    with open_workspace(config, processes, database, query_sets, k, global_retrieval=True) as (cache, weights, inputs):
        clock = StageClock(cache if processes.is_main else None)
        with clock.stage("load_model"):
            model = load_model(config.backbone, weights, config.extraction.device)
        query_global, query_local = {}, {}
        for query_set in query_sets:
            with clock.stage(f"features_{query_set.key}"):
                query_global[query_set.key], query_local[query_set.key] = _extract_queries(
                    config, processes, model, cache, query_set, True
                )
        database_local = None
        if config.rerank_topk:
            database_local = stages.open_local(config, processes, cache / "database_local", len(database))
        # Local features in the global pass when every database image may be a candidate (or they
        # are held in RAM anyway); else a second pass over the candidates only.
        reranked = sum(num_reranked(len(query_set.images), config.rerank_fraction) for query_set in query_sets)
        single_pass = config.in_memory or reranked * min(config.rerank_topk, k) >= len(database)
        database_file = cache / _database_file(config)
        with clock.stage("features_database_global"):
            stages.extract_global_part(
                config, processes, model, database.paths, database_file, database_local if single_pass else None,
                "Database", config.global_dtype,
            )  # fmt: skip
        with clock.stage("global_search"):
            _search(config, processes, database_file, query_sets, query_global, k)
        extra = {}
        if config.rerank_topk:
            _select(config, query_sets)
            extra = _rerank(
                config, processes, model, cache, database.paths, query_sets, query_local, database_local, clock
            )
        if not processes.is_main:
            return {}
        with clock.stage("outputs"):
            if config.save_descriptors:
                _keep_all_descriptors(config, cache, query_sets)
            return write_run_outputs(
                config, database, query_sets, clock, {**extra, "processes": processes.world_size, "inputs": inputs}
            )


def run_rerank(
    config: EvalConfig,
    predictions: list[np.ndarray],
    processes: Processes = SINGLE_PROCESS,
    distances: list[np.ndarray] | None = None,
) -> dict:
    """``fol-vpr rerank``: FoL re-ranking of another method's predictions.

    Args:
        predictions: per query folder of ``config.queries_folders``, in order, [Q, K] database
            indices, best first.
        processes: this process's place in a distributed run (a single process by default).
        distances: the method's [Q, K] distances of those predictions, ascending, when known (it
            gave descriptors): they are the global confidence (``--rerank_fraction``, AP).

    Returns:
        The summary written to ``recalls.json`` (recalls before and after re-ranking); empty on
        the processes other than rank 0.
    """
    if config.rerank_topk <= 0:
        raise ValueError("fol-vpr rerank needs --rerank_topk > 0")
    database, query_sets = prepare(config)
    if len(predictions) != len(query_sets):
        raise ValueError(f"{len(predictions)} prediction arrays for {len(query_sets)} query folders")
    for index, (query_set, given) in enumerate(zip(query_sets, predictions)):
        source = f"the predictions for {query_set.images.folder}"
        query_set.global_predictions = check_predictions(given, len(query_set.images), len(database), source)
        if processes.is_main:
            warn_shallow_predictions(config, source, query_set.global_predictions.shape[1], len(database))
        if distances is not None:
            if np.shape(distances[index]) != query_set.global_predictions.shape:
                raise ValueError(
                    f"the distances for {query_set.images.folder} are {np.shape(distances[index])}, but its predictions "
                    f"are {query_set.global_predictions.shape}"
                )
            query_set.global_distances = np.asarray(distances[index], dtype=np.float32)
    _select(config, query_sets)
    k = max(s.global_predictions.shape[1] for s in query_sets)
    with open_workspace(config, processes, database, query_sets, k, global_retrieval=False) as (cache, weights, inputs):
        clock = StageClock(cache if processes.is_main else None)
        with clock.stage("load_model"):
            model = load_model(config.backbone, weights, config.extraction.device)
        query_local = {}
        for query_set in query_sets:
            with clock.stage(f"features_{query_set.key}"):
                query_local[query_set.key] = _extract_queries(config, processes, model, cache, query_set, False)[1]
        database_local = stages.open_local(config, processes, cache / "database_local", len(database))
        _rerank(config, processes, model, cache, database.paths, query_sets, query_local, database_local, clock)
        if not processes.is_main:
            return {}
        with clock.stage("outputs"):
            return write_run_outputs(
                config, database, query_sets, clock, {"processes": processes.world_size, "inputs": inputs}
            )
