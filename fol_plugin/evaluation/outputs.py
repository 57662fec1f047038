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
from matplotlib.figure import Figure
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
TITLE_CHARS = 32
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
) -> None:
    """``folder/{q:03d}.txt`` per query in VPR-methods-evaluation's format (query path, predicted
    paths, and with labels positive paths), readable by :func:`read_preds_files` and that
    harness's tools."""
    folder.mkdir(parents=True, exist_ok=True)
    for q, row in enumerate(predictions):
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
    num_preds: int,
    title: str,
    scores: np.ndarray | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> None:
    """``folder/{q:03d}.png``: the query then its first ``num_preds`` predictions, each titled
    with its rank, file name and FoL score (``scores`` [Q, num_preds], NaN where there is none),
    framed green (positive) or red (not) when labelled; images of more than ``max_image_pixels``
    are refused (:func:`fol_plugin.data.images.check_image_pixels`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for q in tqdm(range(len(predictions)), desc=f"Figures ({title})", unit="query"):
        row = predictions[q, :num_preds]
        figure = Figure(figsize=(PANEL_INCHES * (len(row) + 1), PANEL_INCHES + 0.6))
        axes = figure.subplots(1, len(row) + 1)
        labels = panel_labels(query_paths[q], [database_paths[i] for i in row], None if scores is None else scores[q])
        panels = [(query_paths[q], labels[0], None)]
        for i, label in zip(row, labels[1:]):
            panels.append((database_paths[i], label, None if positives is None else bool(np.isin(i, positives[q]))))
        for axis, (path, label, correct) in zip(np.atleast_1d(axes), panels):
            axis.imshow(load_image(path, max_image_pixels).permute(1, 2, 0).numpy())
            axis.set_title(label, fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
            if correct is not None:
                for spine in axis.spines.values():
                    spine.set_edgecolor(CORRECT_COLOUR if correct else WRONG_COLOUR)
                    spine.set_linewidth(4)
        figure.suptitle(f"{title}: query {q}")
        figure.tight_layout()
        figure.savefig(folder / f"{q:03d}.png", dpi=80)


def panel_labels(query_path: str, prediction_paths: Sequence[str], scores: np.ndarray | None) -> list[str]:
    """Titles of a grid's panels: the query's file name, then each prediction's rank, file name
    and FoL score (``scores`` [n], NaN where it has none)."""
    labels = [f"query\n{_short_name(query_path)}"]
    for rank, path in enumerate(prediction_paths):
        label = f"#{rank + 1}: {_short_name(path)}"
        if scores is not None and np.isfinite(scores[rank]):
            label += f"\nFoL score {scores[rank]:.0f}"
        labels.append(label)
    return labels


def _short_name(path: str) -> str:
    """A file name short enough for a panel title (the middle elided; bytes that are not UTF-8
    shown as U+FFFD)."""
    name = os.fsencode(Path(path).name).decode("utf-8", errors="replace")
    return name if len(name) <= TITLE_CHARS else name[: TITLE_CHARS // 2 - 1] + "..." + name[-(TITLE_CHARS // 2 - 2) :]


def scores_in_order(predictions: np.ndarray, global_predictions: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The FoL score of each entry of ``predictions`` [Q, n]: scores [Q, k] are in the global
    order; NaN past the re-ranked candidates."""
    shown = np.full(predictions.shape, np.nan)
    for q in range(len(predictions)):
        score_of = dict(zip(global_predictions[q, : scores.shape[1]].tolist(), scores[q].tolist()))
        shown[q] = [score_of.get(int(i), np.nan) for i in predictions[q]]
    return shown


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
                    config.num_preds_to_save, f"{query_set.key} {stage}", scores, config.extraction.max_image_pixels,
                )
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
