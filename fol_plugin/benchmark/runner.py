"""``fol-vpr benchmark``: the paper's evaluation over named datasets in one command.

Owns the order of work: every selected dataset is found and counted before anything is extracted
(:mod:`.registry`), then each runs through the evaluation pipeline in ``<output_dir>/<dataset>``
(one database extraction for all its query sets, the pipeline's cache and resume rules), or
re-ranks another method's predictions from ``--predictions_dir``. A dataset whose run fails is
recorded and the next one starts; a dataset already finished with the same settings, checkpoint
and images is not run again. ``<output_dir>/benchmark.json`` records each dataset's status, counts, peak memory and wall
time as soon as it ends; the tables (:mod:`.tables`) are built from it and the runs' recalls.

One benchmark at a time in an output folder: rank 0 holds ``<output_dir>/.fol-vpr.lock`` (the
lock ``fol-vpr eval`` takes on its output folder) for the whole run, and each dataset's own run
locks its sub-folder. A dataset's name is its sub-folder, so it must be a plain folder name: a
path (``../x``, ``/data/x``) is refused before anything is written.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..cache import RunCache
from ..cache.run_cache import LOCK_FILE
from ..checkpoint import weights_file
from ..config import BenchmarkConfig
from ..data.datasets import list_images
from ..distributed import SINGLE_PROCESS, Processes
from ..errors import is_user_error, user_message
from ..evaluation.config import RECALLS_FILE, EvalConfig, output_key, prepare
from ..evaluation.inputs import PREDICTIONS_SUFFIX, load_predictions
from ..evaluation.pipeline import run_eval, run_rerank
from ..evaluation.workspace import cache_inputs
from ..files import DamagedFileError, json_safe, read_json, write_json
from ..options import DEFAULT_RECALL_VALUES
from .memory import PeakMemory
from .published import PUBLISHED_RECALL_VALUES
from .registry import REGISTRY, DatasetSpec, Located, locate, normalise, select
from .tables import BENCHMARK_FILE, FAILED, RESULTS_FILES, RESULTS_STEM, read_record, write_tables

logger = logging.getLogger(__name__)

# Settings that change how a run works but not its results: a finished dataset is reused across them.
# (The image limits only refuse images; the images a run read are compared through its inputs.)
NOT_RESULT_SETTINGS = (
    "num_workers", "progress", "batch_size", "keep_cache", "num_preds_to_save", "save_only_wrong_preds", "save_descriptors",
    "max_image_pixels", "allow_outside_paths",
)
# Names a dataset's folder may not take: the benchmark's own files in --output_dir.
RESERVED_NAMES = {BENCHMARK_FILE, LOCK_FILE, *RESULTS_FILES}


def _registry(config: BenchmarkConfig) -> Mapping[str, DatasetSpec]:
    """The datasets ``config`` names refer to: its own registry, or the known ones."""
    return REGISTRY if config.registry is None else config.registry


def check_datasets(config: BenchmarkConfig) -> list[Located]:
    """Every selected dataset found and counted, before any extraction.

    Raises:
        ValueError: ``--rerank_fraction`` below 1 with ``predictions_dir``; a dataset name that is
            not a plain folder name; else listing every missing folder, and every count mismatch
            unless ``allow_mismatch``.
    """
    if config.predictions_dir is not None and config.options.get("rerank_fraction", 1.0) < 1:
        raise ValueError(
            f"--rerank_fraction {config.options['rerank_fraction']} re-ranks the queries whose global top-1 is least "
            "confident, which needs global distances, and --predictions_dir gives predictions without them: drop "
            "--rerank_fraction, or benchmark FoL end to end"
        )
    selection = select(config.dataset_names, _registry(config), config.datasets_folder)
    unsafe = [problem for spec, _ in selection if (problem := _name_problem(spec.name))]
    if unsafe:
        raise ValueError("\n".join(unsafe))
    paths = {normalise(name): path for name, path in config.dataset_paths.items()}
    unused = set(paths) - {normalise(spec.name) for spec, _ in selection}
    if unused:
        raise ValueError(f"--dataset_path names {sorted(unused)}, which --dataset_names does not select")
    located = [
        locate(
            spec, query_sets, config.datasets_folder, paths.get(normalise(spec.name)),
            config.options.get("allow_outside_paths", False),
        )
        for spec, query_sets in selection
    ]
    problems = [line for item in located for line in item.problems]
    mismatches = [line for item in located for line in item.mismatches]
    if problems or (mismatches and not config.allow_mismatch):
        lines = problems + mismatches
        fix = "\nFix the folders, or pass --allow_mismatch to run mismatched datasets anyway (their rows are marked)."
        raise ValueError(
            f"{len(lines)} problem(s) with the datasets, found before any extraction:\n  " + "\n  ".join(lines)
            + (fix if mismatches else "")
        )
    for line in mismatches:
        logger.warning("%s: running anyway (--allow_mismatch); its rows are marked", line)
    for item in located:
        if item.spec.name not in _registry(config):
            logger.warning("%s is not a known dataset: running it from %s, its counts unchecked", item.spec.name, item.root)
    return located


def _name_problem(name: str) -> str | None:
    """Why dataset ``name`` cannot be its folder in ``--output_dir`` (a path, ``..``, one of the
    benchmark's own files), or None. The query sets' folders inside it are named by the pipeline's
    safe-name rule (:func:`~fol_plugin.evaluation.config.output_key`)."""
    if Path(name).name == name and name not in {"", "..", *RESERVED_NAMES}:
        return None
    return (
        f"--dataset_names {name}: a dataset's name is its folder in --output_dir, so it must be a plain folder name, "
        "not a path nor one of the benchmark's own files; place the dataset at <datasets_folder>/<name>/images/test, "
        "or point a known dataset at it with --dataset_path NAME=FOLDER"
    )


def eval_config(config: BenchmarkConfig, item: Located) -> EvalConfig:
    """The evaluation of one dataset: all its selected query sets against its database."""
    options = dict(config.options)
    recall_values = set(options.pop("recall_values", DEFAULT_RECALL_VALUES)) | set(PUBLISHED_RECALL_VALUES)
    return EvalConfig(
        database_folder=item.database_folder,
        queries_folders=[item.queries_folder(q) for q in item.query_sets],
        output_dir=config.output_dir / item.spec.name,
        labelled=item.spec.labelled,
        positive_dist_threshold=item.spec.positive_dist_threshold,
        recall_values=tuple(sorted(recall_values)),
        **options,
    )


def output_keys(evaluation: EvalConfig, item: Located) -> dict[str, str]:
    """Query set name -> its output folder in the run, named as the pipeline names it."""
    keys: dict[str, str] = {}
    for query_set, folder in zip(item.query_sets, evaluation.queries_folders):
        keys[query_set.name] = output_key(folder, set(keys.values()))
    return keys


def find_predictions(predictions_dir: Path, name: str) -> Path:
    """Another method's predictions for query set ``name``: ``<dir>/<name>.npy`` ([Q, K] database
    indices), or a VPR-methods-evaluation ``preds/`` folder of .txt files at ``<dir>/<name>``,
    ``<dir>/<name>/preds`` or ``<dir>/<name>/<run>/preds`` (its log folder, one run in it)."""
    array = predictions_dir / f"{name}{PREDICTIONS_SUFFIX}"
    if array.is_file():
        return array
    folder = predictions_dir / name
    candidates = [folder, folder / "preds", *sorted(folder.glob("*/preds"))]
    found = [c for c in candidates if c.is_dir() and any(c.glob("*.txt"))]
    if len(found) > 1 and found[0] != folder / "preds":
        raise ValueError(
            f"--predictions_dir: {folder} holds several VPR-methods-evaluation runs ({', '.join(map(str, found))}); "
            "keep one, or point to it as <dir>/<name>/preds"
        )
    if not found:
        raise FileNotFoundError(
            f"--predictions_dir: no predictions for {name}: expected {array}, or {folder}/preds with "
            "VPR-methods-evaluation's 000.txt, 001.txt, ... (run it with --num_preds_to_save K)"
        )
    return found[0]


def _given_predictions(config: BenchmarkConfig, item: Located, evaluation: EvalConfig) -> tuple[list[np.ndarray], dict]:
    """Per query set, the [Q, K] predictions to re-rank, and where each came from."""
    database_paths = list_images(evaluation.database_folder, evaluation.allow_outside_paths)
    predictions, sources = [], {}
    for query_set, folder in zip(item.query_sets, evaluation.queries_folders):
        source = find_predictions(config.predictions_dir, query_set.name)
        sources[query_set.name] = str(source)
        query_paths = list_images(folder, evaluation.allow_outside_paths)
        predictions.append(load_predictions(source, query_paths, database_paths, "--predictions_dir"))
    return predictions, sources


def _result_settings(settings: dict) -> dict:
    """Of a run's recorded settings, those its results depend on."""
    settings = {name: value for name, value in settings.items() if name not in NOT_RESULT_SETTINGS}
    if isinstance(settings.get("extraction"), dict):
        settings["extraction"] = {k: v for k, v in settings["extraction"].items() if k not in NOT_RESULT_SETTINGS}
    return settings


