"""Every configuration of fol-plugin, in one module free of heavy imports: the ViT's sizes, how
images are extracted, the re-ranking scorer, an evaluation, a benchmark, the loss weights and a
fine-tuning run, and the inputs of the commands that no run keeps.

Each field carries its default and its help once, with the flag that sets it
(:func:`fol_plugin.flags.option`): ``fol-vpr`` builds its subcommands from these fields and the configurations
from the parsed flags (:mod:`fol_plugin.cli`). A field made with :func:`internal` has no flag.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .flags import (
    ImageSizeAction, fraction, int_at_least, internal, non_negative_float, non_negative_int, option, positive_float,
    positive_int,
)  # fmt: skip
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
    LOCAL_STRIDE,
    MATCHERS,
    POS_EMBED_GRID,
    RANSAC_SUFFIX,
    REPORT_MAX_QUERIES,
    REPORT_MAX_SIZE_MB,
    RESIZE_MODES,
    SCORERS,
    STORE_DTYPES,
    TRAIN_CITIES,
    default_num_workers,
)

if TYPE_CHECKING:
    from .data.datasets import ImageSet

# The groups of --help.
MODEL_GROUP, DATA_GROUP, RERANK_GROUP, INPUTS_GROUP, OUTPUT_GROUP = "model", "data", "re-ranking", "inputs", "output"
SCALE_GROUP = "large datasets (see README: Large datasets, many GPUs, clusters)"
BENCHMARK_GROUP = "datasets (see README: The paper's benchmark in one command)"
PREDICTIONS_GROUP = "predictions to re-rank (one per --queries_folder, in order)"
# Options several configurations share: declared once, each used by the fields below.
IMAGE_SIZE = dict(
    type=positive_int, nargs="+", action=ImageSizeAction, metavar="SIZE", convert=tuple, group=MODEL_GROUP,
    help="H W, multiples of 14; or one value, as VPR-methods-evaluation: each image's shorter side (aspect ratio "
    "kept, each side rounded to the nearest multiple of 14)",
)  # fmt: skip
DEVICE = dict(group=MODEL_GROUP, help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
MAX_IMAGE_PIXELS = dict(
    type=positive_int, metavar="PIXELS", group=MODEL_GROUP,
    help="refuse images that declare more pixels (read from the header, before decoding)",
)  # fmt: skip
RESIZE_MODE = dict(
    choices=RESIZE_MODES, group=MODEL_GROUP,
    help="'original': FoL's own evaluation (bilinear, no antialiasing); 'bilinear_antialias': VPR-methods-evaluation's "
    "(torchvision >= 0.17 Resize); 'antialias': kornia's",
)  # fmt: skip
NUM_WORKERS = dict(type=non_negative_int, group=MODEL_GROUP, help="image-decoding processes: this machine's cores, at most 4")
RECALL_VALUES = dict(type=positive_int, nargs="+", convert=tuple, group=DATA_GROUP)
RANSAC_MODEL = dict(choices=GEOMETRIC_MODELS, group=RERANK_GROUP)
WEIGHTS_HELP = "'auto' (published checkpoint), a .pth path or a URL"


@dataclass(frozen=True)
class ViTConfig:
    """Sizes of a DINOv2 ViT/14. The presets are the published ones; tests shrink them."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    pos_embed_grid: int = POS_EMBED_GRID

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


@dataclass
class ExtractionConfig:
    """How images become network inputs, and how they are batched (a field's help is its
    documentation: ``fol-vpr eval --help`` shows it)."""

    image_size: tuple[int, int] | tuple[int] = option(DEFAULT_IMAGE_SIZE, **IMAGE_SIZE)
    resize_mode: str = option("original", **RESIZE_MODE)
    batch_size: int = option(DEFAULT_BATCH_SIZE, type=positive_int, group=MODEL_GROUP, help="images per forward pass")
    num_workers: int = option(factory=default_num_workers, **NUM_WORKERS)
    device: str = option("cpu", cli_default=None, **DEVICE)  # the command line resolves None
    precision: str = option(
        "fp32", flag="extraction_precision", choices=EXTRACTION_PRECISIONS, group=MODEL_GROUP,
        help="'fp32' gives the published checkpoints' numbers; 'bf16'/'fp16' run the ViT under autocast (faster where "
        "the device computes them natively, see docs/PRECISION.md); 'auto': bf16 where native, else fp32",
    )  # fmt: skip
    progress: bool = internal(True)
    max_image_pixels: int | None = option(DEFAULT_MAX_IMAGE_PIXELS, **MAX_IMAGE_PIXELS)

    def __post_init__(self) -> None:
        if self.precision not in EXTRACTION_PRECISIONS:
            raise ValueError(f"--extraction_precision {self.precision!r}; choose one of {EXTRACTION_PRECISIONS}")


