"""What a report shows, read from a finished run's folder and nothing else: ``recalls.json``
(configuration, timings, recalls, confidence, the ``--rerank_fraction`` selection), each query
set's ``predictions.csv`` (every query's predictions in both orders, scores, distances, labels)
and ``confidence.json`` (the curves' points); for a benchmark, ``benchmark.json`` and the rows
of its results tables (:func:`fol_plugin.benchmark.tables.build_rows`, the published numbers
beside)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..benchmark.tables import BENCHMARK_FILE, build_rows, read_record
from ..errors import UserError
from ..evaluation.confidence import CONFIDENCE_FILE
from ..evaluation.config import RECALLS_FILE
from ..evaluation.records import check_confidence_points, check_recalls, read_prediction_rows
from ..files import read_json

MAX_SHOWN = 10  # predictions shown per stage and query
# A query's status, as the report's filter names it (its order is the filter's).
STATUSES = {
    "fixed": "fixed by re-ranking",
    "broken": "broken by re-ranking",
    "wrong": "wrong in both",
    "right": "right in both",
    "unlabelled": "unlabelled",
}
PREDICTIONS_FILE = "predictions.csv"
RUN_DIR_HELP = (
    "RUN_DIR must be the --output_dir of a finished fol-vpr eval or rerank run (with recalls.json) or of a fol-vpr "
    "benchmark (with benchmark.json)"
)


class RunFolderError(UserError, FileNotFoundError):
    """A folder the report cannot be made from: not a finished run, or a run missing its files."""


@dataclass
class Prediction:
    """One prediction of a query, as ``predictions.csv`` gives it."""

    database_index: int
    path: str
    global_rank: int  # 0-based
    distance: float | None  # squared L2; None when the run had no global distances
    score: float | None  # FoL score; None past the re-ranked candidates or for a query not re-ranked
    positive: bool | None  # None without labels


@dataclass
class Query:
    """A query and its first predictions before and after re-ranking."""

    index: int
    path: str
    global_top: list[Prediction]  # [k], global order
    reranked_top: list[Prediction] | None  # [k], final order; None when the run did not re-rank
    reranked: bool  # whether re-ranking ran on it (False: it kept its global order, --rerank_fraction)

    @property
    def status(self) -> str:
        """Its key in :data:`STATUSES`: whether re-ranking fixed or broke its top-1."""
        before = self.global_top[0].positive
        if before is None:
            return "unlabelled"
        after = before if self.reranked_top is None else self.reranked_top[0].positive
        return {(False, True): "fixed", (True, False): "broken", (False, False): "wrong"}.get((before, after), "right")

    @property
    def changed(self) -> bool:
        """Whether re-ranking changed its top-1."""
        return self.reranked_top is not None and self.reranked_top[0].database_index != self.global_top[0].database_index


@dataclass
class QuerySetData:
    """A query set of a run: its ``recalls.json`` entry, its queries and its curves' points."""

    key: str
    results: dict  # recalls.json "query_sets"[key]
    queries: list[Query]
    points: dict | None  # confidence.json; None without labels


@dataclass
class RunData:
    """A finished ``fol-vpr eval`` or ``rerank`` run."""

    folder: Path
    summary: dict  # recalls.json
    query_sets: list[QuerySetData]


@dataclass
class BenchmarkData:
    """A ``fol-vpr benchmark`` folder: its record, table rows and each finished dataset's run."""

    folder: Path
    record: dict  # benchmark.json
    meta: dict  # what the rows share (fol_plugin.benchmark.tables.describe_run)
    rows: list[dict]  # one per query set (fol_plugin.benchmark.tables.build_rows)
    runs: dict[str, RunData | None]  # dataset -> its run; None when it did not finish


