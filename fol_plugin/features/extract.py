"""Running FoL over image lists: global descriptors to a resumable array on disk, local features to
a store. Every stage picks up where an interrupted run stopped."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ..data import load_image, preprocess
from ..data.images import checked_network_size, network_size
from ..data.loader import worker_loader
from ..host import auto_extraction_precision, emulated_precision_warning
from ..text import printable
from ..models import FoLModel, check_images
from ..config import ExtractionConfig
from .arrays import ResumableArray
from .store import InMemoryFeatures, LocalFeatureStore

logger = logging.getLogger(__name__)

FeatureStore = LocalFeatureStore | InMemoryFeatures  # local features by image id, on disk or in RAM
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ImageListDataset(Dataset):
    """Network inputs [3, H, W] of ``paths[indices[k]]``, with the image index."""

    def __init__(self, paths: Sequence[str], indices: Sequence[int], config: ExtractionConfig) -> None:
        self.paths, self.indices, self.config = paths, np.asarray(indices, dtype=np.int64), config

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[position])
        image = load_image(self.paths[index], self.config.max_image_pixels)
        size = checked_network_size(self.paths[index], self.config.image_size, *image.shape[-2:], self.config.max_image_pixels)
        return preprocess(image, size, self.config.resize_mode)[0], index


def check_image_size(image_size: tuple[int, int] | tuple[int]) -> None:
    """Fail before any work when FoL cannot take ``image_size`` (with one value: its smallest
    input, a square of that side rounded), naming the sizes it can take."""
    if len(image_size) not in (1, 2):
        raise ValueError(f"--image_size {' '.join(map(str, image_size))}: give H W, or one value for the shorter side")
    check_images(torch.empty(1, 3, *network_size(image_size, *image_size * (3 - len(image_size))), device="meta"))


def _same_size_runs(items: list[tuple[torch.Tensor, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A loaded batch as runs of consecutive images of one size: [n, 3, H, W] and their indices [n]."""
    runs: list[tuple[list[torch.Tensor], list[int]]] = []
    for image, index in items:
        if runs and runs[-1][0][-1].shape == image.shape:
            runs[-1][0].append(image)
            runs[-1][1].append(index)
        else:
            runs.append(([image], [index]))
    return [(torch.stack(images), torch.tensor(indices, dtype=torch.int64)) for images, indices in runs]


def image_batches(
    paths: Sequence[str], indices: Sequence[int], config: ExtractionConfig
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Network inputs of ``paths[indices]`` in order, in batches of at most ``batch_size`` images
    of one size (a batch is cut where the size changes): ([n, 3, H, W], [n] image indices)."""
    loader = worker_loader(
        ImageListDataset(paths, indices, config),
        config.num_workers,
        batch_size=config.batch_size,
        collate_fn=_same_size_runs,
        pin_memory=torch.device(config.device).type == "cuda",
    )
    for runs in loader:
        yield from runs


def extraction_precision(config: ExtractionConfig) -> str:
    """The precision an extraction runs in: ``config.precision``, with ``auto`` resolved for its
    device: on the CPU bf16 where bf16 is native and fp32 elsewhere
    (:func:`fol_plugin.host.auto_extraction_precision`), on CUDA bf16 where supported, else fp16."""
    if config.precision != "auto":
        return config.precision
    device = torch.device(config.device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return auto_extraction_precision() if device.type == "cpu" else "fp32"


def warn_if_emulated(config: ExtractionConfig) -> None:
    """One warning when a CPU extraction asks for a precision this CPU emulates, naming the
    measured slow-down (:func:`fol_plugin.host.emulated_precision_warning`)."""
    if torch.device(config.device).type == "cpu":
        warning = emulated_precision_warning(extraction_precision(config))
        if warning:
            logger.warning(warning)


@contextmanager
def extraction_autocast(config: ExtractionConfig) -> Iterator[None]:
    """Autocast for a reduced extraction precision; nothing for fp32."""
    device_type = torch.device(config.device).type
    precision = extraction_precision(config)
    with torch.autocast(device_type, AUTOCAST_DTYPES.get(precision), enabled=precision != "fp32"):
        yield


@torch.inference_mode()
def extract_global(
    model: FoLModel,
    paths: Sequence[str],
    descriptors: ResumableArray,
    config: ExtractionConfig,
    local_features: FeatureStore | None = None,
    label: str = "Global descriptors",
) -> np.ndarray:
    """Global descriptors of the images of ``descriptors.todo()`` into ``descriptors`` [N, 8448];
    with ``local_features``, the images' local features go there in the same pass.

    Returns:
        The [N, 8448] array, memory-mapped read-only (float32, or the array's dtype).
    """
    todo = descriptors.todo()
    left = sum(len(rows) for rows in todo)
    if left < len(descriptors.rows):
        logger.info("%s: %d of %d images already computed", label, len(descriptors.rows) - left, len(descriptors.rows))
    bar = tqdm(total=left, desc=printable(label), unit="image", disable=not config.progress or not left)
    with bar, extraction_autocast(config):
        for rows in todo:
            for images, indices in image_batches(paths, rows, config):
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
                logger.debug("%s: computed images %d-%d", label, int(indices[0]), int(indices[-1]))
                bar.update(len(images))
    return descriptors.array


def _normalised(descriptors: torch.Tensor, config: ExtractionConfig) -> torch.Tensor:
    """float32 rows of unit length: a reduced-precision pass is normalised again in float32."""
    descriptors = descriptors.float()
    return descriptors if extraction_precision(config) == "fp32" else torch.nn.functional.normalize(descriptors, dim=-1)


@torch.inference_mode()
def extract_local(
    model: FoLModel,
    paths: Sequence[str],
    image_ids: np.ndarray,
    local_features: FeatureStore,
    config: ExtractionConfig,
    label: str = "Local features",
) -> None:
    """Local features of the images ``image_ids`` (indices into ``paths``) not stored yet, in
    the given order (a distributed run gives each process its part of the missing ids)."""
    missing = local_features.missing(np.asarray(image_ids, dtype=np.int64))
    logger.debug("%s: %d of %d images already stored", label, len(image_ids) - len(missing), len(image_ids))
    if len(missing) == 0:
        return
    bar = tqdm(total=len(missing), desc=printable(label), unit="image", disable=not config.progress)
    with extraction_autocast(config), bar:
        for images, indices in image_batches(paths, missing, config):
            features = model.extract(images.to(config.device))
            local_features.add(indices.tolist(), features.local_descriptors, features.keypoints)
            logger.debug("%s: computed images %s", label, indices.tolist())
            bar.update(len(indices))