@dataclass
class ScorerConfig:
    """A re-ranking scorer: FoL's own score (the fast exact engine), or the matches or RANSAC
    inliers of a matcher (:mod:`fol_plugin.matching`)."""

    name: str = option(
        "fol", flag="rerank_scorer", choices=SCORERS, metavar="SCORER", group=RERANK_GROUP,
        help="'fol' (FoL's score), '<matcher>' (match count) or '<matcher>+ransac' (inliers); matchers: "
        + ", ".join(MATCHERS),
    )  # fmt: skip
    ransac_model: str = option("homography", help="RANSAC's model, for '+ransac' scorers", **RANSAC_MODEL)
    inlier_threshold: float = internal(LOCAL_STRIDE)  # pixels of the network input: one local-grid cell
    seed: int = internal(0)  # RANSAC's

    def __post_init__(self) -> None:
        if self.name not in SCORERS:
            raise ValueError(f"re-ranking scorer {self.name!r}; choose one of {', '.join(SCORERS)}")

    @property
    def matcher(self) -> str:
        return self.name.removesuffix(RANSAC_SUFFIX)

    @property
    def uses_ransac(self) -> bool:
        return self.name.endswith(RANSAC_SUFFIX)


@dataclass
class EvalConfig:
    """Everything ``fol-vpr eval`` and ``fol-vpr rerank`` need (flag names of
    VPR-methods-evaluation where they overlap)."""

    database_folder: Path = option(type=Path, required=True, group=DATA_GROUP, help="folder of database images")
    queries_folders: list[Path] = option(
        flag="queries_folder", type=Path, action="append", required=True, group=DATA_GROUP,
        help="folder of query images; repeat for several query sets against one database",
    )  # fmt: skip
    output_dir: Path = option(type=Path, group=OUTPUT_GROUP, help="results, and the cache a rerun resumes from")
    backbone: str | ViTConfig = option("vitl", choices=BACKBONES, group=MODEL_GROUP, help="the published ViT of FoL")
    weights: str | None = option("auto", group=MODEL_GROUP, help=WEIGHTS_HELP)
    extraction: ExtractionConfig = internal(factory=ExtractionConfig)
    recall_values: tuple[int, ...] = option(DEFAULT_RECALL_VALUES, help="the N of each recall@N", **RECALL_VALUES)
    positive_dist_threshold: float = option(
        DEFAULT_POSITIVE_DISTANCE, type=positive_float, group=DATA_GROUP,
        help="metres within which a database image is correct",
    )
    labelled: bool = option(
        True, flag="no_labels", invert=True, action="store_true", group=DATA_GROUP,
        help="images have no @east@north@ names: skip recalls",
    )  # fmt: skip
    rerank_topk: int = option(
        DEFAULT_TOP_K, type=non_negative_int, group=RERANK_GROUP, help="candidates re-ranked per query; 0: none"
    )
    rerank_fraction: float = option(
        DEFAULT_RERANK_FRACTION, type=fraction, metavar="F", group=RERANK_GROUP,
        help="re-rank only the share F of queries whose global top-1 is least confident (largest distance); the "
        "others keep their global order (README: Adaptive re-ranking)",
    )  # fmt: skip
    scorer: ScorerConfig = internal(factory=ScorerConfig)
    store_dtype: str = option(
        "float32", choices=STORE_DTYPES, group=RERANK_GROUP,
        help="local features on disk; float16 halves the disk but scores may differ from the original's",
    )  # fmt: skip
    in_memory: bool = option(False, action="store_true", group=RERANK_GROUP, help="keep all database local features in RAM")
    num_preds_to_save: int = option(
        0, type=non_negative_int, group=OUTPUT_GROUP, help="PNG grids and preds/*.txt with this many"
    )
    save_only_wrong_preds: bool = option(
        False, action="store_true", group=OUTPUT_GROUP,
        help="those grids and files only for queries whose first prediction is wrong (needs labels)",
    )  # fmt: skip
    save_descriptors: bool = option(False, action="store_true", group=OUTPUT_GROUP, help="keep the global descriptors as .npy")
    keep_cache: bool = option(False, action="store_true", group=OUTPUT_GROUP, help="keep <output_dir>/cache after success")
    search_chunk_size: int = option(
        DEFAULT_SEARCH_CHUNK, type=positive_int, group=SCALE_GROUP, help="database rows searched at a time (RAM holds one chunk)"
    )
    global_dtype: str = option(
        "float32", choices=GLOBAL_DTYPES, group=SCALE_GROUP,
        help="database descriptors on disk; float16 halves them (searched in float32)",
    )  # fmt: skip
    allow_outside_paths: bool = option(
        False, action="store_true", group=INPUTS_GROUP,
        help="accept <folder>_images_paths.txt entries that lead outside their folder",
    )  # fmt: skip


