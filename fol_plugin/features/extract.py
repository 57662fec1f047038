"""Running FoL over image lists: global descriptors to a resumable memory map, local features to
a store. Every stage picks up where an interrupted run stopped."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data import load_image, preprocess
from ..models import FoLModel, check_images
from ..options import DEFAULT_BATCH_SIZE, DEFAULT_IMAGE_SIZE, default_num_workers
from .arrays import ResumableArray
from .store import InMemoryFeatures, LocalFeatureStore

logger = logging.getLogger(__name__)

FeatureStore = LocalFeatureStore | InMemoryFeatures  # local features by image id, on disk or in RAM


@dataclass
class ExtractionConfig:
    """How images become network inputs, and how they are batched.

    Attributes:
        image_size: (H, W) every image is resized to; multiples of 14.
        resize_mode: one of RESIZE_MODES (:func:`fol_plugin.data.preprocess`).
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes decoding images.
        device: where the model runs.
    """

    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    resize_mode: str = "original"
    batch_size: int = DEFAULT_BATCH_SIZE
    num_workers: int = field(default_factory=default_num_workers)
    device: str = "cpu"


class ImageListDataset(Dataset):
    """Network inputs [3, H, W] of ``paths[indices[k]]``, with the image index."""

    def __init__(self, paths: Sequence[str], indices: Sequence[int], config: ExtractionConfig) -> None:
        self.paths, self.indices, self.config = paths, np.asarray(indices, dtype=np.int64), config

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[position])
        image = load_image(self.paths[index])
        return preprocess(image, self.config.image_size, self.config.resize_mode)[0], index


def check_image_size(image_size: tuple[int, int]) -> None:
    """Fail before any work when FoL cannot take ``image_size``, naming the sizes it can take."""
    check_images(torch.empty(1, 3, *image_size, device="meta"))


def _loader(paths: Sequence[str], indices: Sequence[int], config: ExtractionConfig) -> DataLoader:
    return DataLoader(
        ImageListDataset(paths, indices, config),
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        pin_memory=torch.device(config.device).type == "cuda",
    )


@torch.inference_mode()
def extract_global(
    model: FoLModel,
    paths: Sequence[str],
    descriptors: ResumableArray,
    config: ExtractionConfig,
    local_features: FeatureStore | None = None,
    desc: str = "Global descriptors",
) -> np.ndarray:
    """Global descriptors of every image into ``descriptors`` [N, 8448], resuming after its
    complete rows; with ``local_features``, the images' local features go there in the same pass.

    Returns:
        The [N, 8448] float32 memory map.
    """
    start = descriptors.rows_done
    if start:
        logger.info("%s: resuming after %d of %d images", desc, start, len(paths))
    loader = _loader(paths, range(start, len(paths)), config)
    done = start
    for images, indices in tqdm(loader, desc=desc, unit="batch"):
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
        descriptors.array[done : done + len(images)] = global_descriptors.cpu().numpy()
        done += len(images)
        descriptors.commit(done)
    return descriptors.array


@torch.inference_mode()
def extract_local(
    model: FoLModel,
    paths: Sequence[str],
    image_ids: np.ndarray,
    local_features: FeatureStore,
    config: ExtractionConfig,
    desc: str = "Local features",
) -> None:
    """Local features of the images ``image_ids`` (indices into ``paths``) not stored yet."""
    wanted = np.unique(image_ids)
    missing = local_features.missing(wanted)
    logger.debug("%s: %d of %d images already stored", desc, len(wanted) - len(missing), len(wanted))
    if len(missing) == 0:
        return
    for images, indices in tqdm(_loader(paths, missing, config), desc=desc, unit="batch"):
        features = model.extract(images.to(config.device))
        local_features.add(indices.tolist(), features.local_descriptors, features.keypoints)
