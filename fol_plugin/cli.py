"""``fol-vpr`` (also ``python -m fol_plugin``): evaluate FoL, or re-rank another method with FoL.

Flag names follow gmberton/VPR-methods-evaluation where they overlap.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import user_message
from .options import (
    BACKBONES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DIST_TIMEOUT_MIN,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_POSITIVE_DISTANCE,
    DEFAULT_RECALL_VALUES,
    DEFAULT_RERANK_FRACTION,
    DEFAULT_SEARCH_CHUNK,
    DEFAULT_TOP_K,
    EXTRACTION_PRECISIONS,
    GEOMETRIC_MODELS,
    GLOBAL_DTYPES,
    IMAGES_PER_PLACE,
    MATCHERS,
    REPORT_MAX_QUERIES,
    REPORT_MAX_SIZE_MB,
    RESIZE_MODES,
    SCORERS,
    STORE_DTYPES,
    TRAIN_ACCUMULATION_STEPS,
    TRAIN_BACKBONE,
    TRAIN_CITIES,
    TRAIN_EPOCHS,
    TRAIN_LR,
    TRAIN_PATIENCE,
    TRAIN_PLACES_PER_BATCH,
    TRAIN_RECIPES,
    TRAIN_SEED,
    TRAIN_TRAINABLE_BLOCKS,
    TRAIN_WEIGHT_DECAY,
    default_num_workers,
)

if TYPE_CHECKING:
    import numpy as np

    from .distributed import Processes
    from .evaluation.config import EvalConfig
    from .report import ReportOptions

# Only argparse and .options are imported up front, so `fol-vpr --help` answers at once; each
# command imports what it runs.
logger = logging.getLogger("fol_plugin")

LOG_DIR_ROOT = "logs"  # --log_dir NAME: logs/NAME/<date-time>, VPR-methods-evaluation's output folder
LOG_DIR_TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"
USER_ERROR_EXIT = 2
DATASETS_FAILED_EXIT = 3  # fol-vpr benchmark: some datasets failed; the others ran and the tables are written
INTERRUPTED_EXIT = 130


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in ``--help`` (none where the default is None: the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give options without a help text one, so that ``--help`` shows their defaults too."""
    for action in parser._actions:
        if action.help is None and action.option_strings and action.default is not None:
            action.help = "(default: %(default)s)"


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1")
    return value