def _dataset_path(text: str) -> tuple[str, Path]:
    name, separator, folder = text.partition("=")
    if not separator or not name or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FOLDER, e.g. SF_XL=/data/sf_xl/processed/test")
    return name, Path(folder)


@dataclass
class BenchmarkConfig:
    """What ``fol-vpr benchmark`` runs: each dataset's evaluation takes ``options`` (the
    :class:`EvalConfig` fields shared by every dataset); the folders, labels and positive radius
    come from the registry, and R@1/5/10 are always among the recall values."""

    datasets_folder: Path | None = option(
        None, type=Path, group=BENCHMARK_GROUP, help="the root of the datasets (the original's --eval_datasets_folder)"
    )
    dataset_names: list[str] | None = option(
        None, nargs="+", metavar="NAME", group=BENCHMARK_GROUP,
        help="datasets (pitts30k, SF_XL, SVOX, ...) or single query sets (SF_XL_night, ...); --list_datasets names them",
    )  # fmt: skip
    output_dir: Path | None = option(None, type=Path, group=OUTPUT_GROUP, help="one folder per dataset, the tables")
    options: dict = internal(factory=dict)
    predictions_dir: Path | None = option(
        None, type=Path, group=BENCHMARK_GROUP,
        help="re-rank another method: per query set, <dir>/<name>.npy or a VPR-methods-evaluation run at <dir>/<name>",
    )  # fmt: skip
    allow_mismatch: bool = option(
        False, action="store_true", group=BENCHMARK_GROUP,
        help="run datasets whose image counts differ from the expected; rows are marked",
    )  # fmt: skip
    dataset_paths: dict[str, Path] = option(
        factory=dict, cli_default=[], flag="dataset_path", type=_dataset_path, action="append", metavar="NAME=FOLDER",
        convert=dict, group=BENCHMARK_GROUP, help="a dataset's root, instead of its place under --datasets_folder",
    )  # fmt: skip
    registry: Mapping[str, Any] | None = internal(None)  # the known datasets (None: fol_plugin.benchmark.REGISTRY)


@dataclass
class LossWeights:
    """The paper's weights of :func:`fol_plugin.train.losses.fol_loss`."""

    global_ms: float = 1.0
    alignment: float = 5e-3  # each of SAL's two terms
    contrast: float = 1.0
    local_triplet: float = 1.0
    pseudo_correspondence: float = 1.0


