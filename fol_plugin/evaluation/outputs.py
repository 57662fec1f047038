"""What an evaluation writes: ``recalls.json``, predictions, per-query CSV, VPR-methods-evaluation
``preds/*.txt`` files, PNG grids, and reading those ``preds/*.txt`` files back."""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..data.datasets import ImageSet
from ..features.extract import extraction_precision
from ..files import json_safe, save_npy, write_csv, write_json, write_text
from .confidence import CONFIDENCE_FILE, assess, selection_record
from .config import RECALLS_FILE, EvalConfig, QuerySet
from .inputs import PREDS_HEADERS
from .recalls import compute_recalls
from .timings import StageClock

logger = logging.getLogger(__name__)



def write_predictions_csv(
    path: Path,
    query_paths: Sequence[str],
    database_paths: Sequence[str],
    predictions: np.ndarray,
    global_predictions: np.ndarray,
    global_distances: np.ndarray | None,
    scores: np.ndarray | None,
    positives: Sequence[np.ndarray] | None,
) -> None:
    """One row per query and rank of the final order: the database image, its global rank and
    distance, its FoL score (empty past the re-ranked candidates, and for a query not re-ranked:
    a NaN row of ``scores``) and whether it is a positive;
    written atomically and streamed, any file name quoted as CSV does."""
    header = ["query_index", "query_path", "rank", "database_index", "database_path", "global_rank", "global_distance",
              "rerank_score", "is_positive"]  # fmt: skip

    def rows() -> Iterator[list]:
        for q, row in enumerate(predictions):
            global_rank = {int(i): r for r, i in enumerate(global_predictions[q])}
            for rank, i in enumerate(row):
                g = global_rank[int(i)]
                yield [
                    q,
                    query_paths[q],
                    rank,
                    int(i),
                    database_paths[i],
                    g,
                    "" if global_distances is None else f"{global_distances[q, g]:.6g}",
                    "" if scores is None or g >= scores.shape[1] or np.isnan(scores[q, g]) else int(scores[q, g]),
                    "" if positives is None else int(np.isin(i, positives[q])),
                ]

    write_csv(path, header, rows())


def write_preds_files(
    folder: Path,
    query_paths: Sequence[str],
    database_paths: Sequence[str],
    predictions: np.ndarray,
    positives: Sequence[np.ndarray] | None,
    queries: Sequence[int] | None = None,
) -> None:
    """``folder/{q:03d}.txt`` per query (of ``queries``; all by default) in
    VPR-methods-evaluation's format (query path, predicted paths, and with labels positive
    paths), readable by :func:`read_preds_files` and that harness's tools."""
    folder.mkdir(parents=True, exist_ok=True)
    for q in range(len(predictions)) if queries is None else queries:
        row = predictions[q]
        sections = [PREDS_HEADERS[0], query_paths[q] + "\n", PREDS_HEADERS[1], "\n".join(database_paths[i] for i in row) + "\n"]
        if positives is not None:
            sections += [PREDS_HEADERS[2], "\n".join(database_paths[i] for i in positives[q]) + "\n"]
        write_text(folder / f"{q:03d}.txt", "\n".join(sections))