class _ImageSize(argparse.Action):
    """``--image_size H W`` or ``--image_size S`` (the shorter side)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: list[int], option: str | None = None) -> None:
        if len(values) > 2:
            raise argparse.ArgumentError(self, f"takes H W or one value (the shorter side), not {len(values)} values")
        setattr(namespace, self.dest, values)


def _add_model_arguments(
    group: argparse._ActionsContainer,
    backbone: str = "vitl",
    weights_help: str = "'auto' (published checkpoint), a .pth path or a URL",
    weights_default: str | None = "auto",
) -> None:
    """The model and where it runs, shared by every command (a parser or an argument group)."""
    group.add_argument("--backbone", choices=BACKBONES, default=backbone)
    group.add_argument("--weights", default=weights_default, help=weights_help)
    group.add_argument(
        "--image_size", type=_positive_int, nargs="+", action=_ImageSize, default=list(DEFAULT_IMAGE_SIZE),
        metavar="SIZE", help="H W, multiples of 14; or one value, as VPR-methods-evaluation: each image's shorter side "
        "(aspect ratio kept, each side rounded to the nearest multiple of 14)",
    )
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    group.add_argument(
        "--max_image_pixels", type=_positive_int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="PIXELS",
        help="refuse images that declare more pixels (read from the header, before decoding)",
    )


def _add_resize_mode(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--resize_mode", choices=RESIZE_MODES, default="original",
        help="'original': FoL's own evaluation (bilinear, no antialiasing); 'bilinear_antialias': "
        "VPR-methods-evaluation's (torchvision >= 0.17 Resize); 'antialias': kornia's",
    )


def _add_dist_timeout(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--dist_timeout", type=float, default=DEFAULT_DIST_TIMEOUT_MIN, metavar="MINUTES",
        help="under torchrun, how long a process waits for the slowest one",
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--database_folder", type=Path, required=True, help="folder of database images")
    data.add_argument(
        "--queries_folder", type=Path, action="append", required=True, dest="queries_folders",
        help="folder of query images; repeat for several query sets against one database",
    )
    data.add_argument("--no_labels", action="store_true", help="images have no @east@north@ names: skip recalls")
    data.add_argument("--positive_dist_threshold", type=float, default=DEFAULT_POSITIVE_DISTANCE, help="metres")
    data.add_argument("--recall_values", type=_positive_int, nargs="+", default=list(DEFAULT_RECALL_VALUES))
    _add_run_options(parser)


def _add_run_options(parser: argparse.ArgumentParser, plan: bool = True) -> None:
    """The model, re-ranking, scale and output options of ``eval``, ``rerank`` and ``benchmark``."""
    model = parser.add_argument_group("model")
    _add_model_arguments(model)
    _add_resize_mode(model)
    model.add_argument("--batch_size", type=_positive_int, default=DEFAULT_BATCH_SIZE)
    model.add_argument(
        "--num_workers", type=_non_negative_int, default=default_num_workers(),
        help="image-decoding processes: this machine's cores, at most 4",
    )
    model.add_argument(
        "--extraction_precision", choices=EXTRACTION_PRECISIONS, default="fp32",
        help="'fp32' gives the published checkpoints' numbers; 'bf16'/'fp16' run the ViT under autocast (faster, "
        "see docs/PRECISION.md)",
    )
    rerank = parser.add_argument_group("re-ranking")
    rerank.add_argument(
        "--rerank_topk", type=_non_negative_int, default=DEFAULT_TOP_K, help="candidates re-ranked per query; 0: none"
    )
    rerank.add_argument(
        "--rerank_scorer", choices=SCORERS, default="fol", metavar="SCORER",
        help="'fol' (FoL's score), '<matcher>' (match count) or '<matcher>+ransac' (inliers); matchers: "
        + ", ".join(MATCHERS),
    )
    rerank.add_argument("--ransac_model", choices=GEOMETRIC_MODELS, default="homography")
    rerank.add_argument(
        "--rerank_fraction", type=_fraction, default=DEFAULT_RERANK_FRACTION, metavar="F",
        help="re-rank only the share F of queries whose global top-1 is least confident (largest distance); the "
        "others keep their global order (README: Adaptive re-ranking)",
    )
    rerank.add_argument(
        "--store_dtype", choices=STORE_DTYPES, default="float32",
        help="local features on disk; float16 halves the disk but scores may differ from the original's",
    )
    rerank.add_argument("--in_memory", action="store_true", help="keep all database local features in RAM")
    scale = parser.add_argument_group("large datasets (see README: Large datasets, many GPUs, clusters)")
    scale.add_argument(
        "--global_dtype", choices=GLOBAL_DTYPES, default="float32",
        help="database descriptors on disk; float16 halves them (searched in float32)",
    )
    scale.add_argument(
        "--search_chunk_size", type=_positive_int, default=DEFAULT_SEARCH_CHUNK,
        help="database rows searched at a time (RAM holds one chunk)",
    )
    if plan:
        scale.add_argument(
            "--plan", type=_positive_int, nargs="?", const=0, default=None, metavar="PROCESSES",
            help="print the projected disk, RAM and time per stage, calibrated on a few batches, and exit; "
            "optionally for PROCESSES processes (default: this run's)",
        )
    _add_dist_timeout(scale)
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--allow_outside_paths", action="store_true",
        help="accept <folder>_images_paths.txt entries that lead outside their folder",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", type=Path, help="results, and the cache a rerun resumes from")
    output.add_argument(
        "--log_dir", metavar="NAME",
        help="instead of --output_dir, as VPR-methods-evaluation: outputs in logs/NAME/<date-time> (a new folder each run)",
    )
    output.add_argument(
        "--num_preds_to_save", type=_non_negative_int, default=0, help="PNG grids and preds/*.txt with this many"
    )
    output.add_argument(
        "--save_only_wrong_preds", action="store_true",
        help="those grids and files only for queries whose first prediction is wrong (needs labels)",
    )
    output.add_argument("--save_descriptors", action="store_true", help="keep the global descriptors as .npy")
    output.add_argument("--keep_cache", action="store_true", help="keep <output_dir>/cache after success")
    output.add_argument(
        "--report", action="store_true", help="write <output_dir>/report.html at the end (as fol-vpr report does)"
    )


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

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, parents=[shared], formatter_class=_DefaultsFormatter)

    _add_common(command("eval", "FoL global retrieval, then FoL re-ranking, with recalls"))
    rerank = command("rerank", "re-rank another method's predictions with FoL")
    _add_common(rerank)
    given = rerank.add_argument_group("predictions to re-rank (one per --queries_folder, in order)")
    given.add_argument(
        "--predictions", action="append", default=[],
        help="a preds/ folder of VPR-methods-evaluation (*.txt) or a [Q, K] .npy of database indices",
    )
    given.add_argument("--database_descriptors", type=Path, help="[N, D] .npy of another method (instead of --predictions)")
    given.add_argument("--queries_descriptors", type=Path, action="append", default=[], help="[Q, D] .npy per query set")
    bench = command("benchmark", "the paper's evaluation over named datasets, with a results table")
    datasets = bench.add_argument_group("datasets (see README: The paper's benchmark in one command)")
    datasets.add_argument("--datasets_folder", type=Path, help="the root of the datasets (the original's --eval_datasets_folder)")
    datasets.add_argument(
        "--dataset_names", nargs="+", metavar="NAME",
        help="datasets (pitts30k, SF_XL, SVOX, ...) or single query sets (SF_XL_night, ...); --list_datasets names them",
    )
    datasets.add_argument(
        "--dataset_path", action="append", default=[], metavar="NAME=FOLDER",
        help="a dataset's root, instead of its place under --datasets_folder",
    )
    datasets.add_argument(
        "--allow_mismatch", action="store_true", help="run datasets whose image counts differ from the expected; rows are marked"
    )
    datasets.add_argument(
        "--predictions_dir", type=Path,
        help="re-rank another method: per query set, <dir>/<name>.npy or a VPR-methods-evaluation run at <dir>/<name>",
    )
    datasets.add_argument("--recall_values", type=_positive_int, nargs="+", default=list(DEFAULT_RECALL_VALUES))
    datasets.add_argument("--list_datasets", action="store_true", help="print the known datasets, their layout and counts")
    datasets.add_argument(
        "--table_only", type=Path, metavar="OUTPUT_DIR", help="rebuild the results tables of a finished benchmark and exit"
    )
    _add_run_options(bench, plan=False)
    fit = command("train", "fine-tune FoL with the paper's losses")
    fit.add_argument("--dataset", choices=("gsv_cities", "folders"), default="gsv_cities")
    fit.add_argument("--data_root", type=Path, required=True, help="GSV-Cities root, or a folder of place folders")
    fit.add_argument(
        "--recipe", choices=TRAIN_RECIPES, default="paper",
        help="'paper': the original's training data pipeline; 'improved': random images per place, a new order "
        "each epoch, ImageNet normalisation, RandAugment (README: differences from the original)",
    )
    fit.add_argument("--cities", nargs="+", default=list(TRAIN_CITIES), help="GSV-Cities cities (the original's 23)")
    _add_model_arguments(
        fit, TRAIN_BACKBONE, "FoL weights to start from: 'auto', a .pth path, a URL, or 'none' (random) "
        "(default: 'auto', or 'none' with --dinov2_weights)", weights_default=None,
    )
    fit.add_argument("--dinov2_weights", default=None, help="official DINOv2 checkpoint file for the ViT (the paper's start)")
    fit.add_argument("--num_trainable_blocks", type=int, default=TRAIN_TRAINABLE_BLOCKS)
    fit.add_argument("--places_per_batch", type=int, default=TRAIN_PLACES_PER_BATCH)
    fit.add_argument("--images_per_place", type=int, default=IMAGES_PER_PLACE)
    fit.add_argument("--epochs", type=int, default=TRAIN_EPOCHS)
    fit.add_argument("--lr", type=float, default=TRAIN_LR)
    fit.add_argument("--weight_decay", type=float, default=TRAIN_WEIGHT_DECAY)
    fit.add_argument("--accumulation_steps", type=int, default=TRAIN_ACCUMULATION_STEPS)
    fit.add_argument("--no_augment", action="store_true", help="no RandAugment in the improved recipe")
    fit.add_argument("--seed", type=int, default=TRAIN_SEED)
    fit.add_argument("--num_workers", type=_non_negative_int, default=default_num_workers())
    fit.add_argument("--val_database_folder", type=Path, help="labelled validation database (recalls each epoch)")
    fit.add_argument("--val_queries_folder", type=Path)
    fit.add_argument(
        "--val_rerank_topk", type=_non_negative_int, default=DEFAULT_TOP_K,
        help="validation re-ranks this many candidates and keeps the best re-ranked R@5, as the original; 0: global R@5",
    )
    fit.add_argument("--val_image_size", type=_positive_int, nargs=2, metavar=("H", "W"), help="(default: --image_size)")
    fit.add_argument(
        "--patience", type=_non_negative_int, default=TRAIN_PATIENCE,
        help="stop after this many epochs without a better validation R@5; 0: never",
    )
    fit.add_argument("--output_dir", type=Path, required=True)
    fit.add_argument(
        "--resume", action="store_true",
        help="continue from <output_dir>/last.pth, with the run's settings (--epochs, --device, --num_workers and "
        "the validation flags may change)",
    )
    fit.add_argument(
        "--overwrite", action="store_true",
        help="start a new run in an --output_dir that holds an earlier one (its last.pth, best.pth, losses.csv and "
        "losses.png are removed first)",
    )
    _add_dist_timeout(fit)
    _add_report_command(command("report", "a finished eval, rerank or benchmark folder as one self-contained HTML file"))
    show = command("visualize", "FoL's regions and matches on two images, as one PNG")
    show.add_argument("--query", type=Path, required=True)
    show.add_argument("--database", type=Path, required=True)
    show.add_argument("--output", type=Path, default=Path("fol_matches.png"))
    _add_model_arguments(show)
    _add_resize_mode(show)
    show.add_argument("--matcher", choices=MATCHERS, default="fol")
    show.add_argument("--ransac_model", choices=GEOMETRIC_MODELS, default="homography")
    for subparser in commands.choices.values():
        _show_defaults(subparser)
    return parser


def _add_report_command(parser: argparse.ArgumentParser) -> None:
    """``fol-vpr report RUN_DIR``: its options (README: See and judge the re-ranking)."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the --output_dir of a finished eval, rerank or benchmark")
    parser.add_argument(
        "--max_queries", type=_positive_int, default=REPORT_MAX_QUERIES,
        help="queries shown per query set at most, changed ones first",
    )
    parser.add_argument(
        "--max_size_mb", type=_positive_float, default=REPORT_MAX_SIZE_MB,
        help="the file's size at most (MB = 10^6 bytes); queries beyond are left out",
    )
    parser.add_argument(
        "--matches", type=_non_negative_int, default=0, metavar="N",
        help="FoL's match figure (query vs re-ranked top-1) for N queries per query set, changed ones first; loads "
        "the run's model",
    )
    parser.add_argument("--weights", default=None, help="checkpoint for --matches (default: the run's, from recalls.json)")
    parser.add_argument("--device", default=None, help="where --matches runs the model (default: cuda when available)")
    parser.add_argument(
        "--max_image_pixels", type=_positive_int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="PIXELS",
        help="images that declare more pixels are not read",
    )


