"""What a run is: its configuration (:class:`EvalConfig`), its database and query sets with
their positives, their output folder names, and checks of the predictions a user gives."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache.run_cache import CACHE_FOLDER, LOCK_FILE
from ..data.datasets import ImageSet, find_positives, load_image_set
from ..data.images import image_dimensions, network_size
from ..config import EvalConfig
from ..features import check_image_size
from ..features.extract import warn_if_emulated
from ..options import GLOBAL_DTYPES

logger = logging.getLogger(__name__)

RECALLS_FILE = "recalls.json"
DATABASE_DESCRIPTORS_FILE = "database_descriptors.npy"
# Names a query set's output folder may not take: they are the run's own files and folders.
RESERVED_NAMES = {CACHE_FOLDER, LOCK_FILE, RECALLS_FILE, DATABASE_DESCRIPTORS_FILE}
UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass
class QuerySet:
    """A query set with what the run computes for it."""

    images: ImageSet
    key: str  # unique name, used for its output folder
    positives: list[np.ndarray] | None = None
    global_predictions: np.ndarray | None = None
    global_distances: np.ndarray | None = None
    scores: np.ndarray | None = None  # [Q, k] in the global order; NaN rows for queries not re-ranked
    reranked: np.ndarray | None = None
    selected: np.ndarray | None = None  # the queries re-ranked (sorted) under --rerank_fraction; None: all


def load_sets(config: EvalConfig) -> tuple[ImageSet, list[QuerySet]]:
    """The database and query sets, with positives when labelled."""
    if not config.queries_folders:
        raise ValueError("give at least one --queries_folder")
    database = load_image_set(config.database_folder, config.labelled, config.allow_outside_paths)
    query_sets, keys = [], set()
    for folder in config.queries_folders:
        images = load_image_set(folder, config.labelled, config.allow_outside_paths)
        key = output_key(folder, keys)
        keys.add(key)
        positives = None
        if config.labelled:
            positives = find_positives(database.utms, images.utms, config.positive_dist_threshold)
        query_sets.append(QuerySet(images=images, key=key, positives=positives))
    if config.num_preds_to_save:
        _check_line_breaks([database, *(query_set.images for query_set in query_sets)])
    if config.save_only_wrong_preds and not (config.num_preds_to_save and config.labelled):
        logger.warning(
            "--save_only_wrong_preds needs --num_preds_to_save and labels to tell wrong queries: %s",
            "every query's predictions are saved" if config.num_preds_to_save else "nothing is saved",
        )
    logger.info("Database: %d images; queries: %s", len(database), {s.key: len(s.images) for s in query_sets})
    return database, query_sets


def _check_line_breaks(image_sets: list[ImageSet]) -> None:
    """Refuse, before any work, file names that ``preds/*.txt`` (one path a line, the format
    VPR-methods-evaluation reads) cannot hold."""
    for images in image_sets:
        broken = next((path for path in images.paths if "\n" in path or "\r" in path), None)
        if broken is not None:
            raise ValueError(
                f"the image file name {broken!r} holds a line break, which preds/*.txt files (one path a line) cannot "
                "hold: rename the file, or run without --num_preds_to_save (predictions.csv quotes such names)"
            )


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
        depth = ""
        if config.rerank_topk > num_database:
            depth = f"; re-ranking the top {num_database}, not --rerank_topk {config.rerank_topk}"
        logger.warning(
            "Only %d database images: keeping %d predictions per query, not %d (R@N above %d counts all of them, as "
            "VPR-methods-evaluation does)%s", num_database, num_database, wanted, num_database, depth,
        )
    return min(wanted, num_database)


def warn_shallow_predictions(config: EvalConfig, source: str, available: int, num_database: int) -> None:
    """One warning line when ``available`` predictions per query (given to ``fol-vpr rerank``)
    are fewer than ``--rerank_topk`` or than the largest recall value needs."""
    problems = []
    if config.rerank_topk > available:
        problems.append(f"re-ranking the top {available}, not --rerank_topk {config.rerank_topk}")
    beyond = [n for n in config.recall_values if n > available]
    if beyond and available < num_database:
        recalls = ", ".join(f"R@{n}" for n in beyond)
        problems.append(f"{recalls} count only those {available} (lower bounds: the database has {num_database} images)")
    if problems:
        logger.warning(
            "%s hold %d predictions per query: %s; give more predictions (VPR-methods-evaluation: --num_preds_to_save %d)",
            source, available, "; ".join(problems), max(config.rerank_topk, *config.recall_values),
        )  # fmt: skip


def prepare(config: EvalConfig) -> tuple[ImageSet, list[QuerySet]]:
    """Check the configuration and list the images, before anything is written."""
    check_image_size(config.extraction.image_size)
    if not 0 < config.positive_dist_threshold < np.inf:
        raise ValueError(
            f"--positive_dist_threshold {config.positive_dist_threshold} must be a positive finite number of metres"
        )
    if config.rerank_topk < 0:
        raise ValueError(f"--rerank_topk {config.rerank_topk} must be 0 (no re-ranking) or positive")
    if not 0 <= config.rerank_fraction <= 1:
        raise ValueError(f"--rerank_fraction {config.rerank_fraction} must be between 0 and 1 (the share re-ranked)")
    if config.rerank_fraction < 1 and not config.rerank_topk:
        raise ValueError(
            f"--rerank_fraction {config.rerank_fraction} chooses the queries to re-rank, but --rerank_topk 0 re-ranks none: "
            "give --rerank_topk > 0 or drop --rerank_fraction"
        )
    if config.weights is None:
        raise ValueError("evaluation needs FoL weights: --weights auto (the published checkpoint) or a .pth file")
    if config.global_dtype not in GLOBAL_DTYPES:
        raise ValueError(f"--global_dtype {config.global_dtype!r}; choose one of {GLOBAL_DTYPES}")
    warn_if_emulated(config.extraction)
    database, query_sets = load_sets(config)
    if len(config.extraction.image_size) == 1:
        _log_size_rule(config.extraction.image_size, database.paths[0])
    return database, query_sets


def _log_size_rule(image_size: tuple[int], example: str) -> None:
    """What one ``--image_size`` value does, shown on the database's first image."""
    width, height = image_dimensions(example)
    new_height, new_width = network_size(image_size, height, width)
    logger.info(
        "--image_size %d: each image's shorter side to %d and the other side by its aspect ratio, both rounded to the "
        "nearest multiple of 14, as FoL needs (%s: %dx%d -> %dx%d); images of one size are batched together",
        image_size[0], image_size[0], Path(example).name, width, height, new_width, new_height,
    )  # fmt: skip


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
    ranked = np.sort(given, axis=1)
    repeated = np.argwhere(ranked[:, 1:] == ranked[:, :-1])
    if len(repeated):
        q = int(repeated[0, 0])
        index = int(ranked[q, repeated[0, 1]])
        ranks = np.flatnonzero(given[q] == index).tolist()
        raise ValueError(
            f"{source} list database index {index} {len(ranks)} times for query {q} (ranks {ranks}): each query's "
            "predictions must be distinct database images, best first"
        )
    return given.astype(np.int64)
