"""What a run will need before it starts: projected disk and RAM, and the refusal of a run the
disk cannot hold. Owns the per-image cost model of global descriptors, local features and
scores."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import UserError
from ..features.store import ENTRY_BYTES
from ..files import GB
from ..models import GLOBAL_DIM, LOCAL_DIM, PATCH_SIZE
from ..models.local_features import NUM_SELECTED_PATCHES

if TYPE_CHECKING:
    from .config import EvalConfig

CELLS_PER_PATCH = 16  # the local head's 4x4 cells per selected patch
KEYPOINT_BYTES = 8  # (x, y) float32


class InsufficientDiskError(UserError, RuntimeError):
    """The output folder's disk cannot hold a run."""


def cells_per_image(image_size: tuple[int, int] | tuple[int]) -> int:
    """Upper bound on the local features of one image at ``image_size`` (one value, the shorter
    side: any aspect ratio, so the bound of 225 selected patches)."""
    if len(image_size) != 2:
        return CELLS_PER_PATCH * NUM_SELECTED_PATCHES
    patches = (image_size[0] // PATCH_SIZE) * (image_size[1] // PATCH_SIZE)
    return CELLS_PER_PATCH * min(NUM_SELECTED_PATCHES, patches)


def project_resources(
    config: EvalConfig, num_database: int, num_queries: int, num_candidates: int, global_retrieval: bool = True
) -> dict[str, float]:
    """Projected disk and RAM (bytes) of a run: global descriptors, local features, scores.
    Local features are counted at their upper bound (16 cells for each of 225 patches).

    Args:
        num_candidates: database images whose local features are needed (at most Q x top-k).
        global_retrieval: whether the run extracts and searches global descriptors (not for
            ``fol-vpr rerank``).
    """
    cells = cells_per_image(config.extraction.image_size)
    itemsize = 4 if config.in_memory else np.dtype(config.store_dtype).itemsize
    local_image = cells * (LOCAL_DIM * itemsize + KEYPOINT_BYTES) + ENTRY_BYTES
    database_itemsize = np.dtype(config.global_dtype).itemsize
    global_bytes = (num_database * database_itemsize + num_queries * 4) * GLOBAL_DIM if global_retrieval else 0
    local_bytes = (num_queries + num_candidates) * local_image if config.rerank_topk else 0
    scores_bytes = num_queries * config.rerank_topk * 4
    matching_ram = (config.rerank_topk + 1) * cells * LOCAL_DIM * 4 + torch.get_num_threads() * cells * cells * 2
    search_ram = (min(num_database, config.search_chunk_size) + num_queries) * GLOBAL_DIM * 4 if global_retrieval else 0
    in_memory_locals = (num_queries + num_database) * cells * (LOCAL_DIM + 2) * 4 if config.in_memory else 0
    return {
        "disk": global_bytes + scores_bytes + (0 if config.in_memory else local_bytes),
        "ram": max(matching_ram, search_ram) + in_memory_locals,
        "local_bytes_per_image": local_image,
    }


def check_disk(folder: Path, needed: float, already_there: float) -> None:
    """Refuse to start when ``folder``'s disk cannot hold what the run still has to write."""
    free = shutil.disk_usage(folder).free
    if needed - already_there > free:
        raise InsufficientDiskError(
            f"this run needs {needed / GB:.2f} GB in {folder} ({already_there / GB:.2f} GB already there) but only "
            f"{free / GB:.2f} GB are free: free space, pick another --output_dir, use --store_dtype float16 or lower "
            f"--rerank_topk"
        )
