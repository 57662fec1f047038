"""The names, choices and constants that configurations and the models share, in a module free
of heavy imports (the configurations themselves: :mod:`fol_plugin.config`). Each is named once."""
from __future__ import annotations

import os

PATCH_SIZE = 14  # DINOv2 ViT/14
LOCAL_STRIDE = PATCH_SIZE / 4  # input pixels between two local-grid cells (two stride-2 up-samplings)
POS_EMBED_GRID = 37  # the checkpoints store 37 x 37 patch position embeddings (518 px)
BACKBONES = ("vitb", "vitl")
DEFAULT_IMAGE_SIZE = (322, 322)
RESIZE_MODES = ("original", "bilinear_antialias", "antialias")  # see fol_plugin.data.images.preprocess
STORE_DTYPES = ("float16", "float32")
EXTRACTION_PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # auto: see fol_plugin.features.extract
GLOBAL_DTYPES = ("float32", "float16")
DEFAULT_TOP_K = 100
DEFAULT_RERANK_FRACTION = 1.0  # every query re-ranked
DEFAULT_RECALL_VALUES = (1, 5, 10, 20)
DEFAULT_POSITIVE_DISTANCE = 25.0  # metres
DEFAULT_BATCH_SIZE = 4
# Decoded pixels an image may have (checked from its header): 2**27 admits every image of the VPR
# datasets, the largest Street View panoramas (13312 x 6656) included, and refuses files whose
# decoding alone would take several GB (1.6 GB of float32 RGB at the limit).
DEFAULT_MAX_IMAGE_PIXELS = 2**27
DESCRIPTOR_MATCHERS = ("nn", "mnn", "snn", "smnn")
GEOMETRY_AWARE_MATCHERS = ("fginn", "adalam")
MATCHERS = ("fol", *DESCRIPTOR_MATCHERS, *GEOMETRY_AWARE_MATCHERS)
RANSAC_SUFFIX = "+ransac"
SCORERS = tuple(MATCHERS) + tuple(name + RANSAC_SUFFIX for name in MATCHERS)
GEOMETRIC_MODELS = ("homography", "fundamental")
MAX_DEFAULT_WORKERS = 4
DEFAULT_SEARCH_CHUNK = 65536  # database rows per faiss index
DEFAULT_DIST_TIMEOUT_MIN = 120.0  # how long a process of a distributed run waits at a barrier
# fol-vpr report (fol_plugin.report.html)
REPORT_MAX_QUERIES = 1000  # per query set
REPORT_MAX_SIZE_MB = 20.0

# fol-vpr train (fol_plugin.config.TrainConfig). The original's training cities (its dataloaders/GSVCities.py), in its order.
TRAIN_CITIES = (
    "Bangkok", "BuenosAires", "LosAngeles", "MexicoCity", "OSL", "Rome", "Barcelona", "Chicago", "Madrid", "Miami",
    "Phoenix", "TRT", "Boston", "Lisbon", "Medellin", "Minneapolis", "PRG", "WashingtonDC", "Brussels", "London",
    "Melbourne", "Osaka", "PRS",
)  # fmt: skip
IMAGES_PER_PLACE = 4  # K images of each training place, as GSV-Cities


def usable_cores() -> int:
    """The cores this process may run on (its affinity on Linux, the machine's elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """DataLoader workers that fit this machine: one per usable core, at most 4 (more than the
    cores makes torch warn, and decoding is rarely the bottleneck)."""
    return min(MAX_DEFAULT_WORKERS, usable_cores())
