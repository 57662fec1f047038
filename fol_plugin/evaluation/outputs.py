"""What an evaluation writes: ``recalls.json``, predictions, per-query CSV, VPR-methods-evaluation
``preds/*.txt`` files, PNG grids, and reading those ``preds/*.txt`` files back."""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data import load_image
from ..data.datasets import ImageSet
from ..files import save_npy, write_json, write_text
from ..options import DEFAULT_MAX_IMAGE_PIXELS
from .confidence import CONFIDENCE_FILE, assess, selection_record
from .config import RECALLS_FILE, EvalConfig, QuerySet
from .recalls import compute_recalls

logger = logging.getLogger(__name__)

CORRECT_COLOUR = "tab:green"
WRONG_COLOUR = "tab:red"
PANEL_INCHES = 3.0
TITLE_CHARS = 28
TITLE_FONT_SIZE = 11
FRAME_WIDTH = 5
GRID_DPI = 100
PREDS_HEADERS = ("Query path:", "Predictions paths:", "Positives paths:")


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
    written atomically, any file name quoted as CSV does."""
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(
        ["query_index", "query_path", "rank", "database_index", "database_path", "global_rank", "global_distance",
         "rerank_score", "is_positive"]
    )
    for q, row in enumerate(predictions):
        global_rank = {int(i): r for r, i in enumerate(global_predictions[q])}
        for rank, i in enumerate(row):
            g = global_rank[int(i)]
            writer.writerow([
                q,
                query_paths[q],
                rank,
                int(i),
                database_paths[i],
                g,
                "" if global_distances is None else f"{global_distances[q, g]:.6g}",
                "" if scores is None or g >= scores.shape[1] or np.isnan(scores[q, g]) else int(scores[q, g]),
                "" if positives is None else int(np.isin(i, positives[q])),
            ])
    write_text(path, table.getvalue())


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
        (folder / f"{q:03d}.txt").write_text("\n".join(sections), encoding="utf-8", errors="surrogateescape")


def read_preds_files(folder: str | os.PathLike, query_paths: Sequence[str], database_paths: Sequence[str]) -> np.ndarray:
    """Predictions [Q, K] (indices into ``database_paths``) from VPR-methods-evaluation's
    ``preds/{q:03d}.txt`` files, one per query of ``query_paths`` in order."""
    folder = Path(folder)
    database_index = {_path_key(path): i for i, path in enumerate(database_paths)}
    rows = []
    for q, query_path in enumerate(query_paths):
        path = folder / f"{q:03d}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {folder} must hold one file per query ({len(query_paths)})")
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()]
        try:
            start = lines.index(PREDS_HEADERS[1]) + 1
            listed_query = lines[lines.index(PREDS_HEADERS[0]) + 1]
        except ValueError:
            raise ValueError(
                f"{path} is not a VPR-methods-evaluation predictions file (no {PREDS_HEADERS[:2]} sections)"
            ) from None
        # The positives section is there only when the harness had labels.
        end = lines.index(PREDS_HEADERS[2]) if PREDS_HEADERS[2] in lines else len(lines)
        if _path_key(listed_query) != _path_key(query_path):
            raise ValueError(
                f"{path} is for query {listed_query}, but query {q} of --queries_folder is {query_path}: "
                f"the predictions come from another query set"
            )
        row = []
        for line in filter(None, lines[start:end]):
            if _path_key(line) not in database_index:
                raise ValueError(f"{path} predicts {line}, which is not an image of --database_folder")
            row.append(database_index[_path_key(line)])
        rows.append(row)
    lengths = {len(row) for row in rows}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"the files in {folder} list different or zero numbers of predictions: {sorted(lengths)}")
    return np.array(rows, dtype=np.int64)


def _path_key(path: str) -> str:
    """Paths compare by their last three components, so relative and absolute spellings match."""
    return "/".join(Path(path).parts[-3:])


def save_prediction_grids(
    folder: Path,
    query_paths: Sequence[str],
    database_paths: Sequence[str],
    predictions: np.ndarray,
    positives: Sequence[np.ndarray] | None,
    title: str,
    scores: np.ndarray | None = None,
    distances: np.ndarray | None = None,
    queries: Sequence[int] | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> None:
    """``folder/{q:03d}.png``: the query then its predictions [Q, n], each titled by
    :func:`panel_labels` (``scores`` and ``distances`` [Q, n], NaN where there is none), framed
    green (positive) or red (not) when labelled.

    Args:
        queries: the queries to draw (all by default).
        max_image_pixels: images of more pixels are refused
            (:func:`fol_plugin.data.images.check_image_pixels`).
    """
    from matplotlib.figure import Figure  # imported by runs that draw only

    folder.mkdir(parents=True, exist_ok=True)
    shown = range(len(predictions)) if queries is None else queries
    for q in tqdm(shown, desc=f"Figures ({title})", unit="query"):
        row = predictions[q]
        figure = Figure(figsize=(PANEL_INCHES * (len(row) + 1), PANEL_INCHES + 1.2), layout="constrained")
        axes = np.atleast_1d(figure.subplots(1, len(row) + 1))
        correct = [None if positives is None else bool(np.isin(i, positives[q])) for i in row]
        labels = panel_labels(
            query_paths[q], [database_paths[i] for i in row], None if scores is None else scores[q],
            None if distances is None else distances[q], correct,
        )  # fmt: skip
        for axis, path, label, frame in zip(axes, [query_paths[q], *(database_paths[i] for i in row)], labels, [None, *correct]):
            axis.imshow(load_image(path, max_image_pixels).permute(1, 2, 0).numpy())
            axis.set_title(label, fontsize=TITLE_FONT_SIZE, loc="left")
            axis.set_xticks([])
            axis.set_yticks([])
            if frame is not None:
                for spine in axis.spines.values():
                    spine.set_edgecolor(CORRECT_COLOUR if frame else WRONG_COLOUR)
                    spine.set_linewidth(FRAME_WIDTH)
        figure.suptitle(f"{title}: query {q}", fontsize=TITLE_FONT_SIZE + 2, x=0.0, ha="left")
        figure.savefig(folder / f"{q:03d}.png", dpi=GRID_DPI)


def panel_labels(
    query_path: str,
    prediction_paths: Sequence[str],
    scores: np.ndarray | None,
    distances: np.ndarray | None = None,
    correct: Sequence[bool | None] | None = None,
) -> list[str]:
    """Titles of a grid's panels: "query" and its place, then each prediction's rank, whether it
    is a positive, its place, FoL score and global distance (squared L2, as the search returns
    it) (``scores``, ``distances`` [n], NaN where there is none). A place is the UTM coordinates of a VPR-datasets-downloader name
    (``@east@north@...``), else the file name, shortened."""
    labels = [f"query\n{short_name(query_path)}"]
    for rank, path in enumerate(prediction_paths):
        verdict = "" if correct is None or correct[rank] is None else (" correct" if correct[rank] else " wrong")
        lines = [f"#{rank + 1}{verdict}", short_name(path)]
        numbers = []
        if scores is not None and np.isfinite(scores[rank]):
            numbers.append(f"FoL {scores[rank]:.0f}")
        if distances is not None and np.isfinite(distances[rank]):
            numbers.append(f"L2² {distances[rank]:.3f}")
        if numbers:
            lines.append(", ".join(numbers))
        labels.append("\n".join(lines))
    return labels


def short_name(path: str) -> str:
    """How a panel names an image: ``UTM 551234 E, 4178123 N`` for a VPR-datasets-downloader
    name, else its file name, the middle elided past ``TITLE_CHARS`` (bytes that are not UTF-8
    shown as U+FFFD)."""
    name = os.fsencode(Path(path).name).decode("utf-8", errors="replace")
    fields = name.split("@")
    try:
        return f"UTM {float(fields[1]):.0f} E, {float(fields[2]):.0f} N"
    except (IndexError, ValueError):
        pass
    return name if len(name) <= TITLE_CHARS else name[: TITLE_CHARS // 2 - 1] + "..." + name[-(TITLE_CHARS // 2 - 2) :]


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
        save_prediction_grids(
            folder / f"preds_{stage}", query_set.images.paths, database.paths, shown, query_set.positives,
            f"{query_set.key} {stage}", scores, distances, queries, config.extraction.max_image_pixels,
        )


def write_run_outputs(config: EvalConfig, database: ImageSet, query_sets: list[QuerySet], timings: dict, extra: dict) -> dict:
    """Predictions, CSV, preds files, figures and ``confidence.json`` per query set, and
    ``recalls.json`` (written last, atomically and durably); returns its summary."""
    output_dir = config.output_dir
    summary = {"config": json_config(config), "query_sets": {}, "timings_s": timings, **extra}
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


def json_config(config: EvalConfig) -> dict:
    return json.loads(json.dumps(asdict(config), default=str))


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
