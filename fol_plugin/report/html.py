"""``fol-vpr report``: one self-contained HTML file of a finished run or benchmark.

The page holds the configuration, per-stage timings and the recall table (per dataset, beside
the published numbers, for a benchmark); per query set, the confidence APs, the precision-recall
curves of both confidences and the adaptive re-ranking curve (inline SVG); and per query its
global and re-ranked top-k as thumbnails framed green / red, with FoL scores and global
distances, under a filter (all / fixed by re-ranking / broken by re-ranking / wrong in both /
right in both / unlabelled; ``#filter=<name>`` in the address pre-selects one). Everything is
embedded: thumbnails as small WebPs, each image once; no network is needed to open it.

Size: queries are shown changed ones first (re-ranking fixed or broke their top-1, then changed
it), at most ``max_queries`` per query set, and the page stops adding queries when it would
exceed ``max_size_mb`` (the budget shared evenly by the query sets, whatever the images are);
the page says how many it shows.
"""
from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..evaluation.confidence import CONFIDENCE_FILE, STAGES, ap_text, stage_ap
from ..files import MB, write_text
from ..config import ReportOptions
from .data import STATUSES, BenchmarkData, Prediction, Query, QuerySetData, RunData, read_folder
from .media import MISSING_CLASS, Thumbnails, match_figure
from .svg import Series, line_chart

if TYPE_CHECKING:
    from ..models import FoLModel

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
NAME_CHARS = 15  # a file name in a caption, the middle elided beyond
QUERY_NAME_CHARS = 60  # a query's file name in its heading
COLOURS = {"global": "#1f6fb4", "reranked": "#e8710a", "random order": "#888"}
STAGE_NAMES = {"global": "global", "reranked": "re-ranked"}
LABELLED_FILTERS = ("fixed", "broken", "wrong", "right")

CSS = """
body{font:13px/1.35 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:16px 22px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 2px}h2{font-size:17px;margin:22px 0 6px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:16px 0 4px}.sub{color:#555;margin:0 0 10px}
table{border-collapse:collapse;margin:4px 0 8px}td,th{border:1px solid #ddd;padding:2px 7px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child,td.l{text-align:left}
details{margin:4px 0}summary{cursor:pointer;color:#1f6fb4}
.charts{display:flex;flex-wrap:wrap;gap:14px}.chart text{font-size:11px;fill:#333}.chart .ct{font-size:12px;font-weight:600}
.chart .cf{fill:#fafafa;stroke:#bbb}
.filter{margin:8px 0 4px}.filter a{display:inline-block;margin:0 4px 4px 0;padding:2px 9px;border:1px solid #bbb;
border-radius:11px;color:#222;text-decoration:none}.filter a.on{background:#1f6fb4;border-color:#1f6fb4;color:#fff}
.q{border-top:1px solid #e3e3e3;padding:5px 0}.qh{margin-bottom:3px}.qh .n{color:#555}
.s{padding:0 6px;border-radius:8px;font-size:12px}.s.fixed{background:#d7f5d7}.s.broken{background:#fbd5d5}
.s.wrong{background:#eee}.s.right{background:#e6f0fb}.s.unlabelled{background:#f2f2f2}.kept{color:#777;font-size:12px}
.qb{display:flex;gap:8px;align-items:flex-start}.rows{display:flex;flex-direction:column;gap:3px}
.r{display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start}
.lab{width:16px;writing-mode:vertical-rl;transform:rotate(180deg);font-size:11px;color:#555;text-align:center;height:84px}
figure{margin:0;width:96px}figure i{display:block;width:92px;height:80px;background:#e8e8e8 center/contain no-repeat;
border:2px solid transparent}figure.ok i{border-color:#1b9e1b}figure.no i{border-color:#d62020}
figure.qi i{border-color:#1f6fb4}
figcaption{font-size:10px;line-height:1.25;color:#333;overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
img.m{display:block;max-width:min(100%,640px);margin:5px 0 0 104px}.none{color:#777}
""" + f".{MISSING_CLASS}{{background:#ccc}}"
JAVASCRIPT = """
function applyFilter(){var m=/filter=(\\w+)/.exec(location.hash),f=m?m[1]:'all';
document.body.setAttribute('data-filter',f);
document.querySelectorAll('.filter a').forEach(function(a){a.classList.toggle('on',a.getAttribute('data-f')===f);});}
window.addEventListener('hashchange',applyFilter);applyFilter();
"""