def _run_inputs(evaluation: EvalConfig) -> dict:
    """What a run's results depend on beyond its settings, as its cache records them: the
    checkpoint's content and every image (path, size, modification time)."""
    database, query_sets = prepare(evaluation)
    return cache_inputs(evaluation, database, query_sets, weights_file(evaluation.backbone, evaluation.weights))


def _finished(evaluation: EvalConfig, previous: dict | None, sources: dict | None) -> bool:
    """Whether this dataset already finished with the same settings, checkpoint, images and
    predictions (the inputs its ``recalls.json`` records, listed again only here)."""
    recalls = evaluation.output_dir / RECALLS_FILE
    if not (recalls.is_file() and previous and previous.get("status") == "done"):
        return False
    if previous.get("predictions") != sources:
        return False
    try:
        summary = read_json(recalls, f"running {evaluation.output_dir.name} again")
    except DamagedFileError as error:
        logger.warning("%s", error)
        return False
    if _result_settings(summary.get("config", {})) != _result_settings(json_safe(evaluation)):
        return False
    return summary.get("inputs") == _run_inputs(evaluation)


def _one_line(error: BaseException) -> str:
    """A dataset's error as one line, for the log and its table rows: the line ``fol-vpr eval``
    prints (without the traceback a DataLoader worker's error carries), with its type when it
    is a bug."""
    message = " ".join(user_message(error).split())
    return f"{type(error).__name__}: {message}" if not is_user_error(error) else message


