"""What a fine-tuning run is: :class:`TrainConfig` (the original's recipe by default), the
``improved`` recipe, the loss weights, and the settings ``--resume`` must find unchanged. No torch
import: the command line reads it for ``--help``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..options import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_TOP_K,
    IMAGES_PER_PLACE,
    TRAIN_ACCUMULATION_STEPS,
    TRAIN_BACKBONE,
    TRAIN_EPOCHS,
    TRAIN_LR,
    TRAIN_PATIENCE,
    TRAIN_PLACES_PER_BATCH,
    TRAIN_SEED,
    TRAIN_TRAINABLE_BLOCKS,
    TRAIN_WEIGHT_DECAY,
    default_num_workers,
)

if TYPE_CHECKING:
    from ..data.datasets import ImageSet
    from ..models import ViTConfig


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
    """A fine-tuning run.

    Attributes:
        output_dir: checkpoints, loss log and plot.
        backbone: "vitl", "vitb" or a :class:`ViTConfig`.
        weights: FoL weights to start from ("auto", a path or URL), or None for random ones.
        dinov2_weights: an official DINOv2 checkpoint file (``dinov2_vitb14_pretrain.pth`` keys)
            for the ViT, loaded over ``weights``.
        num_trainable_blocks: last ViT blocks trained (the rest stays frozen).
        image_size: (H, W) training input.
        places_per_batch, images_per_place: P and K of a step.
        augment: kornia RandAugment on the training images (the original: none).
        normalize_images: ImageNet normalisation of the training images (the original: none;
            evaluation normalises).
        random_images: K random images per place each epoch (the original: the same K, the most
            recent of a GSV-Cities place).
        shuffle_each_epoch: a new place order each epoch, the last partial batch dropped (the
            original: one order, places shuffled once within each city, the last batch kept).
        resize_mode: training resize (the original: antialiased bilinear, "bilinear_antialias").
        epochs, lr, weight_decay: AdamW as in the paper.
        lr_end_factor, decay_iterations: linear decay to ``lr_end_factor`` x over that many steps.
        accumulation_steps: micro-batches per optimiser step (mining stays within a micro-batch).
        mixed_precision: bfloat16/float16 autocast on CUDA (ignored on the CPU).
        seed: makes sampling, augmentation and initialisation reproducible.
        device, num_workers: where and with how many loader processes.
        validation: (database, queries) image sets with labels, or None.
        validation_rerank_topk: candidates FoL re-ranks per validation query (the original's
            validation: re-ranked R@5 picks the best checkpoint); 0 for global recalls only.
        validation_image_size: (H, W) of validation images (None: ``image_size``).
        patience: with validation, stop after this many epochs without a better R@5 (0: never
            stop early).
        loss_weights: the weights of :func:`fol_plugin.train.losses.fol_loss`.
        max_image_pixels: images declaring more pixels are refused before decoding (None: no limit).
    """

    output_dir: Path
    backbone: str | ViTConfig = TRAIN_BACKBONE
    weights: str | None = "auto"
    dinov2_weights: str | None = None
    num_trainable_blocks: int = TRAIN_TRAINABLE_BLOCKS
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    places_per_batch: int = TRAIN_PLACES_PER_BATCH
    images_per_place: int = IMAGES_PER_PLACE
    augment: bool = False
    normalize_images: bool = False
    random_images: bool = False
    shuffle_each_epoch: bool = False
    resize_mode: str = "bilinear_antialias"
    epochs: int = TRAIN_EPOCHS
    lr: float = TRAIN_LR
    weight_decay: float = TRAIN_WEIGHT_DECAY
    lr_end_factor: float = 0.1
    decay_iterations: int = 10_000
    accumulation_steps: int = TRAIN_ACCUMULATION_STEPS
    mixed_precision: bool = True
    seed: int = TRAIN_SEED
    device: str | None = None
    num_workers: int = field(default_factory=default_num_workers)
    validation: tuple[ImageSet, ImageSet] | None = None
    validation_rerank_topk: int = DEFAULT_TOP_K
    validation_image_size: tuple[int, int] | None = None
    patience: int = TRAIN_PATIENCE
    loss_weights: LossWeights = field(default_factory=LossWeights)
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS


# The defaults of TrainConfig are the original's recipe ("paper"); "improved" is ours: each field
# it changes is listed in the README's "Differences from the original training code".
RECIPES: dict[str, dict[str, object]] = {
    "paper": {},
    "improved": {
        "augment": True,
        "normalize_images": True,
        "random_images": True,
        "shuffle_each_epoch": True,
        "resize_mode": "original",
    },
}


# The settings of a run that --resume must find unchanged: the flag that sets each (the field
# where no flag does). The others may change: --epochs (more to go on), --device, --num_workers,
# the validation (its folders, --val_image_size, --val_rerank_topk, --patience) and the folder's
# place (output_dir). The training places are compared too (see :func:`fol_plugin.train.run_folder.places_record`).
RUN_SETTINGS = {
    "backbone": "--backbone",
    "weights": "--weights",
    "dinov2_weights": "--dinov2_weights",
    "num_trainable_blocks": "--num_trainable_blocks",
    "image_size": "--image_size",
    "places_per_batch": "--places_per_batch",
    "images_per_place": "--images_per_place",
    "accumulation_steps": "--accumulation_steps",
    "lr": "--lr",
    "weight_decay": "--weight_decay",
    "lr_end_factor": "lr_end_factor",
    "decay_iterations": "decay_iterations",
    "seed": "--seed",
    "augment": "--recipe/--no_augment (augment)",
    "normalize_images": "--recipe (normalize_images)",
    "random_images": "--recipe (random_images)",
    "shuffle_each_epoch": "--recipe (shuffle_each_epoch)",
    "resize_mode": "--recipe (resize_mode)",
    "mixed_precision": "mixed_precision",
    "loss_weights": "loss_weights",
}
PLACES_FLAGS = "--dataset, --data_root, --cities"