def report(args: argparse.Namespace) -> None:
    """``fol-vpr report``: write ``RUN_DIR/report.html`` and print where, and its size."""
    from .report import ReportOptions

    options = ReportOptions(
        max_queries=args.max_queries, max_size_mb=args.max_size_mb, matches=args.matches, weights=args.weights,
        device=args.device, max_image_pixels=args.max_image_pixels,
    )
    _write_report(args.run_dir, options)


def _report_at_end(args: argparse.Namespace, output_dir: Path) -> None:
    """``--report``: the run's report, with the run's image limit."""
    if args.report:
        from .report import ReportOptions

        _write_report(output_dir, ReportOptions(max_image_pixels=args.max_image_pixels))


def _write_report(run_dir: Path, options: ReportOptions) -> None:
    from .files import MB
    from .report import write_report

    path = write_report(run_dir, options)
    print(f"Report: {path} ({path.stat().st_size / MB:.1f} MB)")


def fine_tune(args: argparse.Namespace) -> None:
    """``fol-vpr train`` (under torchrun: every process runs this; rank 0 prints)."""
    from .checkpoint import resolve_device
    from .data.datasets import load_image_set
    from .data.places import folder_places, gsv_cities_places
    from .features import check_image_size
    from .train.config import RECIPES, TrainConfig
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
    config = TrainConfig(
        output_dir=args.output_dir, backbone=args.backbone, weights=None if weights == "none" else weights,
        dinov2_weights=args.dinov2_weights, num_trainable_blocks=args.num_trainable_blocks,
        image_size=tuple(args.image_size), places_per_batch=args.places_per_batch, images_per_place=args.images_per_place,
        **recipe, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
        accumulation_steps=args.accumulation_steps, seed=args.seed, device=args.device, num_workers=args.num_workers,
        validation=validation, validation_rerank_topk=args.val_rerank_topk,
        validation_image_size=tuple(args.val_image_size) if args.val_image_size else None, patience=args.patience,
        max_image_pixels=args.max_image_pixels,
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
    from .visualization import draw_pair, match_pair

    check_image_size(tuple(args.image_size))
    for path in (args.query, args.database):
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
    model = load_model(args.backbone, args.weights, resolve_device(args.device))
    images, regions, result = match_pair(
        model, (args.query, args.database), tuple(args.image_size), args.resize_mode, args.matcher, args.ransac_model,
        max_image_pixels=args.max_image_pixels,
    )
    figure = draw_pair(images, regions, result, (args.query.name, args.database.name), args.ransac_model)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=100)
    print(f"{len(result.matches)} matches, {int(result.inliers.sum())} RANSAC inliers: {args.output}")