@dataclass
class TrainConfig:
    """A fine-tuning run; the defaults are the original's recipe ("paper"), :data:`RECIPES` lists
    what "improved" changes (README: differences from the original training code)."""

    output_dir: Path = option(type=Path, required=True, help="checkpoints, the loss log and its plot")
    backbone: str | ViTConfig = option("vitl", choices=BACKBONES, group=MODEL_GROUP, help="the published ViT of FoL")
    weights: str | None = option(
        None, group=MODEL_GROUP, help="FoL weights to start from: 'auto', a .pth path, a URL, or 'none' (random) "
        "(default: 'auto', or 'none' with --dinov2_weights)",
    )  # fmt: skip
    dinov2_weights: str | None = option(None, help="official DINOv2 checkpoint file for the ViT (the paper's start)")
    num_trainable_blocks: int = option(4, type=non_negative_int, help="last ViT blocks trained; the others stay frozen")
    image_size: tuple[int, int] = option(DEFAULT_IMAGE_SIZE, **IMAGE_SIZE)
    places_per_batch: int = option(
        60, type=int_at_least(2, "the metric loss needs other places as negatives"), help="P places of a batch"
    )
    images_per_place: int = option(
        IMAGES_PER_PLACE, type=int_at_least(2, "the metric loss needs positives of the same place"),
        help="K images of each place",
    )  # fmt: skip
    augment: bool = internal(False)  # kornia RandAugment (the original: none)
    normalize_images: bool = internal(False)  # ImageNet normalisation (the original trains on [0, 1])
    random_images: bool = internal(False)  # K random images per place each epoch (the original: the first K)
    shuffle_each_epoch: bool = internal(False)  # a new place order each epoch, the last partial batch dropped
    resize_mode: str = internal("bilinear_antialias")  # the original's training resize
    epochs: int = option(8, type=positive_int, help="epochs to train (it may grow with --resume)")
    lr: float = option(6e-5, type=positive_float, help="AdamW's learning rate, decayed linearly to 0.1x over 10,000 steps")
    weight_decay: float = option(9.5e-9, type=non_negative_float, help="AdamW's weight decay")
    lr_end_factor: float = internal(0.1)
    decay_iterations: int = internal(10_000)
    accumulation_steps: int = option(
        1, type=positive_int, help="batches per optimiser step (mining stays within a batch)"
    )
    mixed_precision: bool = internal(True)  # autocast on CUDA (ignored on the CPU)
    seed: int = option(0, type=int, help="sampling, augmentation and initialisation")
    device: str | None = option(None, **DEVICE)
    num_workers: int = option(factory=default_num_workers, **NUM_WORKERS)
    validation: tuple[ImageSet, ImageSet] | None = internal(None)  # (database, queries), labelled
    validation_rerank_topk: int = option(
        DEFAULT_TOP_K, flag="val_rerank_topk", type=non_negative_int,
        help="validation re-ranks this many candidates and keeps the best re-ranked R@5, as the original; 0: global R@5",
    )  # fmt: skip
    validation_image_size: tuple[int, int] | None = option(
        None, flag="val_image_size", type=positive_int, nargs=2, metavar=("H", "W"), convert=tuple,
        help="(default: --image_size)",
    )  # fmt: skip
    patience: int = option(
        10, type=non_negative_int, help="stop after this many epochs without a better validation R@5; 0: never"
    )
    loss_weights: LossWeights = internal(factory=LossWeights)
    max_image_pixels: int | None = option(DEFAULT_MAX_IMAGE_PIXELS, **MAX_IMAGE_PIXELS)


# "improved" is ours: each field it changes is listed in the README's differences from the original.
RECIPES: dict[str, dict[str, object]] = {
    "paper": {},
    "improved": {
        "augment": True, "normalize_images": True, "random_images": True, "shuffle_each_epoch": True,
        "resize_mode": "original",
    },
}  # fmt: skip


@dataclass
class TrainInputs:
    """What ``fol-vpr train`` reads and how it starts, beside its :class:`TrainConfig`."""

    data_root: Path = option(type=Path, required=True, help="GSV-Cities root, or a folder of place folders")
    dataset: str = option("gsv_cities", choices=("gsv_cities", "folders"), help="how --data_root is laid out")
    recipe: str = option(
        "paper", choices=tuple(RECIPES),
        help="'paper': the original's training data pipeline; 'improved': random images per place, a new order each "
        "epoch, ImageNet normalisation, RandAugment (README: differences from the original)",
    )  # fmt: skip
    cities: list[str] = option(factory=lambda: list(TRAIN_CITIES), nargs="+", help="GSV-Cities cities (the original's 23)")
    no_augment: bool = option(False, action="store_true", help="no RandAugment in the improved recipe")
    val_database_folder: Path | None = option(None, type=Path, help="labelled validation database (recalls each epoch)")
    val_queries_folder: Path | None = option(None, type=Path, help="labelled validation queries")
    resume: bool = option(
        False, action="store_true",
        help="continue from <output_dir>/last.pth, with the run's settings (--epochs, --device, --num_workers and the "
        "validation flags may change)",
    )  # fmt: skip
    overwrite: bool = option(
        False, action="store_true",
        help="start a new run in an --output_dir that holds an earlier one (its last.pth, best.pth, losses.csv and "
        "losses.png are removed first)",
    )  # fmt: skip


@dataclass
class RerankInputs:
    """The predictions ``fol-vpr rerank`` re-ranks, one per ``--queries_folder``, in order."""

    predictions: list[str] = option(
        factory=list, action="append", group=PREDICTIONS_GROUP,
        help="a preds/ folder of VPR-methods-evaluation (*.txt) or a [Q, K] .npy of database indices",
    )  # fmt: skip
    database_descriptors: Path | None = option(
        None, type=Path, group=PREDICTIONS_GROUP, help="[N, D] .npy of another method (instead of --predictions)"
    )
    queries_descriptors: list[Path] = option(
        factory=list, type=Path, action="append", group=PREDICTIONS_GROUP, help="[Q, D] .npy per query set"
    )