def read_folder(folder: str | os.PathLike) -> RunData | BenchmarkData:
    """The run or benchmark in ``folder``.

    Raises:
        RunFolderError: ``folder`` holds neither ``recalls.json`` nor ``benchmark.json``, or a
            query set's ``predictions.csv`` is missing.
        DamagedFileError: a damaged JSON record, naming it and what to do.
    """
    folder = Path(folder)
    if (folder / RECALLS_FILE).is_file():
        return read_run(folder)
    if read_record(folder) is not None:
        return read_benchmark(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder} is a file, not a run folder: {RUN_DIR_HELP}")
    if not folder.is_dir():
        raise RunFolderError(f"{folder} does not exist: {RUN_DIR_HELP}")
    raise RunFolderError(f"{folder} holds no {RECALLS_FILE} nor {BENCHMARK_FILE}: {RUN_DIR_HELP}")


def read_run(folder: Path) -> RunData:
    """The ``fol-vpr eval`` / ``rerank`` run in ``folder`` (which holds ``recalls.json``)."""
    fix = f"rerun the command that made {folder}"
    summary = check_recalls(read_json(folder / RECALLS_FILE, fix), folder / RECALLS_FILE, fix)
    query_sets = []
    for key, results in summary["query_sets"].items():
        csv_path = folder / key / PREDICTIONS_FILE
        if not csv_path.is_file():
            raise RunFolderError(
                f"{csv_path} is missing: the report reads every query set's predictions from it; rerun the command that "
                f"made {folder}"
            )
        selection = results.get("rerank_selection")
        selected = None if selection is None else set(selection["queries"])
        queries = read_predictions(csv_path, results["num_queries"], results["rerank_topk_used"] > 0, selected, fix)
        points_path = folder / key / CONFIDENCE_FILE
        points = check_confidence_points(read_json(points_path, fix), points_path, fix) if points_path.is_file() else None
        query_sets.append(QuerySetData(key, results, queries, points))
    return RunData(folder, summary, query_sets)


def read_predictions(path: Path, num_queries: int, reranked: bool, selected: set[int] | None, fix: str) -> list[Query]:
    """Every query of a ``predictions.csv`` (checked: :func:`~fol_plugin.evaluation.records.read_prediction_rows`),
    with its first :data:`MAX_SHOWN` predictions in the global order and (when ``reranked``) in the final order.

    Args:
        num_queries: the query set's queries, as ``recalls.json`` records them.
        reranked: whether the run re-ranked (the final order is then the re-ranked one).
        selected: the queries re-ranked under ``--rerank_fraction``; None: all.
        fix: what to do when the file is damaged.
    """
    rows = read_prediction_rows(path, num_queries, fix)
    queries = []
    for index, entries in sorted(rows.items()):
        final = [_prediction(entry) for entry in sorted(entries, key=lambda entry: entry["rank"])]
        in_global_order = sorted(final, key=lambda prediction: prediction.global_rank)
        queries.append(Query(
            index=index,
            path=entries[0]["query_path"],
            global_top=in_global_order[:MAX_SHOWN],
            reranked_top=final[:MAX_SHOWN] if reranked else None,
            reranked=reranked and (selected is None or index in selected),
        ))  # fmt: skip
    return queries


def _prediction(entry: dict) -> Prediction:
    """A checked row of ``predictions.csv`` (numbers parsed, empty values None)."""
    return Prediction(
        database_index=entry["database_index"],
        path=entry["database_path"],
        global_rank=entry["global_rank"],
        distance=entry["global_distance"],
        score=entry["rerank_score"],
        positive=bool(int(entry["is_positive"])) if entry["is_positive"] else None,
    )


def read_benchmark(folder: Path) -> BenchmarkData:
    """The benchmark in ``folder`` (which holds ``benchmark.json``)."""
    meta, rows = build_rows(folder)
    record = read_record(folder)
    runs: dict[str, RunData | None] = {}
    for name in record.get("order", list(record["datasets"])):
        done = record["datasets"][name].get("status") == "done" and (folder / name / RECALLS_FILE).is_file()
        runs[name] = read_run(folder / name) if done else None
    return BenchmarkData(folder, record, meta, rows, runs)