def _config(args: argparse.Namespace) -> EvalConfig:
    from .evaluation.config import EvalConfig

    return EvalConfig(
        database_folder=args.database_folder,
        queries_folders=args.queries_folders,
        output_dir=args.output_dir,
        positive_dist_threshold=args.positive_dist_threshold,
        labelled=not args.no_labels,
        **_run_options(args),
    )


def _run_options(args: argparse.Namespace) -> dict:
    """The :class:`~fol_plugin.evaluation.config.EvalConfig` fields of :func:`_add_run_options`."""
    from .checkpoint import resolve_device
    from .features import ExtractionConfig
    from .matching import ScorerConfig

    return dict(
        backbone=args.backbone,
        weights=args.weights,
        extraction=ExtractionConfig(
            image_size=tuple(args.image_size), resize_mode=args.resize_mode, batch_size=args.batch_size,
            num_workers=args.num_workers, device=str(resolve_device(args.device)),
            precision=args.extraction_precision, max_image_pixels=args.max_image_pixels,
        ),
        recall_values=tuple(args.recall_values),
        rerank_topk=args.rerank_topk,
        rerank_fraction=args.rerank_fraction,
        scorer=ScorerConfig(args.rerank_scorer, args.ransac_model),
        store_dtype=args.store_dtype,
        in_memory=args.in_memory,
        num_preds_to_save=args.num_preds_to_save,
        save_only_wrong_preds=args.save_only_wrong_preds,
        save_descriptors=args.save_descriptors,
        keep_cache=args.keep_cache,
        search_chunk_size=args.search_chunk_size,
        global_dtype=args.global_dtype,
        allow_outside_paths=args.allow_outside_paths,
    )


