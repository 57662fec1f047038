"""The results of a benchmark as tables: one row per query set, beside FoL's published numbers.

Owns ``results.md`` (Markdown), ``results.tex`` (a booktabs tabular, best R@1 of each row in
bold), ``results.csv`` and ``results.json``. They are built only from what the runs left on disk
(``benchmark.json`` and each dataset's ``recalls.json``), so ``fol-vpr benchmark --table_only
DIR`` rebuilds the same tables at any time. Every file is written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..data.images import describe_image_size
from ..evaluation.confidence import ap_text, stage_ap
from ..evaluation.config import RECALLS_FILE
from ..evaluation.records import check_benchmark_record, check_recalls
from ..files import read_json, write_csv, write_json, write_text
from ..text import latex_text, markdown_text
from .published import PUBLISHED, PUBLISHED_RECALL_VALUES, SOURCE, published_recalls

BENCHMARK_FILE = "benchmark.json"
FAILED = "failed"  # the status of a dataset whose run failed, and the start of its rows' status
# The settings behind FoL's published numbers: (run summary key, name, value).
PAPER_PROTOCOL = (
    ("resize_mode", "resize", "original"), ("extraction_precision", "precision", "fp32"),
    ("rerank_topk", "top-k", 100), ("scorer", "scorer", "fol"),
)  # fmt: skip
RESULTS_STEM = "results"
RESULTS_FILES = tuple(f"{RESULTS_STEM}.{suffix}" for suffix in ("md", "tex", "csv", "json"))
STAGES = ("global", "reranked")
MISSING = "–"


def _recall_fields(prefix: str, values: dict | tuple | None) -> dict:
    """``{prefix}_R@N`` for N in 1, 5, 10 from a recalls dict (``{"R@1": ...}``) or a published triple."""
    if isinstance(values, tuple):
        values = {f"R@{n}": v for n, v in zip(PUBLISHED_RECALL_VALUES, values)}
    return {f"{prefix}_R@{n}": None if values is None else values.get(f"R@{n}") for n in PUBLISHED_RECALL_VALUES}


def _ap_fields(confidence: dict | None) -> dict:
    """``{stage}_ap`` and ``{stage}_ap_undefined`` (why it is undefined) of a query set's confidence."""
    fields = {}
    for stage in STAGES:
        fields[f"{stage}_ap"], fields[f"{stage}_ap_undefined"] = stage_ap(confidence, stage)
    return fields


def _per_query_ms(timings: dict, stage: str, count: int) -> float | None:
    return None if stage not in timings or not count else round(1000 * timings[stage] / count, 2)


def describe_run(record: dict) -> dict:
    """What every row shares: the model, the protocol, and where the published numbers come from."""
    options = record.get("config", {}).get("options", {})
    extraction = options.get("extraction", {})
    backbone = options.get("backbone", "vitl")
    image_size = tuple(extraction.get("image_size", ()))
    predictions_dir = record.get("config", {}).get("predictions_dir")
    published = None if predictions_dir else _published_table(backbone, image_size)
    return {
        "method": f"predictions in {predictions_dir} + FoL re-ranking" if predictions_dir else "FoL",
        "backbone": backbone if isinstance(backbone, str) else "custom",
        "image_size": list(image_size),
        "resize_mode": extraction.get("resize_mode", "original"),
        "extraction_precision": extraction.get("precision", "fp32"),
        "rerank_topk": options.get("rerank_topk"),
        "scorer": options.get("scorer", {}).get("name", "fol") if isinstance(options.get("scorer"), dict) else "fol",
        "published": published,
    }


def _published_table(backbone: object, image_size: tuple) -> str | None:
    if not isinstance(backbone, str) or len(image_size) != 2:
        return None
    if (backbone, image_size) not in PUBLISHED:
        return None
    name = {"vitl": "ViT-L", "vitb": "ViT-B"}.get(backbone, backbone)
    return f"{name} at {image_size[0]}x{image_size[1]}, {SOURCE}"


def read_record(output_dir: str | os.PathLike) -> dict | None:
    """``<output_dir>/benchmark.json``, or None when there is none.

    Raises:
        DamagedFileError: it cannot be read as JSON, naming it and what to do.
        DamagedRecordError: it lacks or mistypes what the tables read (:mod:`fol_plugin.evaluation.records`).
    """
    path = Path(output_dir) / BENCHMARK_FILE
    if not path.is_file():
        return None
    fix = "delete it and rerun the fol-vpr benchmark command (its datasets then run again)"
    return check_benchmark_record(read_json(path, fix), path, fix)


