"""``fol-vpr`` (also ``python -m fol_plugin``): evaluate FoL, or re-rank another method with FoL.

Every flag is a field of a configuration in :mod:`fol_plugin.config`, with its default and help
there: the subcommands are built from those fields (:func:`add_flags`) and the configurations
from the parsed flags (:func:`build`). Flag names follow gmberton/VPR-methods-evaluation where
they overlap.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .config import (
    BenchmarkConfig,
    BenchmarkInputs,
    EvalConfig,
    ExportConfig,
    ReportOptions,
    RerankInputs,
    RunControl,
    TrainConfig,
    TrainInputs,
    VisualizeConfig,
)
from .errors import USER_ERROR_TYPES, user_message
from .flags import DefaultsFormatter, add_flags, build, flag_values
from .text import printable

if TYPE_CHECKING:
    import numpy as np

    from .distributed import Processes

# Only argparse and the configurations are imported up front, so `fol-vpr --help` answers at
# once; each command imports what it runs.
logger = logging.getLogger("fol_plugin")

LOG_DIR_ROOT = "logs"  # --log_dir NAME: logs/NAME/<date-time>, VPR-methods-evaluation's output folder
LOG_DIR_TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"
USER_ERROR_EXIT = 2
DATASETS_FAILED_EXIT = 3  # fol-vpr benchmark: some datasets failed; the others ran and the tables are written
INTERRUPTED_EXIT = 130
# The EvalConfig fields a benchmark takes from its registry, not from flags.
DATASET_FIELDS = ("database_folder", "queries_folders", "output_dir", "labelled", "positive_dist_threshold")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fol-vpr",
        description="Evaluate FoL (Focus on Local, AAAI 2025) visual place recognition, re-rank another method's "
        "predictions with FoL, fine-tune it, or draw its matches. Also runs as: python -m fol_plugin.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("-v", "--debug", action="store_true", help="debug logging, and tracebacks with errors")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, *configs: type | tuple[type, Iterable[str]]) -> argparse.ArgumentParser:
        subparser = commands.add_parser(name, help=help, parents=[shared], formatter_class=DefaultsFormatter)
        groups: dict = {}
        for config in configs:
            config_type, skip = config if isinstance(config, tuple) else (config, ())
            add_flags(subparser, config_type, skip, groups)
        return subparser

    command("eval", "FoL global retrieval, then FoL re-ranking, with recalls", EvalConfig, RunControl)
    command("rerank", "re-rank another method's predictions with FoL", EvalConfig, RunControl, RerankInputs)
    command(
        "benchmark", "the paper's evaluation over named datasets, with a results table", BenchmarkConfig,
        BenchmarkInputs, (EvalConfig, DATASET_FIELDS), (RunControl, ("plan",)),
    )  # fmt: skip
    command(
        "train", "fine-tune FoL with the paper's losses", TrainInputs, TrainConfig, (RunControl, ("plan", "log_dir", "report"))
    )
    report_command = command("report", "a finished eval, rerank or benchmark folder as one self-contained HTML file", ReportOptions)
    report_command.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="the --output_dir of a finished eval, rerank or benchmark"
    )
    command("visualize", "FoL's regions and matches on two images, as one PNG", VisualizeConfig)
    command("export", "FoL as an ONNX graph for one image size, for onnxruntime and other runtimes", ExportConfig)
    return parser


def fine_tune(args: argparse.Namespace) -> None:
    """``fol-vpr train`` (under torchrun: every process runs this; rank 0 prints)."""
    from .checkpoint import resolve_device
    from .config import RECIPES
    from .data.datasets import load_image_set
    from .data.places import folder_places, gsv_cities_places
    from .features import check_image_size
    from .train.loop import train

    if args.dataset == "gsv_cities":
        places = gsv_cities_places(args.data_root, args.cities, args.images_per_place, seed=args.seed)
        logger.info("GSV-Cities in %s: %s", args.data_root, ", ".join(args.cities))
    else:
        places = folder_places(args.data_root, args.images_per_place)
        logger.info("Places: the sub-folders of %s", args.data_root)
    validation = None
    if args.val_database_folder or args.val_queries_folder:
        if not (args.val_database_folder and args.val_queries_folder):
            raise ValueError("give both --val_database_folder and --val_queries_folder")
        validation = (load_image_set(args.val_database_folder), load_image_set(args.val_queries_folder))
    weights = args.weights or (None if args.dinov2_weights else "auto")
    recipe = {**RECIPES[args.recipe], **({"augment": False} if args.no_augment else {})}
    config = build(
        TrainConfig, args, weights=None if weights == "none" else weights, validation=validation, **recipe
    )
    if len(config.image_size) != 2:
        raise ValueError("fol-vpr train needs --image_size H W: a training batch holds images of one size")
    check_image_size(config.image_size)
    processes = _join(args, str(resolve_device(args.device)))
    summary = train(config, places, args.resume, processes, overwrite=args.overwrite)
    processes.stop()
    if processes.is_main:
        print(f"{len(summary['epochs'])} epochs; best checkpoint: {summary['best']}")


def visualize(args: argparse.Namespace) -> None:
    """``fol-vpr visualize``: write the figure and print the counts."""
    from .checkpoint import load_model, resolve_device
    from .features import check_image_size
    from .files import write_figure
    from .visualization import PAIR_DPI, draw_pair, match_pair

    show = build(VisualizeConfig, args)
    check_image_size(show.image_size)
    for path in (show.query, show.database):
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
    model = load_model(show.backbone, show.weights, resolve_device(show.device))
    images, regions, result = match_pair(
        model, (show.query, show.database), show.image_size, show.resize_mode, show.matcher, show.ransac_model,
        max_image_pixels=show.max_image_pixels,
    )
    figure = draw_pair(images, regions, result, (show.query.name, show.database.name), show.ransac_model)
    show.output.parent.mkdir(parents=True, exist_ok=True)
    write_figure(show.output, figure, dpi=PAIR_DPI)
    print(f"{len(result.matches)} matches, {int(result.inliers.sum())} RANSAC inliers: {show.output}")


def _start(args: argparse.Namespace) -> Processes:
    """This process's place in the run, on the device ``--device`` names (resolved once), with
    ``--log_dir`` turned into ``--output_dir``."""
    from .checkpoint import resolve_device

    processes = _join(args, str(resolve_device(args.device)))
    _output_dir_of_log_dir(args, processes, required=True)
    return processes


def _extraction_on(options: dict, processes: Processes) -> None:
    """The extraction of ``options`` on this process's device, with progress bars on rank 0."""
    options["extraction"].device = processes.device
    options["extraction"].progress = processes.is_main


