"""The two-stage evaluation: images -> FoL features -> global retrieval -> FoL re-ranking -> recalls.

:func:`run_eval` runs FoL end to end (``fol-vpr eval``); :func:`run_rerank` re-ranks another
method's predictions with FoL (``fol-vpr rerank``). Intermediate results live in
``<output_dir>/cache`` and every stage resumes from them after an interruption.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..cache import RunCache, checkpoint_digest, disk_full_guard, listing_digest
from ..cache.integrity import folder_bytes
from ..cache.run_cache import CACHE_FOLDER, LOCK_FILE
from ..checkpoint import load_model, weights_file
from ..data.datasets import DEFAULT_POSITIVE_DISTANCE, ImageSet, find_positives, load_image_set
from ..features import (
    ExtractionConfig,
    InMemoryFeatures,
    LocalFeatureStore,
    ResumableArray,
    check_image_size,
    extract_global,
    extract_local,
)
from ..features.extract import FeatureStore
from ..matching import LocalFeatures, ScorerConfig, make_pair_scorer
from ..models import GLOBAL_DIM, LOCAL_DIM, FoLModel
from ..rerank import DEFAULT_TOP_K, order_by_scores, score_candidates
from ..retrieval import DEFAULT_CHUNK_SIZE, exact_search
from .outputs import save_prediction_grids, scores_in_order, write_predictions_csv, write_preds_files
from .recalls import DEFAULT_RECALL_VALUES, compute_recalls
from .resources import GB, MB, check_disk, project_resources

logger = logging.getLogger(__name__)

RECALLS_FILE = "recalls.json"
DATABASE_DESCRIPTORS_FILE = "database_descriptors.npy"
# Names a query set's output folder may not take: they are the run's own files and folders.
RESERVED_NAMES = {CACHE_FOLDER, LOCK_FILE, RECALLS_FILE, DATABASE_DESCRIPTORS_FILE}
UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass
class EvalConfig:
    """Everything ``fol-vpr eval`` and ``fol-vpr rerank`` need (flag names of VPR-methods-evaluation).

    Attributes:
        database_folder: the database images.
        queries_folders: one or more query sets searched against the same database.
        output_dir: where results (and the resumable cache) go.
        backbone: "vitl" or "vitb".
        weights: "auto" (published checkpoint), a path or URL.
        extraction: image size, resize mode, batching and device.
        recall_values: the N of each recall@N.
        positive_dist_threshold: metres within which a database image is correct.
        labelled: read UTM labels from file names and compute recalls.
        rerank_topk: candidates re-ranked per query; 0 for global retrieval only.
        precision: "exact" or "bf16" re-ranking (FoL's own scorer).
        scorer: the re-ranking score: FoL's (default), or matches / RANSAC inliers of a matcher.
        store_dtype: local-feature store precision ("float32" reproduces the original's scores).
        in_memory: hold all database local features in RAM, as the original's default mode.
        num_preds_to_save: per query, predictions drawn in PNG grids and listed in preds/*.txt.
        save_descriptors: keep the global descriptors as .npy files in the output folder.
        keep_cache: keep ``<output_dir>/cache`` after a successful run.
        search_chunk_size: database rows per faiss index.
    """

    database_folder: Path
    queries_folders: list[Path]
    output_dir: Path
    backbone: str = "vitl"
    weights: str | None = "auto"
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    recall_values: tuple[int, ...] = DEFAULT_RECALL_VALUES
    positive_dist_threshold: float = DEFAULT_POSITIVE_DISTANCE
    labelled: bool = True
    rerank_topk: int = DEFAULT_TOP_K
    precision: str = "exact"
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    store_dtype: str = "float32"
    in_memory: bool = False
    num_preds_to_save: int = 0
    save_descriptors: bool = False
    keep_cache: bool = False
    search_chunk_size: int = DEFAULT_CHUNK_SIZE


@dataclass
class QuerySet:
    """A query set with what the run computes for it."""

    images: ImageSet
    key: str  # unique name, used for its output folder
    positives: list[np.ndarray] | None = None
    global_predictions: np.ndarray | None = None
    global_distances: np.ndarray | None = None
    scores: np.ndarray | None = None
    reranked: np.ndarray | None = None


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 3)
    logger.info("%s: %.1f s", stage, timings[stage])


def load_sets(config: EvalConfig) -> tuple[ImageSet, list[QuerySet]]:
    """The database and query sets, with positives when labelled."""
    if not config.queries_folders:
        raise ValueError("give at least one --queries_folder")
    database = load_image_set(config.database_folder, config.labelled)
    query_sets, keys = [], set()
    for folder in config.queries_folders:
        images = load_image_set(folder, config.labelled)
        key = output_key(folder, keys)
        keys.add(key)
        positives = None
        if config.labelled:
            positives = find_positives(database.utms, images.utms, config.positive_dist_threshold)
        query_sets.append(QuerySet(images=images, key=key, positives=positives))
    logger.info("Database: %d images; queries: %s", len(database), {s.key: len(s.images) for s in query_sets})
    return database, query_sets


def output_key(folder: Path, taken: set[str]) -> str:
    """The name of a query set's output folder: the query folder's own name (resolved, so that
    ``queries/..`` names its parent), made safe, never one of the run's own names, and unique."""
    name = UNSAFE_CHARACTERS.sub("_", Path(folder).resolve().name).strip("._") or "queries"
    if name in RESERVED_NAMES:
        name = f"queries_{name}"
    key, suffix = name, 1
    while key in taken:
        suffix += 1
        key = f"{name}_{suffix}"
    return key


def num_predictions(config: EvalConfig, num_database: int) -> int:
    """Predictions kept per query: enough for the recalls, the re-ranking and the saved figures."""
    wanted = max(max(config.recall_values), config.rerank_topk, config.num_preds_to_save)
    if wanted > num_database:
        logger.warning(
            "Only %d database images: keeping %d predictions per query, not %d (R@N above %d counts all of them, as "
            "VPR-methods-evaluation does)", num_database, num_database, wanted, num_database,
        )
    return min(wanted, num_database)


def _cache_inputs(config: EvalConfig, database: ImageSet, query_sets: list[QuerySet], weights: Path) -> dict:
    """What every cached file depends on (see :mod:`fol_plugin.cache.run_cache`)."""
    def listing(images: ImageSet) -> dict:
        return {"images": len(images), "listing": listing_digest(images.folder, images.paths)}

    return {
        "backbone": str(config.backbone),
        "weights": checkpoint_digest(weights),
        "image_size": list(config.extraction.image_size),
        "resize_mode": config.extraction.resize_mode,
        "database": listing(database),
        "queries": {query_set.key: listing(query_set.images) for query_set in query_sets},
    }


def _local_features(config: EvalConfig, folder: Path, num_ids: int) -> FeatureStore:
    """The local features of one image list: in RAM, or in a store named by its precision."""
    if config.in_memory:
        return InMemoryFeatures()
    return LocalFeatureStore(folder.with_name(f"{folder.name}_{config.store_dtype}"), num_ids, LOCAL_DIM, config.store_dtype)


def _extract_queries(
    config: EvalConfig, model: FoLModel, cache: Path, query_set: QuerySet, need_global: bool
) -> tuple[np.ndarray | None, FeatureStore | None]:
    paths = query_set.images.paths
    folder = cache / query_set.key
    local = _local_features(config, folder / "local", len(paths)) if config.rerank_topk else None
    descriptors = None
    if need_global:
        array = ResumableArray(folder / "queries_global.npy", (len(paths), GLOBAL_DIM))
        descriptors = extract_global(model, paths, array, config.extraction, local, desc=f"Queries {query_set.key}")
    if local is not None:
        extract_local(model, paths, np.arange(len(paths)), local, config.extraction, desc=f"Queries {query_set.key} (local)")
    return descriptors, local


def _rerank_set(
    config: EvalConfig, cache: Path, query_set: QuerySet, query_local: FeatureStore, database_local: FeatureStore
) -> None:
    top_k = min(config.rerank_topk, query_set.global_predictions.shape[1])
    local_dtype = "float32" if config.in_memory else config.store_dtype
    # Scores already computed are reused only for the same candidates, scorer and features.
    candidates = hashlib.sha1(np.ascontiguousarray(query_set.global_predictions[:, :top_k]).tobytes()).hexdigest()[:16]
    scorer = config.scorer
    method = config.precision if scorer.name == "fol" else f"{scorer.name}_{scorer.ransac_model}_{scorer.inlier_threshold}_{scorer.seed}"
    scores = ResumableArray(
        cache / query_set.key / f"rerank_scores_{method}_{local_dtype}_{candidates}.npy",
        (len(query_set.images), top_k),
    )
    pair_scorer = None
    if scorer.name != "fol":
        score_pair = make_pair_scorer(scorer)

        @functools.lru_cache(maxsize=1)  # one query at a time, against its top-k candidates
        def query_features(q: int) -> LocalFeatures:
            return LocalFeatures(query_local.keypoints(q), query_local[q])

        def pair_scorer(q: int, i: int) -> float:
            return score_pair(query_features(q), LocalFeatures(database_local.keypoints(i), database_local[i]))

    score_candidates(
        query_set.global_predictions,
        query_local,
        database_local,
        top_k,
        config.precision,
        device=config.extraction.device,
        out=scores.array,
        start=scores.rows_done,
        on_query_done=scores.commit,
        pair_scorer=pair_scorer,
    )
    query_set.scores = np.array(scores.array)
    query_set.reranked = order_by_scores(query_set.global_predictions, query_set.scores)


def _recalls(config: EvalConfig, query_set: QuerySet, predictions: np.ndarray | None) -> dict[str, float] | None:
    if predictions is None or query_set.positives is None:
        return None
    recalls = compute_recalls(predictions, query_set.positives, config.recall_values)
    return {f"R@{n}": round(value, 4) for n, value in recalls.items()}


def _write_outputs(config: EvalConfig, database: ImageSet, query_sets: list[QuerySet], timings: dict, extra: dict) -> dict:
    """Predictions, CSV, preds files and figures per query set; returns the recalls.json summary."""
    output_dir = config.output_dir
    summary = {"config": _json_config(config), "query_sets": {}, "timings_s": timings, **extra}
    for query_set in query_sets:
        folder = output_dir / query_set.key
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "predictions_global.npy", query_set.global_predictions)
        final = query_set.global_predictions
        if query_set.reranked is not None:
            np.save(folder / "predictions_reranked.npy", query_set.reranked)
            np.save(folder / "rerank_scores.npy", query_set.scores)
            final = query_set.reranked
        write_predictions_csv(
            folder / "predictions.csv",
            query_set.images.paths,
            database.paths,
            final,
            query_set.global_predictions,
            query_set.global_distances,
            query_set.scores,
            query_set.positives,
        )
        if config.num_preds_to_save:
            stages = [("global", query_set.global_predictions)]
            if query_set.reranked is not None:
                stages.append(("reranked", query_set.reranked))
            for stage, predictions in stages:
                shown = predictions[:, : config.num_preds_to_save]
                write_preds_files(folder / f"preds_{stage}", query_set.images.paths, database.paths, shown, query_set.positives)
                scores = None
                if query_set.scores is not None:
                    scores = scores_in_order(shown, query_set.global_predictions, query_set.scores)
                save_prediction_grids(
                    folder / f"preds_{stage}", query_set.images.paths, database.paths, shown, query_set.positives,
                    config.num_preds_to_save, f"{query_set.key} {stage}", scores,
                )
        summary["query_sets"][query_set.key] = {
            "num_queries": len(query_set.images),
            "rerank_topk_used": 0 if query_set.scores is None else int(query_set.scores.shape[1]),
            "global": _recalls(config, query_set, query_set.global_predictions),
            "reranked": _recalls(config, query_set, query_set.reranked),
        }
        for stage in ("global", "reranked"):
            if summary["query_sets"][query_set.key][stage]:
                logger.info("%s %s: %s", query_set.key, stage, summary["query_sets"][query_set.key][stage])
    temporary = output_dir / f"{RECALLS_FILE}.tmp"
    temporary.write_text(json.dumps(summary, indent=2))
    os.replace(temporary, output_dir / RECALLS_FILE)
    return summary


def _json_config(config: EvalConfig) -> dict:
    return json.loads(json.dumps(asdict(config), default=str))


def _keep_descriptors(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _prepare(config: EvalConfig) -> tuple[ImageSet, list[QuerySet]]:
    """Check the configuration and list the images, before anything is written."""
    check_image_size(config.extraction.image_size)
    if config.rerank_topk < 0:
        raise ValueError(f"--rerank_topk {config.rerank_topk} must be 0 (no re-ranking) or positive")
    if config.weights is None:
        raise ValueError("evaluation needs FoL weights: --weights auto (the published checkpoint) or a .pth file")
    return load_sets(config)


def _num_queries(query_sets: list[QuerySet]) -> int:
    return sum(len(query_set.images) for query_set in query_sets)


def _candidate_ids(query_sets: list[QuerySet], top_k: int) -> np.ndarray:
    """The database images among any query's first ``top_k`` predictions, sorted."""
    return np.unique(np.concatenate([query_set.global_predictions[:, :top_k].ravel() for query_set in query_sets]))


def _report_and_check(
    config: EvalConfig, cache: Path, num_database: int, query_sets: list[QuerySet], k: int, global_retrieval: bool
) -> float:
    """Log the projected resources and refuse a run the disk cannot hold; returns the projected disk bytes."""
    num_queries = _num_queries(query_sets)
    num_candidates = min(num_database, num_queries * min(config.rerank_topk, k))
    projection = project_resources(config, num_database, num_queries, num_candidates, global_retrieval)
    logger.info(
        "Projected: up to %.2f GB on disk in %s, %.2f GB of RAM beyond the model; local features up to %.2f MB per "
        "image (%s)", projection["disk"] / GB, cache, projection["ram"] / GB, projection["local_bytes_per_image"] / MB,
        "float32 in RAM" if config.in_memory else config.store_dtype,
    )
    check_disk(config.output_dir, projection["disk"], folder_bytes(cache))
    return projection["disk"]


@contextmanager
def _open_cache(
    config: EvalConfig, database: ImageSet, query_sets: list[QuerySet], k: int, global_retrieval: bool
) -> Iterator[tuple[Path, Path]]:
    """Lock the output folder, check its cache against this run, refuse a run the disk cannot
    hold, and turn a full disk into a message; yields (cache folder, local checkpoint file)."""
    with RunCache(config.output_dir) as run_cache:
        weights = weights_file(config.backbone, config.weights)
        run_cache.check(_cache_inputs(config, database, query_sets, weights))
        needed = _report_and_check(config, run_cache.folder, len(database), query_sets, k, global_retrieval)
        with disk_full_guard(config.output_dir, lambda: needed - folder_bytes(run_cache.folder)):
            yield run_cache.folder, weights
        if config.keep_cache:
            logger.info("Cache kept in %s", run_cache.folder)
        else:
            run_cache.discard()


def run_eval(config: EvalConfig) -> dict:
    """``fol-vpr eval``: FoL global retrieval, then FoL re-ranking, on one database and its query sets.

    Returns:
        The summary written to ``recalls.json``.
    """
    timings: dict[str, float] = {}
    database, query_sets = _prepare(config)
    k = num_predictions(config, len(database))
    with _open_cache(config, database, query_sets, k, global_retrieval=True) as (cache, weights):
        with _timed(timings, "load_model"):
            model = load_model(config.backbone, weights, config.extraction.device)
        query_global, query_local = {}, {}
        for query_set in query_sets:
            with _timed(timings, f"features_{query_set.key}"):
                query_global[query_set.key], query_local[query_set.key] = _extract_queries(
                    config, model, cache, query_set, True
                )
        database_local = _local_features(config, cache / "database_local", len(database)) if config.rerank_topk else None
        # Local features in the global pass when every database image may be a candidate (or they
        # are held in RAM anyway); else a second pass over the candidates only.
        single_pass = config.in_memory or _num_queries(query_sets) * min(config.rerank_topk, k) >= len(database)
        with _timed(timings, "features_database_global"):
            database_global = ResumableArray(cache / "database_global.npy", (len(database), GLOBAL_DIM))
            extract_global(
                model, database.paths, database_global, config.extraction,
                database_local if single_pass else None, desc="Database",
            )
        with _timed(timings, "global_search"):
            for query_set in query_sets:
                query_set.global_distances, query_set.global_predictions = exact_search(
                    database_global.array, query_global[query_set.key], k, config.search_chunk_size
                )
        extra = {}
        if config.rerank_topk:
            candidates = _candidate_ids(query_sets, min(config.rerank_topk, k))
            with _timed(timings, "features_database_local"):
                extract_local(model, database.paths, candidates, database_local, config.extraction, desc="Database (local)")
            for query_set in query_sets:
                with _timed(timings, f"rerank_{query_set.key}"):
                    _rerank_set(config, cache, query_set, query_local[query_set.key], database_local)
            if isinstance(database_local, LocalFeatureStore):
                extra["store_bytes_per_image"] = round(database_local.bytes_per_image())
                logger.info("Local features on disk: %.2f MB per image", extra["store_bytes_per_image"] / MB)
        with _timed(timings, "outputs"):
            if config.save_descriptors:
                _keep_descriptors(database_global.path, config.output_dir / DATABASE_DESCRIPTORS_FILE)
                for query_set in query_sets:
                    folder = config.output_dir / query_set.key
                    folder.mkdir(parents=True, exist_ok=True)
                    _keep_descriptors(cache / query_set.key / "queries_global.npy", folder / "queries_descriptors.npy")
            summary = _write_outputs(config, database, query_sets, timings, extra)
    return summary


def check_predictions(predictions: np.ndarray, num_queries: int, num_database: int, source: str) -> np.ndarray:
    """Given predictions as [Q, K] int64 database indices, or an error naming ``source``, the
    value and the fix."""
    given = np.asarray(predictions)
    if given.ndim != 2 or len(given) != num_queries or given.shape[1] == 0:
        raise ValueError(f"{source} are {given.shape}, expected [{num_queries} queries, K >= 1 predictions]")
    if not (np.issubdtype(given.dtype, np.integer) or np.issubdtype(given.dtype, np.floating)):
        raise ValueError(f"{source} hold {given.dtype} values, expected integer database indices")
    if np.issubdtype(given.dtype, np.floating):
        bad = ~np.isfinite(given) | (given != np.round(given))
        if bad.any():
            q, j = (int(v) for v in np.argwhere(bad)[0])
            raise ValueError(
                f"{source} hold {given[q, j]} at query {q}, rank {j}: database indices must be whole numbers; "
                "save them as integers"
            )
    outside = (given < 0) | (given >= num_database)
    if outside.any():
        q, j = (int(v) for v in np.argwhere(outside)[0])
        raise ValueError(
            f"{source} hold database index {int(given[q, j])} at query {q}, rank {j}, outside [0, {num_database}) "
            f"of this --database_folder: they are for another database"
        )
    return given.astype(np.int64)


def run_rerank(config: EvalConfig, predictions: list[np.ndarray]) -> dict:
    """``fol-vpr rerank``: FoL re-ranking of another method's predictions.

    Args:
        predictions: per query folder of ``config.queries_folders``, in order, [Q, K] database
            indices, best first.

    Returns:
        The summary written to ``recalls.json`` (recalls before and after re-ranking).
    """
    if config.rerank_topk <= 0:
        raise ValueError("fol-vpr rerank needs --rerank_topk > 0")
    timings: dict[str, float] = {}
    database, query_sets = _prepare(config)
    if len(predictions) != len(query_sets):
        raise ValueError(f"{len(predictions)} prediction arrays for {len(query_sets)} query folders")
    for query_set, given in zip(query_sets, predictions):
        query_set.global_predictions = check_predictions(
            given, len(query_set.images), len(database), f"the predictions for {query_set.images.folder}"
        )
    k = max(s.global_predictions.shape[1] for s in query_sets)
    with _open_cache(config, database, query_sets, k, global_retrieval=False) as (cache, weights):
        with _timed(timings, "load_model"):
            model = load_model(config.backbone, weights, config.extraction.device)
        database_local = _local_features(config, cache / "database_local", len(database))
        candidates = _candidate_ids(query_sets, config.rerank_topk)
        with _timed(timings, "features_database_local"):
            extract_local(model, database.paths, candidates, database_local, config.extraction, desc="Database (local)")
        for query_set in query_sets:
            with _timed(timings, f"features_{query_set.key}"):
                _, query_local = _extract_queries(config, model, cache, query_set, False)
            with _timed(timings, f"rerank_{query_set.key}"):
                _rerank_set(config, cache, query_set, query_local, database_local)
        with _timed(timings, "outputs"):
            summary = _write_outputs(config, database, query_sets, timings, {})
    return summary