def in_display_order(predictions: np.ndarray, global_predictions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The value (FoL score, global distance) of each entry of ``predictions`` [Q, n], from
    ``values`` [Q, k] in the global order of ``global_predictions``; NaN past the first k."""
    shown = np.full(predictions.shape, np.nan)
    for q in range(len(predictions)):
        value_of = dict(zip(global_predictions[q, : values.shape[1]].tolist(), values[q].tolist()))
        shown[q] = [value_of.get(int(i), np.nan) for i in predictions[q]]
    return shown


def wrong_queries(predictions: np.ndarray, positives: Sequence[np.ndarray]) -> list[int]:
    """The queries whose first prediction [Q, n] is not a positive (``--save_only_wrong_preds``)."""
    return [q for q, row in enumerate(predictions) if not np.isin(row[0], positives[q])]


def _save_predictions_to_look_at(config: EvalConfig, folder: Path, database: ImageSet, query_set: QuerySet) -> None:
    """``--num_preds_to_save``: per stage, ``preds_<stage>/NNN.txt`` and ``NNN.png`` (only the
    queries whose first prediction is wrong with ``--save_only_wrong_preds``)."""
    stages = [("global", query_set.global_predictions)]
    if query_set.reranked is not None:
        stages.append(("reranked", query_set.reranked))
    for stage, predictions in stages:
        shown = predictions[:, : config.num_preds_to_save]
        queries = None
        if config.save_only_wrong_preds and query_set.positives is not None:
            queries = wrong_queries(shown, query_set.positives)
            logger.info("%s %s: %d of %d queries wrong at rank 1: saving those", query_set.key, stage, len(queries), len(shown))
        write_preds_files(folder / f"preds_{stage}", query_set.images.paths, database.paths, shown, query_set.positives, queries)
        scores = distances = None
        if query_set.scores is not None:
            scores = in_display_order(shown, query_set.global_predictions, query_set.scores)
        if query_set.global_distances is not None:
            distances = in_display_order(shown, query_set.global_predictions, query_set.global_distances)
        from ..visualization import save_prediction_grids  # matplotlib, imported by runs that draw only

        save_prediction_grids(
            folder / f"preds_{stage}", query_set.images.paths, database.paths, shown, query_set.positives,
            f"{query_set.key} {stage}", scores, distances, queries, config.extraction.max_image_pixels,
        )


def write_run_outputs(
    config: EvalConfig, database: ImageSet, query_sets: list[QuerySet], clock: StageClock, extra: dict
) -> dict:
    """Predictions, CSV, preds files, figures and ``confidence.json`` per query set, and
    ``recalls.json`` (written last, atomically and durably); returns its summary."""
    output_dir = config.output_dir
    summary = {
        "config": json_safe(config), "extraction_precision": extraction_precision(config.extraction), "query_sets": {},
        **clock.summary(), **extra,
    }  # fmt: skip
    for query_set in query_sets:
        folder = output_dir / query_set.key
        folder.mkdir(parents=True, exist_ok=True)
        save_npy(folder / "predictions_global.npy", query_set.global_predictions)
        final = query_set.global_predictions
        if query_set.reranked is not None:
            save_npy(folder / "predictions_reranked.npy", query_set.reranked)
            save_npy(folder / "rerank_scores.npy", query_set.scores)
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
            _save_predictions_to_look_at(config, folder, database, query_set)
        summary["query_sets"][query_set.key] = {
            "num_queries": len(query_set.images),
            "rerank_topk_used": 0 if query_set.scores is None else int(query_set.scores.shape[1]),
            "global": _recalls(config, query_set, query_set.global_predictions),
            "reranked": _recalls(config, query_set, query_set.reranked),
        }
        if query_set.selected is not None:
            summary["query_sets"][query_set.key]["rerank_selection"] = selection_record(query_set, config.rerank_fraction)
        summary["query_sets"][query_set.key]["confidence"], points = assess(query_set)
        if points is not None:
            write_json(folder / CONFIDENCE_FILE, points)
        for stage in ("global", "reranked"):
            if summary["query_sets"][query_set.key][stage]:
                logger.info("%s %s: %s", query_set.key, stage, summary["query_sets"][query_set.key][stage])
    write_json(output_dir / RECALLS_FILE, summary)
    return summary


def _recalls(config: EvalConfig, query_set: QuerySet, predictions: np.ndarray | None) -> dict[str, float] | None:
    if predictions is None or query_set.positives is None:
        return None
    recalls = compute_recalls(predictions, query_set.positives, config.recall_values)
    return {f"R@{n}": round(value, 4) for n, value in recalls.items()}


def keep_descriptors(source: Path, target: Path) -> None:
    """``target`` as a hard link to the cached ``source`` (a copy across file systems)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