def write_report(run_dir: str | os.PathLike, options: ReportOptions | None = None) -> Path:
    """``<run_dir>/report.html`` of the finished run or benchmark in ``run_dir``; returns its path.

    Raises:
        RunFolderError: ``run_dir`` is not such a folder, or misses a file the report reads.
    """
    options = options or ReportOptions()
    data = read_folder(run_dir)
    thumbnails = Thumbnails(options.max_image_pixels)
    page = render(data, options, thumbnails)
    if thumbnails.unreadable:
        logger.warning(
            "%d image(s) could not be read (first: %s): grey boxes stand for them; run fol-vpr report where the run "
            "was started (image paths are as it gave them), or check that the images are still there",
            len(thumbnails.unreadable), thumbnails.unreadable[0],
        )
    path = Path(run_dir) / REPORT_FILE
    if _size(page) > options.max_size_mb * MB:
        logger.warning(
            "%s is %.1f KB, over --max_size_mb %g: the page without any query takes that much; raise --max_size_mb to "
            "show queries", path, _size(page) / 1e3, options.max_size_mb,
        )
    write_text(path, page)
    return path


class _Rows:
    """The place of a query set's query list in the page, filled once the rest is laid out."""

    def __init__(self, query_set: QuerySetData, run: RunData, anchor: str) -> None:
        self.query_set, self.run, self.anchor = query_set, run, anchor


def render(data: RunData | BenchmarkData, options: ReportOptions, thumbnails: Thumbnails) -> str:
    """The page of ``data``: everything but the query lists first, then as many queries of each
    query set as the size budget left takes (shared evenly by the query sets still to fill)."""
    if isinstance(data, RunData):
        title, blocks = f"fol-vpr report: {data.folder.name}", _run_blocks(data, "", 2)
    else:
        title, blocks = f"fol-vpr benchmark report: {data.folder.name}", _benchmark_blocks(data)
    filters = "".join(f"body[data-filter={status}] .q:not(.{status}){{display:none}}" for status in STATUSES)
    head = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_text(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}{filters}\n'
    )
    top = f'</style></head><body data-filter="all"><h1>{_text(title)}</h1>'
    end = f"<script>{JAVASCRIPT}</script></body></html>\n"
    places = [block for block in blocks if isinstance(block, _Rows)]
    fixed = [head, top, end, *(block for block in blocks if isinstance(block, str))]
    budget = options.max_size_mb * MB - sum(_size(part) for part in fixed)
    lists: dict[int, str] = {}
    models: dict[str, FoLModel] = {}
    for index, place in enumerate(places):
        lists[id(place)], cost = _query_list(place, options, thumbnails, budget / (len(places) - index), models)
        budget -= cost
    body = "".join(lists[id(block)] if isinstance(block, _Rows) else block for block in blocks)
    return head + thumbnails.stylesheet() + top + body + end


def _size(text: str) -> int:
    """Bytes of ``text`` in the file."""
    return len(text.encode("utf-8", errors="surrogateescape"))


def _text(value: object) -> str:
    """``value`` escaped for HTML; bytes of a file name that are not UTF-8 shown as U+FFFD."""
    text = str(value).encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    return html.escape(text)


