"""Running FoL over image lists: global descriptors to a resumable array on disk, local features to
a store. Every stage picks up where an interrupted run stopped."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data import load_image, preprocess
from ..data.loader import worker_loader
from ..models import FoLModel, check_images
from ..options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_IMAGE_PIXELS,
    EXTRACTION_PRECISIONS,
    default_num_workers,
)
from .arrays import ResumableArray
from .store import InMemoryFeatures, LocalFeatureStore

logger = logging.getLogger(__name__)

FeatureStore = LocalFeatureStore | InMemoryFeatures  # local features by image id, on disk or in RAM
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExtractionConfig:
    """How images become network inputs, and how they are batched.

    Attributes:
        image_size: (H, W) every image is resized to; multiples of 14.
        resize_mode: one of RESIZE_MODES (:func:`fol_plugin.data.preprocess`).
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes decoding images.
        device: where the model runs.
        precision: "fp32" (the published checkpoints' numbers), or "bf16" / "fp16": the ViT
            under autocast, the aggregator and local head in float32 (see docs/PRECISION.md).
        progress: show progress bars.
        max_image_pixels: the most pixels an image may declare (checked from its header before
            decoding, :func:`fol_plugin.data.images.check_image_pixels`); None: no limit.
    """

    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    resize_mode: str = "original"
    batch_size: int = DEFAULT_BATCH_SIZE
    num_workers: int = field(default_factory=default_num_workers)
    device: str = "cpu"
    precision: str = "fp32"
    progress: bool = True
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.precision not in EXTRACTION_PRECISIONS:
            raise ValueError(f"--extraction_precision {self.precision!r}; choose one of {EXTRACTION_PRECISIONS}")


class ImageListDataset(Dataset):
    """Network inputs [3, H, W] of ``paths[indices[k]]``, with the image index."""

    def __init__(self, paths: Sequence[str], indices: Sequence[int], config: ExtractionConfig) -> None:
        self.paths, self.indices, self.config = paths, np.asarray(indices, dtype=np.int64), config

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[position])
        image = load_image(self.paths[index], self.config.max_image_pixels)
        return preprocess(image, self.config.image_size, self.config.resize_mode)[0], index


def check_image_size(image_size: tuple[int, int]) -> None:
    """Fail before any work when FoL cannot take ``image_size``, naming the sizes it can take."""
    check_images(torch.empty(1, 3, *image_size, device="meta"))


def image_loader(paths: Sequence[str], indices: Sequence[int], config: ExtractionConfig) -> DataLoader:
    return worker_loader(
        ImageListDataset(paths, indices, config),
        config.num_workers,
        batch_size=config.batch_size,
        pin_memory=torch.device(config.device).type == "cuda",
    )


@contextmanager
def extraction_autocast(config: ExtractionConfig) -> Iterator[None]:
    """Autocast for a reduced extraction precision; nothing for fp32."""
    device_type = torch.device(config.device).type
    with torch.autocast(device_type, AUTOCAST_DTYPES.get(config.precision), enabled=config.precision != "fp32"):
        yield


@torch.inference_mode()
def extract_global(
    model: FoLModel,
    paths: Sequence[str],
    descriptors: ResumableArray,
    config: ExtractionConfig,
    local_features: FeatureStore | None = None,
    desc: str = "Global descriptors",
) -> np.ndarray:
    """Global descriptors of the images of ``descriptors.todo()`` into ``descriptors`` [N, 8448];
    with ``local_features``, the images' local features go there in the same pass.

    Returns:
        The [N, 8448] array, memory-mapped read-only (float32, or the array's dtype).
    """
    todo = descriptors.todo()
    left = sum(len(rows) for rows in todo)
    if left < len(descriptors.rows):
        logger.info("%s: %d of %d images already computed", desc, len(descriptors.rows) - left, len(descriptors.rows))
    with tqdm(total=left, desc=desc, unit="image", disable=not config.progress or not left) as bar, extraction_autocast(config):
        for rows in todo:
            for images, indices in image_loader(paths, rows, config):
                images = images.to(config.device)
                if local_features is None:
                    global_descriptors = model(images)
                else:
                    features = model.extract(images)
                    global_descriptors = features.global_descriptors
                    ids = indices.numpy()
                    fresh = [k for k, image_id in enumerate(ids) if image_id not in local_features]
                    local_features.add(
                        [int(ids[k]) for k in fresh],
                        [features.local_descriptors[k] for k in fresh],
                        [features.keypoints[k] for k in fresh],
                    )
                descriptors.write(int(indices[0]), _normalised(global_descriptors, config).cpu().numpy())
                logger.debug("%s: computed images %d-%d", desc, int(indices[0]), int(indices[-1]))
                bar.update(len(images))
    return descriptors.array


def _normalised(descriptors: torch.Tensor, config: ExtractionConfig) -> torch.Tensor:
    """float32 rows of unit length: a reduced-precision pass is normalised again in float32."""
    descriptors = descriptors.float()
    return descriptors if config.precision == "fp32" else torch.nn.functional.normalize(descriptors, dim=-1)


@torch.inference_mode()
def extract_local(
    model: FoLModel,
    paths: Sequence[str],
    image_ids: np.ndarray,
    local_features: FeatureStore,
    config: ExtractionConfig,
    desc: str = "Local features",
) -> None:
    """Local features of the images ``image_ids`` (indices into ``paths``) not stored yet, in
    the given order (a distributed run gives each process its part of the missing ids)."""
    missing = local_features.missing(np.asarray(image_ids, dtype=np.int64))
    logger.debug("%s: %d of %d images already stored", desc, len(image_ids) - len(missing), len(image_ids))
    if len(missing) == 0:
        return
    with extraction_autocast(config):
        for images, indices in tqdm(
            image_loader(paths, missing, config), desc=desc, unit="batch", disable=not config.progress
        ):
            features = model.extract(images.to(config.device))
            local_features.add(indices.tolist(), features.local_descriptors, features.keypoints)
            logger.debug("%s: computed images %s", desc, indices.tolist())