def load_given_predictions(args: argparse.Namespace, k: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Per query set, in the order of ``--queries_folder``, the [Q, K] predictions given to ``fol-vpr rerank``,
    and their [Q, K] distances when descriptors were given (else None)."""
    import numpy as np

    from .data.datasets import list_images
    from .evaluation.outputs import read_preds_files
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
    predictions = []
    for folder, source in zip(args.queries_folders, args.predictions):
        source = Path(source)
        if source.is_dir():
            predictions.append(read_preds_files(source, list_images(folder, args.allow_outside_paths), database_paths))
        elif source.suffix == ".npy" and source.is_file():
            predictions.append(np.load(source))
        else:
            raise FileNotFoundError(f"--predictions {source}: expected a preds/ folder of .txt files or a .npy file")
    return predictions, None


def evaluate(args: argparse.Namespace) -> None:
    """``fol-vpr eval`` and ``fol-vpr rerank``: run (or plan), then print the recalls. Under
    torchrun every process runs this; rank 0 prints."""
    from .evaluation.pipeline import run_eval, run_rerank
    from .evaluation.plan import plan_run

    from .checkpoint import resolve_device

    processes = _join(args, str(resolve_device(args.device)))
    _output_dir_of_log_dir(args, processes, required=True)
    config = _config(args)
    config.extraction.device = processes.device
    config.extraction.progress = processes.is_main
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
                print(f"{key} {stage}: " + ", ".join(f"{name}: {value:.1f}" for name, value in results[stage].items()))
    print(f"Results in {config.output_dir}")
    _report_at_end(args, config.output_dir)


def benchmark(args: argparse.Namespace) -> int:
    """``fol-vpr benchmark``: every dataset through the pipeline, then the tables (rank 0 prints).

    Returns:
        0, or ``DATASETS_FAILED_EXIT`` after the tables are written when a dataset failed (with an
        error line naming the failed datasets).
    """
    from .benchmark import REGISTRY, BenchmarkConfig, failure_summary, run_benchmark, write_tables
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
    options = _run_options(args)
    processes = _join(args, options["extraction"].device)
    _output_dir_of_log_dir(args, processes, required=True)
    options["extraction"].device = processes.device
    options["extraction"].progress = processes.is_main
    config = BenchmarkConfig(
        datasets_folder=args.datasets_folder, dataset_names=args.dataset_names, output_dir=args.output_dir,
        options=options, predictions_dir=args.predictions_dir, allow_mismatch=args.allow_mismatch,
        dataset_paths=dict(_name_and_path(text) for text in args.dataset_path),
    )
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


def _name_and_path(text: str) -> tuple[str, Path]:
    name, separator, folder = text.partition("=")
    if not separator or not name or not folder:
        raise ValueError(f"--dataset_path {text!r}: expected NAME=FOLDER, e.g. SF_XL=/data/sf_xl/processed/test")
    return name, Path(folder)


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


# Each command returns None or 0 (success), or its exit code.
COMMANDS = {
    "eval": evaluate, "rerank": evaluate, "benchmark": benchmark, "train": fine_tune, "visualize": visualize, "report": report,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it loads, at every start
    try:
        code = COMMANDS[args.command](args)
    except _user_errors() as error:
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


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can fix: one line naming the value and the fix, exit code 2, no traceback
    (``--debug`` shows it). Imported when an error is caught, not at start-up."""
    from .cache import CacheMismatchError, OutputFolderError, RunLockedError
    from .checkpoint import CheckpointError
    from .evaluation.resources import InsufficientDiskError
    from .files import DiskFullError

    return (
        ValueError, FileNotFoundError, FileExistsError, PermissionError, CheckpointError, InsufficientDiskError,
        CacheMismatchError, RunLockedError, DiskFullError, OutputFolderError,
    )