def _short(path: str, chars: int = NAME_CHARS) -> str:
    """A file's name, its middle elided beyond ``chars`` characters."""
    name = Path(path).name
    if len(name) <= chars:
        return name
    half = chars // 2
    return name[: half - 1] + "…" + name[-half:]


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{_text(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{_text(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _flatten(value: object, prefix: str = "") -> list[tuple[str, str]]:
    """A nested record as (dotted key, JSON value) pairs."""
    if isinstance(value, dict) and value:
        return [pair for key, item in value.items() for pair in _flatten(item, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), value if isinstance(value, str) else json.dumps(value))]


def _details(summary: str, record: dict) -> str:
    rows = "".join(f'<tr><td class="l">{_text(key)}</td><td class="l">{_text(value)}</td></tr>'
                   for key, value in _flatten(record))  # fmt: skip
    return f"<details><summary>{_text(summary)}</summary><table>{rows}</table></details>"


def _timings(timings: dict, runs: int) -> str:
    """Per-stage seconds, as ``recalls.json`` records them, and their total, in one row."""
    stages = [*timings, "total"]
    seconds = [f"{value:.2f}" for value in (*timings.values(), sum(timings.values()))]
    resumed = f", summed over the {runs} processes of a resumed run" if runs > 1 else ""
    return f"<p><b>Per-stage timings (s{resumed})</b></p>" + _table(stages, [seconds])


def _describe(config: dict) -> str:
    """The run's model and protocol in one line."""
    extraction = config.get("extraction", {})
    size = "x".join(str(side) for side in extraction.get("image_size", []))
    scorer = config.get("scorer", {}).get("name", "fol")
    parts = [
        _describe_backbone(config.get("backbone")), size, f"resize {extraction.get('resize_mode')}",
        str(extraction.get("precision")), f"top-{config.get('rerank_topk')} re-ranking ({scorer})",
    ]  # fmt: skip
    if config.get("rerank_fraction", 1.0) < 1:
        parts.append(f"--rerank_fraction {config['rerank_fraction']}")
    return ", ".join(parts)


def _recall_table(run: RunData) -> str:
    """Per query set: its size, recalls in both stages, the confidence APs, the share re-ranked."""
    names = sorted({name for s in run.query_sets for stage in STAGES for name in (s.results[stage] or {})},
                   key=lambda name: int(name.split("@")[1]))  # fmt: skip
    header = ["query set", "queries", *(f"{STAGE_NAMES[stage]} {name}" for stage in STAGES for name in names)]
    header += ["AP global", "AP re-ranked", "re-ranked queries"]
    rows = []
    for query_set in run.query_sets:
        results = query_set.results
        recalls = [(results[stage] or {}).get(name, "–") for stage in STAGES for name in names]
        reranked = sum(query.reranked for query in query_set.queries)
        aps = [ap_text(*stage_ap(results.get("confidence"), stage)) for stage in STAGES]
        rows.append([query_set.key, results["num_queries"], *recalls, *aps, reranked])
    return _table(header, rows)


def _run_blocks(run: RunData, prefix: str, level: int) -> list[str | _Rows]:
    """A run's parts: what it is, its recalls, timings and configuration, then each query set."""
    config = run.summary.get("config", {})
    blocks: list[str | _Rows] = [f'<p class="sub">{_text(_describe(config))} &middot; {_text(run.folder)}</p>']
    blocks.append(_recall_table(run))
    blocks.append(_timings(run.summary.get("timings_s", {}), int(run.summary.get("timings_runs", 1))))
    blocks.append(_details("Configuration (recalls.json)", config))
    for query_set in run.query_sets:
        anchor = f"{prefix}{query_set.key}"
        blocks.append(f'<h{level} id="set-{_text(anchor)}">Query set {_text(query_set.key)}</h{level}>')
        blocks.append(_confidence(query_set))
        blocks.append(_Rows(query_set, run, anchor))
    return blocks


def _benchmark_blocks(bench: BenchmarkData) -> list[str | _Rows]:
    """A benchmark's parts: its results table beside the published numbers, then each dataset."""
    meta = bench.meta
    published = meta["published"] or "none for this backbone and image size"
    blocks: list[str | _Rows] = [
        f'<p class="sub">{_text(meta["method"])}: {_text(meta["backbone"])}, '
        f'{_text("x".join(map(str, meta["image_size"])))}, top-{_text(meta["rerank_topk"])} re-ranking '
        f'({_text(meta["scorer"])}) &middot; published numbers: {_text(published)}</p>'
    ]
    triple = [f"R@{n}" for n in (1, 5, 10)]
    header = ["dataset", "query set", "queries", *(f"{label} {name}" for label in ("global", "re-ranked",
              "published global", "published re-ranked") for name in triple), "AP global", "AP re-ranked", "status"]
    rows = []
    for row in bench.rows:
        values = [row[f"{stage}_{name}"] for stage in ("global", "reranked", "published_global", "published_reranked")
                  for name in triple]  # fmt: skip
        aps = [ap_text(row[f"{stage}_ap"], row[f"{stage}_ap_undefined"]) for stage in STAGES]
        rows.append([row["dataset"], row["query_set"], row["num_queries"], *("–" if v is None else v for v in values),
                     *aps, row["status"]])  # fmt: skip
    blocks.append(_table(header, rows))
    blocks.append(_details("Benchmark configuration (benchmark.json)", bench.record.get("config", {})))
    for name, run in bench.runs.items():
        blocks.append(f'<h2 id="dataset-{_text(name)}">Dataset {_text(name)}</h2>')
        if run is None:
            entry = bench.record["datasets"][name]
            blocks.append(f'<p class="none">Not finished: {_text(entry.get("error", entry.get("status")))}</p>')
            continue
        blocks.extend(_run_blocks(run, f"{name}-", 3))
    return blocks


def _confidence(query_set: QuerySetData) -> str:
    """The query set's confidence APs and curves, or why there are none."""
    confidence = query_set.results.get("confidence")
    if query_set.results["global"] is None:
        return '<p class="none">No labels: no recalls, confidence or curves.</p>'
    if confidence is None or query_set.points is None:
        return (
            f'<p class="none">No confidence record ({CONFIDENCE_FILE}): the run was made before fol-plugin recorded it; '
            "rerun its command for the confidence and the curves.</p>"
        )
    aps = {stage: ap_text(*stage_ap(confidence, stage)) for stage in STAGES}
    summary = " &middot; ".join(f"{STAGE_NAMES[stage]}: <b>{_text(aps[stage])}</b>" for stage in STAGES)
    charts = []
    curves = [Series(f"{STAGE_NAMES[stage]} (AP {aps[stage]})", query_set.points[stage]["recall"],
                     query_set.points[stage]["precision"], COLOURS[stage])
              for stage in STAGES if query_set.points.get(stage)]  # fmt: skip
    if curves:
        charts.append(line_chart("Precision-recall of the top-1's confidence", curves, "recall", "precision"))
    adaptive = query_set.points.get("adaptive")
    if adaptive:
        charts.append(_adaptive_chart(adaptive))
    return (
        f"<p>Confidence AP (is the top-1 right, ranked by its confidence; global: minus its distance, re-ranked: its "
        f'FoL score): {summary}</p><div class="charts">{"".join(charts)}</div>'
    )


def _adaptive_chart(adaptive: dict) -> str:
    """Re-ranked R@1 against the share of queries re-ranked, least confident first; beside it, the
    straight line a random order of the queries would give on average (full re-ranking only)."""
    xs, ys = adaptive["fraction"], adaptive["R@1"]
    series = [Series("least confident first", xs, ys, COLOURS["reranked"])]
    if xs[-1] == 1:
        series.append(Series("random order", [0, 1], [ys[0], ys[-1]], COLOURS["random order"], dashed=True))
    low, high = min(ys), max(ys)
    margin = max(1.0, (high - low) * 0.1)
    y_range = (max(0.0, low - margin), min(100.0, high + margin))
    return line_chart("Adaptive re-ranking", series, "fraction of queries re-ranked", "R@1 (%)", (0.0, 1.0), y_range)


def _priority(query: Query) -> tuple[int, int]:
    """Changed queries first: re-ranking fixed or broke the top-1, then changed it; then the rest."""
    return (0 if query.status in ("fixed", "broken") else 1 if query.changed else 2, query.index)


def _query_list(
    place: _Rows, options: ReportOptions, thumbnails: Thumbnails, budget: float, models: dict[str, FoLModel]
) -> tuple[str, int]:
    """A query set's filter and queries (changed first, within ``max_queries`` and ``budget``
    bytes); returns the HTML and its cost (with the stylesheet's growth)."""
    queries = place.query_set.queries
    counts = {status: sum(query.status == status for query in queries) for status in STATUSES}
    shown_filters = ["unlabelled"] if counts["unlabelled"] else list(LABELLED_FILTERS)
    links = [f'<a href="#filter=all" data-f="all" data-count="{len(queries)}">all <b>{len(queries)}</b></a>']
    links += [f'<a href="#filter={status}" data-f="{status}" data-count="{counts[status]}">{STATUSES[status]} '
              f"<b>{counts[status]}</b></a>" for status in shown_filters]  # fmt: skip
    ordered = sorted(queries, key=_priority)[: options.max_queries]
    figures = _match_figures(place, ordered, options, models)
    rows, cost = [], 0
    for query in ordered:
        row, paths = _query_html(query, place.anchor, thumbnails, figures.get(query.index))
        added = _size(row) + thumbnails.new_bytes(paths)
        if cost + added > budget:
            break
        thumbnails.use(paths)
        rows.append(row)
        cost += added
    note = f"Showing {len(rows)} of {len(queries)} queries"
    if queries and not rows and options.max_queries:
        note += f" (--max_size_mb {options.max_size_mb:g} cannot fit even one query: raise it to see them)"
    elif len(rows) < len(queries):
        note += (
            f" (changed ones first; at most --max_queries {options.max_queries} and --max_size_mb "
            f"{options.max_size_mb:g} in all)"
        )
    page = f'<nav class="filter">Show: {"".join(links)}</nav><p class="none">{note}.</p>{"".join(rows)}'
    return page, cost + _size(page) - sum(_size(row) for row in rows)


def _query_html(query: Query, anchor: str, thumbnails: Thumbnails, figure: str | None) -> tuple[str, list[str]]:
    """One query's block and the images it shows."""
    status = query.status
    paths = [query.path]
    top = query.global_top[0]
    header = (
        f'<div class="qh"><b>query {query.index}</b> <span class="n" title="{_text(query.path)}">'
        f'{_text(_short(query.path, QUERY_NAME_CHARS))}</span> <span class="s {status}">{STATUSES[status]}</span>'
    )
    if query.reranked_top is not None and not query.reranked:
        header += f' <span class="kept">not re-ranked (global confidence above the threshold{_distance(top)})</span>'
    rows = []
    for stage, predictions in (("global", query.global_top), ("reranked", query.reranked_top)):
        if predictions is None or (stage == "reranked" and not query.reranked):
            continue
        cells = [_cell(prediction, rank, stage, thumbnails) for rank, prediction in enumerate(predictions)]
        paths += [prediction.path for prediction in predictions]
        rows.append(f'<div class="r"><span class="lab">{STAGE_NAMES[stage]}</span>{"".join(cells)}</div>')
    picture = f'<img class="m" alt="FoL matches of query {query.index}" src="{figure}">' if figure else ""
    block = (
        f'<div class="q {status}" id="{_text(anchor)}-q{query.index}">{header}</div><div class="qb">'
        f'<figure class="qi"><i class="{thumbnails.css_class(query.path)}"></i><figcaption>query</figcaption></figure>'
        f'<div class="rows">{"".join(rows)}</div></div>{picture}</div>'
    )
    return block, paths


def _distance(prediction: Prediction) -> str:
    return "" if prediction.distance is None else f": top-1 distance {prediction.distance:.4g}"


def _cell(prediction: Prediction, rank: int, stage: str, thumbnails: Thumbnails) -> str:
    """A prediction's thumbnail (framed green / red when labelled) and caption: its rank (and its
    global rank after re-ranking), file name, FoL score and global distance."""
    frame = {True: "ok", False: "no", None: "na"}[prediction.positive]
    first = f"#{rank + 1}" + (f" (global #{prediction.global_rank + 1})" if stage == "reranked" else "")
    facts = []
    if prediction.score is not None:
        facts.append(f"FoL {prediction.score:.0f}")
    if prediction.distance is not None:
        facts.append(f"d {prediction.distance:.3g}")
    caption = f"{first}<br>{_text(_short(prediction.path))}<br>{' · '.join(facts) or '&nbsp;'}"
    picture = thumbnails.css_class(prediction.path)
    return (
        f'<figure class="{frame}" title="{_text(Path(prediction.path).name)}"><i class="{picture}"></i>'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _match_figures(
    place: _Rows, ordered: list[Query], options: ReportOptions, models: dict[str, FoLModel]
) -> dict[int, str]:
    """``--matches N``: FoL's match figure of the first N of ``ordered`` that were re-ranked
    against their re-ranked top-1, by query index."""
    chosen = [query for query in ordered if query.reranked][: options.matches]
    if not chosen:
        return {}
    config = place.run.summary["config"]
    model = _model(config, options, models)
    figures = {}
    for query in chosen:
        try:
            figures[query.index] = match_figure(
                model, query.path, query.reranked_top[0].path, config, options.max_image_pixels
            )
        except (OSError, ValueError) as error:
            logger.warning("No match figure for query %d of %s: %s", query.index, place.query_set.key, error)
    return figures


def _model(config: dict, options: ReportOptions, models: dict[str, FoLModel]) -> FoLModel:
    """The run's model (its recorded backbone and weights, or ``options.weights``), loaded once."""
    from ..checkpoint import load_model
    from ..models import ViTConfig

    backbone = config["backbone"]
    weights = options.weights or config["weights"]
    key = json.dumps([backbone, weights])
    if key not in models:
        architecture = ViTConfig(**backbone) if isinstance(backbone, dict) else backbone
        logger.info("Match figures: loading the %s model with weights %s", _describe_backbone(backbone), weights)
        models[key] = load_model(architecture, weights, options.device)
    return models[key]


def _describe_backbone(backbone: object) -> str:
    return backbone if isinstance(backbone, str) else "custom ViT"