def build_rows(output_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(what the rows share, one row per query set) of the benchmark in ``output_dir``.

    Raises:
        FileNotFoundError: no ``benchmark.json``.
        DamagedFileError: a damaged ``benchmark.json`` or ``recalls.json``, naming it and what to do.
    """
    output_dir = Path(output_dir)
    record = read_record(output_dir)
    if record is None:
        raise FileNotFoundError(
            f"{output_dir / BENCHMARK_FILE} does not exist: --table_only takes the --output_dir of a fol-vpr benchmark run"
        )
    meta = describe_run(record)
    rows = []
    for name in record.get("order", list(record["datasets"])):
        entry = record["datasets"][name]
        summary = {}
        recalls = output_dir / name / RECALLS_FILE
        if entry.get("status") == "done" and recalls.is_file():
            fix = f"rerun the fol-vpr benchmark command of {output_dir}: it runs {name} again"
            summary = check_recalls(read_json(recalls, fix), recalls, fix, counts=False)
        timings = summary.get("timings_s", {})
        total_queries = sum(entry.get("counts", {}).get(q, 0) for q in entry.get("query_sets", {}))
        for query_set, key in entry.get("query_sets", {}).items():
            results = summary.get("query_sets", {}).get(key, {})
            count = entry.get("counts", {}).get(query_set, 0)
            label = entry.get("published_as", {}).get(query_set)
            published = None
            if meta["published"]:
                published = published_recalls(meta["backbone"], tuple(meta["image_size"]), label)
            row = {
                "dataset": name,
                "query_set": query_set,
                "published_as": label,
                "status": _status(entry, results, meta["rerank_topk"]),
                "rerank_topk_used": results.get("rerank_topk_used"),
                "num_database": entry.get("counts", {}).get("database"),
                "num_queries": count,
                **_recall_fields("global", results.get("global")),
                **_recall_fields("reranked", results.get("reranked")),
                **_recall_fields("published_global", published[0] if published else None),
                **_recall_fields("published_reranked", published[1] if published else None),
                **_ap_fields(results.get("confidence")),
                "ms_per_query_features": _per_query_ms(timings, f"features_{key}", count),
                "ms_per_query_search": _per_query_ms(timings, "global_search", total_queries),
                "ms_per_query_rerank": _per_query_ms(timings, f"rerank_{key}", count),
                "database_features_s": _database_seconds(timings),
                "timings_runs": summary.get("timings_runs", 1),  # processes whose times were summed (resumed: > 1)
                "peak_memory_mb": entry.get("peak_memory_mb"),
                "peak_gpu_memory_mb": entry.get("peak_gpu_memory_mb"),
            }
            for stage in STAGES:
                for n in PUBLISHED_RECALL_VALUES:
                    ours, theirs = row[f"{stage}_R@{n}"], row[f"published_{stage}_R@{n}"]
                    row[f"diff_{stage}_R@{n}"] = None if ours is None or theirs is None else round(ours - theirs, 2)
            rows.append(row)
    meta["rerank_topk_used"] = sorted({row["rerank_topk_used"] for row in rows if row["rerank_topk_used"] is not None})
    return meta, rows


def _status(entry: dict, results: dict, rerank_topk: int | None) -> str:
    if entry.get("status") != "done":
        return f"{FAILED}: {entry.get('error', 'unknown error')}"
    notes = []
    used = results.get("rerank_topk_used")
    if used is not None and rerank_topk is not None and used < rerank_topk:
        notes.append(f"re-ranked the top {used} only (fewer candidates than --rerank_topk {rerank_topk})")
    if entry.get("mismatches"):
        notes.append("count mismatch")
    if not entry.get("labelled", True):
        notes.append("no labels: recalls from the dataset's server")
    elif not results:
        notes.append("no results")
    return "; ".join(notes) or "ok"


def _database_seconds(timings: dict) -> float | None:
    stages = [timings[s] for s in ("features_database_global", "features_database_local") if s in timings]
    return round(sum(stages), 1) if stages else None


def _triple(row: dict, prefix: str) -> str:
    values = [row[f"{prefix}_R@{n}"] for n in PUBLISHED_RECALL_VALUES]
    return MISSING if any(v is None for v in values) else " ".join(f"{v:.1f}" for v in values)


def _number(value: float | None, digits: int = 1, signed: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{value:+.{digits}f}" if signed else f"{value:,.{digits}f}"


def _with_resumes(row: dict) -> str:
    """The row's status, saying when its times are summed over the processes of a resumed run."""
    runs = row.get("timings_runs") or 1
    return row["status"] if runs == 1 else f"{row['status']} (times summed over {runs} processes: resumed)"


def _title(meta: dict) -> str:
    size = describe_image_size(meta["image_size"])
    return (
        f"{meta['method']}: {meta['backbone']}, {size}, resize {meta['resize_mode']}, {meta['extraction_precision']}, "
        f"{_depth(meta)} re-ranking ({meta['scorer']})"
    )


def _depth(meta: dict) -> str:
    """The re-ranking depth the rows used: ``top-100``, or what fewer candidates allowed."""
    used = [value for value in meta.get("rerank_topk_used", []) if value != meta["rerank_topk"]]
    if not used:
        return f"top-{meta['rerank_topk']}"
    depths = sorted({*meta["rerank_topk_used"]})
    shown = f"top-{depths[0]}" if len(depths) == 1 else f"top-{depths[0]} to top-{depths[-1]}"
    return f"{shown} (--rerank_topk {meta['rerank_topk']}; fewer candidates in some rows)"


def protocol_differences(meta: dict) -> list[str]:
    """How a run's settings differ from those of FoL's published numbers."""
    return [
        f"{name} {meta[key]} (published: {paper})" for key, name, paper in PAPER_PROTOCOL if meta[key] != paper
    ]


def markdown(meta: dict, rows: list[dict]) -> str:
    """The Markdown table: recalls as "R@1 R@5 R@10", the published ones, the R@1 differences and
    the confidence APs."""
    published = meta["published"] or "none for this backbone and image size" + (
        "" if meta["method"] == "FoL" else " (another method's retrieval)"
    )
    if meta["published"] and protocol_differences(meta):
        published += "; this run differs from their protocol in " + ", ".join(protocol_differences(meta))
    header = [
        "Dataset", "Query set", "#db", "#queries", "Global R@1 R@5 R@10", "Re-ranked R@1 R@5 R@10",
        "Published global", "Published re-ranked", "ΔR@1 global / re-ranked", "AP global / re-ranked",
        "ms/query features / search / re-rank",
        "DB features (s)", "Peak RAM (MB)", "Status",
    ]  # fmt: skip
    lines = [f"**{markdown_text(_title(meta))}**", "", f"Published: {markdown_text(published)}.", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * 11 + ["---"]) + "|")
    for row in rows:
        times = " / ".join(_number(row[f"ms_per_query_{s}"]) for s in ("features", "search", "rerank"))
        differences = " / ".join(_number(row[f"diff_{s}_R@1"], signed=True) for s in STAGES)
        aps = " / ".join(ap_text(row[f"{s}_ap"], row[f"{s}_ap_undefined"]) for s in STAGES)
        cells = [
            markdown_text(row["dataset"]), markdown_text(row["query_set"]), _number(row["num_database"], 0),
            _number(row["num_queries"], 0),
            _triple(row, "global"), _triple(row, "reranked"), _triple(row, "published_global"),
            _triple(row, "published_reranked"), differences, aps, times, _number(row["database_features_s"]),
            _number(row["peak_memory_mb"], 0), markdown_text(_with_resumes(row)),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def latex(meta: dict, rows: list[dict]) -> str:
    """A booktabs tabular of R@1/5/10, global and re-ranked, as papers print it: rows named as in
    FoL's tables where they appear there, the best R@1 of each row in bold (both when they tie),
    "--" where a dataset failed."""
    lines = [
        f"% {latex_text(_title(meta))}",
        r"\begin{tabular}{l" + "r" * 2 * len(PUBLISHED_RECALL_VALUES) + "}",
        r"\toprule",
        r" & \multicolumn{3}{c}{Global} & \multicolumn{3}{c}{Re-ranked} \\",
        r"\cmidrule(lr){2-4} \cmidrule(lr){5-7}",
        "Dataset & " + " & ".join(f"R@{n}" for n in PUBLISHED_RECALL_VALUES * 2) + r" \\",
        r"\midrule",
    ]
    for row in rows:
        firsts = [row[f"{stage}_R@1"] for stage in STAGES]
        best = max((v for v in firsts if v is not None), default=None)
        cells = [latex_text(row["published_as"] or row["query_set"])]
        for stage in STAGES:
            for n in PUBLISHED_RECALL_VALUES:
                value = row[f"{stage}_R@{n}"]
                text = "--" if value is None else f"{value:.1f}"
                cells.append(rf"\textbf{{{text}}}" if n == 1 and value is not None and value == best else text)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(output_dir: str | os.PathLike) -> list[dict]:
    """``results.{md,tex,csv,json}`` in ``output_dir`` from its finished runs; returns the rows."""
    output_dir = Path(output_dir)
    meta, rows = build_rows(output_dir)
    fields = list(rows[0]) if rows else ["dataset"]
    md, tex, csv_file, json_file = (output_dir / name for name in RESULTS_FILES)
    write_text(md, markdown(meta, rows))
    write_text(tex, latex(meta, rows))
    write_csv(csv_file, fields, ([row[field] for field in fields] for row in rows))
    write_json(json_file, {"run": meta, "rows": rows})
    return rows