def _run_dataset(
    config: BenchmarkConfig, item: Located, processes: Processes, previous: dict | None
) -> dict:
    """Run (or reuse) one dataset; returns its benchmark record."""
    evaluation = eval_config(config, item)
    entry = {
        "root": str(item.root), "query_sets": output_keys(evaluation, item),
        "published_as": {q.name: q.label for q in item.query_sets},
        "counts": item.counts, "mismatches": item.mismatches, "labelled": item.spec.labelled, "note": item.spec.note,
    }
    start = time.perf_counter()
    try:
        predictions, sources = (None, None)
        if config.predictions_dir is not None:
            predictions, sources = _given_predictions(config, item, evaluation)
            entry["predictions"] = sources
        if _finished(evaluation, previous, sources):
            logger.info("%s: finished earlier with the same settings; reusing %s", item.spec.name, evaluation.output_dir)
            return {**previous, **entry, "reused": True}
        with PeakMemory(str(evaluation.extraction.device)) as memory:
            if predictions is None:
                run_eval(evaluation, processes)
            else:
                run_rerank(evaluation, predictions, processes)
    except Exception as error:
        if processes.distributed:  # the other processes cannot skip in step: end the run (torchrun reports it)
            raise
        message = _one_line(error)
        logger.error("%s failed: %s; going on with the next dataset", item.spec.name, message, exc_info=not is_user_error(error))
        return {**entry, "status": FAILED, "error": message}
    return {
        **entry, "status": "done", "wall_s": round(time.perf_counter() - start, 1), "peak_memory_mb": memory.rss_mb,
        "peak_gpu_memory_mb": memory.gpu_mb, "peak_memory_since_start": memory.since_start,
    }