@dataclass
class RunControl:
    """How a run is driven: planned only, its output folder named as VPR-methods-evaluation names
    it, its processes' patience under torchrun."""

    plan: int | None = option(
        None, type=positive_int, nargs="?", const=0, metavar="PROCESSES", group=SCALE_GROUP,
        help="print the projected disk, RAM and time per stage, calibrated on a few batches, and exit; optionally for "
        "PROCESSES processes (default: this run's)",
    )  # fmt: skip
    dist_timeout: float = option(
        DEFAULT_DIST_TIMEOUT_MIN, type=positive_float, metavar="MINUTES", group=SCALE_GROUP,
        help="under torchrun, how long a process waits for the slowest one",
    )  # fmt: skip
    log_dir: str | None = option(
        None, metavar="NAME", group=OUTPUT_GROUP,
        help="instead of --output_dir, as VPR-methods-evaluation: outputs in logs/NAME/<date-time> (a new folder each run)",
    )  # fmt: skip
    report: bool = option(
        False, action="store_true", group=OUTPUT_GROUP,
        help="write <output_dir>/report.html at the end (as fol-vpr report does)",
    )  # fmt: skip


@dataclass
class ReportOptions:
    """What ``fol-vpr report`` shows of a finished run (README: See and judge the re-ranking)."""

    max_queries: int = option(
        REPORT_MAX_QUERIES, type=positive_int, help="queries shown per query set at most, changed ones first"
    )
    max_size_mb: float = option(
        REPORT_MAX_SIZE_MB, type=positive_float,
        help="the file's size at most (MB = 10^6 bytes); queries beyond are left out",
    )  # fmt: skip
    matches: int = option(
        0, type=non_negative_int, metavar="N",
        help="FoL's match figure (query vs re-ranked top-1) for N queries per query set, changed ones first; loads the "
        "run's model",
    )  # fmt: skip
    weights: str | None = option(None, help="checkpoint for --matches (default: the run's, from recalls.json)")
    device: str | None = option(None, help="where --matches runs the model (default: cuda when available)")
    max_image_pixels: int | None = option(
        DEFAULT_MAX_IMAGE_PIXELS, type=positive_int, metavar="PIXELS", help="images that declare more pixels are not read"
    )


@dataclass
class BenchmarkInputs:
    """What ``fol-vpr benchmark`` can do instead of running."""

    list_datasets: bool = option(
        False, action="store_true", group=BENCHMARK_GROUP, help="print the known datasets, their layout and counts"
    )
    table_only: Path | None = option(
        None, type=Path, metavar="OUTPUT_DIR", group=BENCHMARK_GROUP,
        help="rebuild the results tables of a finished benchmark and exit",
    )  # fmt: skip


@dataclass
class ExportConfig:
    """``fol-vpr export``: FoL as one ONNX graph for one image size (:mod:`fol_plugin.export`)."""

    output: Path = option(type=Path, required=True, help="the .onnx file written")
    backbone: str = option("vitl", choices=BACKBONES, group=MODEL_GROUP, help="the published ViT of FoL")
    weights: str | None = option("auto", group=MODEL_GROUP, help=WEIGHTS_HELP)
    image_size: tuple[int, int] = option(
        DEFAULT_IMAGE_SIZE, type=positive_int, nargs=2, metavar=("H", "W"), convert=tuple, group=MODEL_GROUP,
        help="the one input size the graph takes (multiples of 14); any batch size",
    )  # fmt: skip


@dataclass
class VisualizeConfig:
    """``fol-vpr visualize``: FoL's regions and matches on two images."""

    query: Path = option(type=Path, required=True, help="the query image")
    database: Path = option(type=Path, required=True, help="the database image")
    output: Path = option(Path("fol_matches.png"), type=Path, help="the PNG written")
    backbone: str = option("vitl", choices=BACKBONES, group=MODEL_GROUP, help="the published ViT of FoL")
    weights: str | None = option("auto", group=MODEL_GROUP, help=WEIGHTS_HELP)
    image_size: tuple[int, int] | tuple[int] = option(DEFAULT_IMAGE_SIZE, **IMAGE_SIZE)
    device: str | None = option(None, **DEVICE)
    max_image_pixels: int | None = option(DEFAULT_MAX_IMAGE_PIXELS, **MAX_IMAGE_PIXELS)
    resize_mode: str = option("original", **RESIZE_MODE)
    matcher: str = option("fol", choices=MATCHERS, group=MODEL_GROUP, help="FoL's mutual matches, or a kornia matcher")
    ransac_model: str = option("homography", help="RANSAC's model", **RANSAC_MODEL)