def load_given_predictions(args: argparse.Namespace, k: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Per query set, in the order of ``--queries_folder``, the [Q, K] predictions given to ``fol-vpr rerank``,
    and their [Q, K] distances when descriptors were given (else None)."""
    import numpy as np

    from .data.datasets import list_images
    from .evaluation.inputs import load_predictions
    from .retrieval import exact_search

    num_sets = len(args.queries_folders)
    if args.predictions and args.database_descriptors:
        raise ValueError("give either --predictions or --database_descriptors/--queries_descriptors, not both")
    database_paths = list_images(args.database_folder, args.allow_outside_paths)
    if args.database_descriptors:
        if len(args.queries_descriptors) != num_sets:
            raise ValueError(f"give one --queries_descriptors per --queries_folder ({num_sets}), got {len(args.queries_descriptors)}")
        database = np.load(args.database_descriptors, mmap_mode="r")
        if database.ndim != 2 or len(database) != len(database_paths):
            raise ValueError(
                f"{args.database_descriptors} is {database.shape}, but {args.database_folder} has {len(database_paths)} "
                f"images: expected [{len(database_paths)}, D]"
            )
        predictions, distances = [], []
        for folder, path in zip(args.queries_folders, args.queries_descriptors):
            queries = np.load(path)
            num_queries = len(list_images(folder, args.allow_outside_paths))
            if queries.ndim != 2 or queries.shape != (num_queries, database.shape[1]):
                raise ValueError(
                    f"{path} is {queries.shape}, expected [{num_queries}, {database.shape[1]}] ({folder} has {num_queries} "
                    f"images; the database descriptors have dimension {database.shape[1]})"
                )
            found_distances, found = exact_search(database, queries, min(k, len(database)))
            predictions.append(found)
            distances.append(found_distances)
        return predictions, distances
    if len(args.predictions) != num_sets:
        raise ValueError(f"give one --predictions per --queries_folder ({num_sets}), got {len(args.predictions)}")
    predictions = [
        load_predictions(source, list_images(folder, args.allow_outside_paths), database_paths)
        for folder, source in zip(args.queries_folders, args.predictions)
    ]
    return predictions, None


def evaluate(args: argparse.Namespace) -> None:
    """``fol-vpr eval`` and ``fol-vpr rerank``: run (or plan), then print the recalls. Under
    torchrun every process runs this; rank 0 prints."""
    from .evaluation.pipeline import run_eval, run_rerank
    from .evaluation.plan import plan_run

    processes = _start(args)
    options = flag_values(EvalConfig, args)
    _extraction_on(options, processes)
    config = EvalConfig(**options)
    if args.plan is not None:
        if processes.is_main:
            print(plan_run(config, args.plan or processes.world_size, args.command == "eval"))
        processes.stop()
        return
    try:
        if args.command == "eval":
            summary = run_eval(config, processes)
        else:
            predictions, distances = load_given_predictions(args, max(config.rerank_topk, max(config.recall_values)))
            summary = run_rerank(config, predictions, processes, distances)
    except KeyboardInterrupt:
        logger.error("Interrupted: finished work is kept in %s/cache; rerun the same command to resume", config.output_dir)
        raise
    processes.stop()
    if not processes.is_main:
        return
    for key, results in summary["query_sets"].items():
        for stage in ("global", "reranked"):
            if results[stage]:
                print(f"{printable(key)} {stage}: " + ", ".join(f"{name}: {value:.1f}" for name, value in results[stage].items()))
    print(f"Results in {config.output_dir}")
    _report_at_end(args, config.output_dir)


def benchmark(args: argparse.Namespace) -> int:
    """``fol-vpr benchmark``: every dataset through the pipeline, then the tables (rank 0 prints).

    Returns:
        0, or ``DATASETS_FAILED_EXIT`` after the tables are written when a dataset failed (with an
        error line naming the failed datasets).
    """
    from .benchmark import REGISTRY, failure_summary, run_benchmark, write_tables
    from .benchmark.tables import RESULTS_STEM

    if args.list_datasets:
        print(_registry_listing(REGISTRY))
        return 0
    if args.table_only:
        write_tables(args.table_only)
        print((args.table_only / f"{RESULTS_STEM}.md").read_text() + f"Tables in {args.table_only}/{RESULTS_STEM}.*")
        return 0
    missing = [flag for flag, value in (("--datasets_folder", args.datasets_folder), ("--dataset_names",
               args.dataset_names), ("--output_dir", args.output_dir or args.log_dir)) if not value]  # fmt: skip
    if missing:
        raise ValueError(f"fol-vpr benchmark needs {', '.join(missing)} (or --table_only DIR, or --list_datasets)")
    processes = _start(args)
    options = flag_values(EvalConfig, args, skip=DATASET_FIELDS)  # what every dataset's evaluation shares
    _extraction_on(options, processes)
    config = build(BenchmarkConfig, args, options=options)
    try:
        rows = run_benchmark(config, processes)
    except KeyboardInterrupt:
        logger.error(
            "Interrupted: finished datasets are recorded in %s/benchmark.json and the current one's work in its cache; "
            "rerun the same command to go on", args.output_dir,
        )
        raise
    processes.stop()
    if not processes.is_main:
        return 0
    print((args.output_dir / f"{RESULTS_STEM}.md").read_text() + f"Tables in {args.output_dir}/{RESULTS_STEM}.*")
    _report_at_end(args, args.output_dir)
    failed = failure_summary(rows, args.output_dir)
    if failed:
        logger.error("%s", failed)
        return DATASETS_FAILED_EXIT
    return 0


def report(args: argparse.Namespace) -> None:
    """``fol-vpr report``: write ``RUN_DIR/report.html`` and print where, and its size."""
    _write_report(args.run_dir, build(ReportOptions, args))


def _report_at_end(args: argparse.Namespace, output_dir: Path) -> None:
    """``--report``: the run's report, with the run's image limit."""
    if args.report:
        _write_report(output_dir, ReportOptions(max_image_pixels=args.max_image_pixels))


def _write_report(run_dir: Path, options: ReportOptions) -> None:
    from .files import MB
    from .report import write_report

    path = write_report(run_dir, options)
    print(f"Report: {path} ({path.stat().st_size / MB:.1f} MB)")


def _output_dir_of_log_dir(args: argparse.Namespace, processes: Processes, required: bool) -> None:
    """``--log_dir NAME``: ``--output_dir`` becomes ``logs/NAME/<date-time>`` as
    VPR-methods-evaluation names its output folder, at rank 0's time on every process (a new
    folder each run: ``--output_dir`` resumes)."""
    if args.log_dir is None:
        if required and args.output_dir is None:
            raise ValueError(
                "give --output_dir DIR (resumable), or --log_dir NAME for VPR-methods-evaluation's logs/NAME/<date-time>"
            )
        return
    if args.output_dir is not None:
        raise ValueError(f"give --output_dir {args.output_dir} or --log_dir {args.log_dir}, not both")
    started = processes.gather(time.strftime(LOG_DIR_TIME_FORMAT))[0]
    args.output_dir = Path(LOG_DIR_ROOT) / args.log_dir / started
    logger.info(
        "The outputs are being saved in %s (--log_dir: a new folder each run; to resume this run after an interruption, "
        "rerun with --output_dir %s instead)", args.output_dir, args.output_dir,
    )


def _registry_listing(registry: dict) -> str:
    """The known datasets: layout, query sets and expected counts."""
    lines = []
    for spec in registry.values():
        count = "?" if spec.num_database is None else f"{spec.num_database:,}"
        lines.append(f"{spec.name}: in {' or '.join(spec.roots)}; database: {spec.database} ({count} images)")
        for query_set in spec.query_sets:
            queries = "?" if query_set.num_images is None else f"{query_set.num_images:,}"
            lines.append(f"  {query_set.name}: {query_set.folder} ({queries} queries)")
        if spec.note:
            lines.append(f"  note: {spec.note}")
    return "\n".join(lines)


def _join(args: argparse.Namespace, device: str) -> Processes:
    """This process's place in the run (joining torchrun's process group when there is one); the
    processes other than rank 0 log quietly."""
    from .distributed import start

    processes = start(device, args.dist_timeout)
    if not processes.is_main:
        _quiet_rank(processes.rank, args.debug)
    return processes


def _quiet_rank(rank: int, debug: bool) -> None:
    """Logging of a process other than rank 0: marked with its rank; errors only unless
    ``--debug`` (every process sees the same inputs, so rank 0 says each warning once)."""
    import warnings

    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(message)s"))
    if not debug:
        logger.setLevel(logging.ERROR)
        warnings.simplefilter("ignore")


def _record_for_torchrun(error: BaseException) -> None:
    """Under torchrun, the failed rank's error in torchrun's summary (its error file)."""
    import os

    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(error)


def export(args: argparse.Namespace) -> None:
    """``fol-vpr export``: the ONNX file, and how it was made."""
    from .cache import checkpoint_digest
    from .checkpoint import load_model, weights_file
    from .export import export_onnx

    # torch configures its loggers when imported: "torchvision is not installed", whose ops FoL never uses
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    config = build(ExportConfig, args)
    weights = weights_file(config.backbone, config.weights)
    model = load_model(config.backbone, weights, "cpu")
    path = export_onnx(model, config.image_size, config.output, checkpoint_digest(weights))
    height, width = config.image_size
    print(f"{path}: FoL {config.backbone} for [B, 3, {height}, {width}] images ({path.stat().st_size / 1e6:.1f} MB)")


# Each command returns None or 0 (success), or its exit code.
COMMANDS = {
    "eval": evaluate, "rerank": evaluate, "benchmark": benchmark, "train": fine_tune, "visualize": visualize, "report": report,
    "export": export,
}  # fmt: skip


class PrintableFormatter(logging.Formatter):
    """Log lines with the control characters of file names shown, never sent to the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, handlers=[handler])
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it loads, at every start
    for exporter in ("onnxscript", "onnx_ir"):  # each graph rewrite of fol-vpr export, hundreds of lines
        logging.getLogger(exporter).setLevel(logging.WARNING)
    try:
        code = COMMANDS[args.command](args)
    except USER_ERROR_TYPES as error:
        if args.debug:
            logger.exception("%s", error)
        else:
            logger.error("%s", user_message(error))
        _record_for_torchrun(error)
        return USER_ERROR_EXIT
    except Exception as error:  # a bug, not a user error: the traceback, and torchrun's summary names it
        _record_for_torchrun(error)
        raise
    except KeyboardInterrupt:
        if args.command == "train":
            logger.error("Interrupted: rerun with --resume to continue after the last finished epoch")
        return INTERRUPTED_EXIT
    return code or 0