def _describe(config: BenchmarkConfig) -> dict:
    return {
        "datasets_folder": str(config.datasets_folder),
        "dataset_names": list(config.dataset_names),
        "predictions_dir": None if config.predictions_dir is None else str(config.predictions_dir),
        "allow_mismatch": config.allow_mismatch,
        "options": json_safe(config.options),
    }


def run_benchmark(config: BenchmarkConfig, processes: Processes = SINGLE_PROCESS) -> list[dict]:
    """Run every selected dataset, then write the tables.

    Returns:
        The table rows (see :func:`fol_plugin.benchmark.tables.build_rows`); empty on the processes
        other than rank 0. A failed dataset's rows say why (see :func:`failure_summary`).

    Raises:
        RunLockedError: another benchmark (or ``fol-vpr eval``) is using ``output_dir``; nothing
            is written.
        DamagedFileError: ``benchmark.json`` cannot be read.
    """
    located = check_datasets(config)
    # The output folder's lock and its checks, as fol-vpr eval takes them (rank 0; the others wait for it).
    with RunCache(config.output_dir) if processes.is_main else contextlib.nullcontext():
        processes.barrier()
        return _run_locked(config, processes, located)


def _run_locked(config: BenchmarkConfig, processes: Processes, located: list[Located]) -> list[dict]:
    """:func:`run_benchmark` once rank 0 holds the output folder's lock."""
    record = read_record(config.output_dir) or {"datasets": {}}
    record["config"] = _describe(config)
    record["order"] = [item.spec.name for item in located]
    # The benchmark's own bar, above the pipeline's: images of finished datasets, with the ETA.
    total = sum(sum(item.counts.values()) for item in located)
    with tqdm(total=total, desc="Benchmark", unit="img", disable=not processes.is_main, position=0) as bar:
        for index, item in enumerate(located, 1):
            name = item.spec.name
            bar.set_postfix_str(f"{name} ({index}/{len(located)})")
            logger.info(
                "Benchmark: dataset %d of %d: %s (%s database images; %s)", index, len(located), name,
                f"{item.counts['database']:,}", ", ".join(f"{q.name}: {item.counts[q.name]:,} queries" for q in item.query_sets),
            )  # fmt: skip
            record["datasets"][name] = _run_dataset(config, item, processes, record["datasets"].get(name))
            if processes.is_main:
                write_json(config.output_dir / BENCHMARK_FILE, record)
            bar.update(sum(item.counts.values()))
    if not processes.is_main:
        return []
    return write_tables(config.output_dir)


def failure_summary(rows: list[dict], output_dir: Path) -> str | None:
    """The line that ends a benchmark whose datasets did not all finish, or None when they did."""
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    failed = list(dict.fromkeys(row["dataset"] for row in rows if row["status"].startswith(f"{FAILED}:")))
    if not failed:
        return None
    return (
        f"{len(failed)} of {len(datasets)} datasets failed: {', '.join(failed)}; their rows in "
        f"{Path(output_dir) / RESULTS_STEM}.md say why: fix that and rerun the same command (finished datasets "
        "are reused)"
    )
