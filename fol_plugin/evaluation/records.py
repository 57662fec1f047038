"""A finished run's records read back, checked: ``recalls.json``, ``confidence.json``,
``predictions.csv`` and a benchmark's ``benchmark.json`` as the report and the benchmark tables
read them, from a folder that may have been cut short, edited or sent by someone else.

Each check raises :class:`DamagedRecordError`, one line naming the file, what is wrong in it and
what to do (rerun the command that made it), never a traceback from deep inside the report.
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

from ..errors import UserError

RECALL_NAME = re.compile(r"R@\d+")
STAGES = ("global", "reranked")
PREDICTION_COLUMNS = (
    "query_index", "query_path", "rank", "database_index", "database_path", "global_rank", "global_distance",
    "rerank_score", "is_positive",
)  # fmt: skip


class DamagedRecordError(UserError, ValueError):
    """A record file of a finished run is damaged, edited or of another run."""


def damaged(path: Path, what: str, fix: str) -> DamagedRecordError:
    return DamagedRecordError(f"{path}: {what}; {fix}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _expect(ok: bool, path: Path, what: str, fix: str) -> None:
    if not ok:
        raise damaged(path, what, fix)


def check_recalls(summary: Any, path: Path, fix: str, counts: bool = True) -> dict:
    """``recalls.json`` as the report and the tables read it -> the same record; ``counts``: each
    query set must record ``num_queries`` and ``rerank_topk_used`` (the report reads them; the
    tables take the counts from ``benchmark.json``).

    Raises:
        DamagedRecordError: a missing or mistyped field, naming it.
    """
    _expect(isinstance(summary, dict), path, f"holds a {type(summary).__name__}, not the run's record", fix)
    sets = summary.get("query_sets")
    _expect(isinstance(sets, dict) and bool(sets), path, "has no query_sets record", fix)
    _expect(isinstance(summary.get("config", {}), dict), path, "config is not a record", fix)
    timings = summary.get("timings_s", {})
    _expect(isinstance(timings, dict) and all(_is_number(v) for v in timings.values()), path,
            "timings_s is not a record of seconds", fix)  # fmt: skip
    _expect(_is_count(summary.get("timings_runs", 1)), path, "timings_runs is not a count", fix)
    for key, results in sets.items():
        where = f"query_sets.{key}"
        _expect(isinstance(results, dict), path, f"{where} is not a record", fix)
        for field in ("num_queries", "rerank_topk_used"):
            if counts or field in results:
                value = results.get(field)
                _expect(_is_count(value), path, f"{where}.{field} is {value!r}, not a count", fix)
        for stage in STAGES:
            recalls = results.get(stage)
            _expect(
                recalls is None or (isinstance(recalls, dict) and all(
                    RECALL_NAME.fullmatch(str(name)) and _is_number(value) for name, value in recalls.items()
                )),
                path, f"{where}.{stage} is not a record of recalls (R@N: a number)", fix,
            )  # fmt: skip
        confidence = results.get("confidence")
        _expect(
            confidence is None or (
                isinstance(confidence, dict)
                and all(confidence.get(f"{stage}_ap") is None or _is_number(confidence[f"{stage}_ap"]) for stage in STAGES)
                and isinstance(confidence.get("undefined", {}), dict)
            ),
            path, f"{where}.confidence is not a record of APs (a number or null each, and why undefined)", fix,
        )  # fmt: skip
        selection = results.get("rerank_selection")
        _expect(
            selection is None or (isinstance(selection, dict) and isinstance(selection.get("queries"), list)
                                  and all(_is_count(q) for q in selection["queries"])),
            path, f"{where}.rerank_selection does not list the queries re-ranked", fix,
        )  # fmt: skip
    return summary


def check_benchmark_record(record: Any, path: Path, fix: str) -> dict:
    """``benchmark.json`` as the tables and the report read it -> the same record: its datasets'
    entries (counts, query set names, published names, peak memory) and their order."""
    datasets = record.get("datasets") if isinstance(record, dict) else None
    _expect(isinstance(datasets, dict) and all(isinstance(entry, dict) for entry in datasets.values()), path,
            "has no record of its datasets", fix)  # fmt: skip
    _expect(isinstance(record.get("config", {}), dict), path, "config is not a record", fix)
    order = record.get("order", list(datasets))
    _expect(isinstance(order, list) and all(name in datasets for name in order), path,
            "order names datasets it has no record of", fix)  # fmt: skip
    for name, entry in datasets.items():
        where = f"datasets.{name}"
        counts, sets = entry.get("counts", {}), entry.get("query_sets", {})
        _expect(isinstance(counts, dict) and all(isinstance(v, int) and v >= 0 for v in counts.values()), path,
                f"{where}.counts is not a record of counts", fix)  # fmt: skip
        _expect(isinstance(sets, dict) and all(isinstance(v, str) for v in sets.values()), path,
                f"{where}.query_sets is not a record of query set names", fix)  # fmt: skip
        _expect(isinstance(entry.get("published_as", {}), dict), path, f"{where}.published_as is not a record of names", fix)
        for field in ("peak_memory_mb", "peak_gpu_memory_mb"):
            value = entry.get(field)
            _expect(value is None or isinstance(value, (int, float)), path, f"{where}.{field} is {value!r}, not a number", fix)
    return record


def check_confidence_points(points: Any, path: Path, fix: str) -> dict:
    """``confidence.json``: per stage the precision-recall points, and the adaptive curve, each a
    pair of equally long, non-empty lists of numbers -> the same record."""
    _expect(isinstance(points, dict), path, f"holds a {type(points).__name__}, not the curves' points", fix)
    curves = {stage: ("recall", "precision") for stage in STAGES} | {"adaptive": ("fraction", "R@1")}
    for name, (x, y) in curves.items():
        curve = points.get(name)
        if curve is None:
            continue
        _expect(isinstance(curve, dict), path, f"{name} is not a curve", fix)
        xs, ys = curve.get(x), curve.get(y)
        _expect(
            isinstance(xs, list) and isinstance(ys, list) and len(xs) == len(ys) > 0
            and all(_is_number(v) for v in (*xs, *ys)),
            path, f"{name} needs two equally long, non-empty lists of numbers ({x}, {y})", fix,
        )  # fmt: skip
    return points


def read_prediction_rows(path: Path, num_queries: int, fix: str) -> dict[int, list[dict]]:
    """The rows of a ``predictions.csv`` by query index, checked: its columns, every value's type,
    each query's ranks (0, 1, ... once each in both orders) and as many queries as ``recalls.json``
    says (``num_queries``).

    Raises:
        DamagedRecordError: naming the row and the value.
    """
    rows: dict[int, list[dict]] = {}
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in PREDICTION_COLUMNS if column not in (reader.fieldnames or ())]
            _expect(not missing, path, f"lacks the column(s) {', '.join(missing)}", fix)
            for line, row in enumerate(reader, start=2):
                rows.setdefault(_whole(row, "query_index", path, line, fix), []).append(_checked_row(row, path, line, fix))
    except csv.Error as error:
        raise damaged(path, f"is not a CSV table ({error})", fix) from None
    _expect(len(rows) == num_queries, path, f"holds {len(rows)} queries, but recalls.json records {num_queries}", fix)
    for query, entries in rows.items():
        _expect(query < num_queries, path, f"query_index {query} is outside the run's {num_queries} queries", fix)
        for order in ("rank", "global_rank"):
            ranks = sorted(entry[order] for entry in entries)
            _expect(ranks == list(range(len(entries))), path,
                    f"query {query}'s {order} values are not 0 to {len(entries) - 1} once each (rows repeated or lost)",
                    fix)  # fmt: skip
    return rows


def _checked_row(row: dict, path: Path, line: int, fix: str) -> dict:
    _expect(None not in row.values() and None not in row, path, f"row {line} does not have the header's columns", fix)
    checked = dict(row)
    for column in ("rank", "database_index", "global_rank"):
        checked[column] = _whole(row, column, path, line, fix)
    for column in ("global_distance", "rerank_score"):
        text = row[column]
        try:
            value = float(text) if text else None
        except ValueError:
            value = math.nan
        _expect(value is None or math.isfinite(value), path, f"row {line}: {column} {text!r} is not a number", fix)
        checked[column] = value
    _expect(row["is_positive"] in ("", "0", "1"), path, f"row {line}: is_positive {row['is_positive']!r} is not 0 or 1", fix)
    return checked


def _whole(row: dict, column: str, path: Path, line: int, fix: str) -> int:
    text = row.get(column)
    _expect(text is not None and text.isascii() and text.isdigit(), path, f"row {line}: {column} {text!r} is not a whole number", fix)
    return int(text)
