"""What a fine-tuning run tells its user: the start summary, one line per epoch, the loss log
``losses.csv`` and its plot ``losses.png`` (written atomically)."""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..files import write_csv, write_figure
from ..config import TrainConfig
from .run_folder import LOG, PLOT
from .sharding import accumulation_divisors

PLOT_DPI = 100

if TYPE_CHECKING:
    import matplotlib.figure

logger = logging.getLogger(__name__)

LOSS_PANEL_COLUMNS = 3


def write_log(output_dir: Path, rows: list[dict], advice: str) -> None:
    """``losses.csv`` (one row per epoch) and its plot ``losses.png``, each written atomically
    (``advice``: what to do if the disk fills up)."""
    fields = list(rows[0])
    write_csv(output_dir / LOG, fields, ([row.get(field, "") for field in fields] for row in rows), advice)
    write_figure(output_dir / PLOT, plot_losses(rows), dpi=PLOT_DPI, advice=advice)


def plot_losses(rows: list[dict]) -> matplotlib.figure.Figure:
    """One panel per loss (each on its own scale: they differ by orders of magnitude), the mean
    of each epoch against the epoch."""
    from matplotlib.figure import Figure  # imported when a plot is drawn, not with the package
    from matplotlib.ticker import MaxNLocator

    names = [name for name in rows[0] if name.startswith("loss_")]
    columns = min(len(names), LOSS_PANEL_COLUMNS)
    panel_rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(3.2 * columns, 2.6 * panel_rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(panel_rows, columns, squeeze=False)).ravel()
    epochs = [row["epoch"] for row in rows]
    for axis, name in zip(axes, names):
        axis.plot(epochs, [row[name] for row in rows], marker="o")
        axis.set_title(name.removeprefix("loss_"), fontsize=10)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    for axis in axes[len(names) :]:
        axis.set_axis_off()
    figure.suptitle("Mean training losses per epoch")
    return figure


def describe_steps(config: TrainConfig, batches: int) -> str:
    """Batches and optimiser steps of an epoch of ``batches`` batches, with the images each step
    really averages over (a last accumulation group may be partial, or the only one)."""
    images_per_batch = config.places_per_batch * config.images_per_place
    groups = accumulation_divisors(batches, config.accumulation_steps)
    steps = math.ceil(batches / config.accumulation_steps)
    sizes = sorted({divisor * images_per_batch for divisor in groups}, reverse=True)
    per_step = " or ".join(f"{size:,}" for size in sizes)
    return (
        f"batches of {config.places_per_batch} places x {config.images_per_place} images ({images_per_batch:,}), "
        f"{batches} {_plural(batches, 'batch', 'batches')} an epoch, accumulation {config.accumulation_steps}: "
        f"{steps} optimiser {_plural(steps, 'step', 'steps')} an epoch of {per_step} images each"
    )


def _plural(count: int, one: str, many: str) -> str:
    return one if count == 1 else many


def describe_epoch(row: dict, epochs: int) -> str:
    """An epoch's log line: ``Epoch 3/8: 12 batches, lr 5.99e-05, loss total 2.746 (global_ms 2.61, ...), R@5 ...``."""
    losses = {name.removeprefix("loss_"): value for name, value in row.items() if name.startswith("loss_")}
    parts = ", ".join(f"{name} {value:.4g}" for name, value in losses.items() if name != "total")
    recalls = ", ".join(f"{name} {value:.1f}" for name, value in row.items() if "R@" in name)
    text = (
        f"Epoch {row['epoch']}/{epochs}: {row['steps']} {_plural(row['steps'], 'batch', 'batches')}, "
        f"lr {row['lr']:.3g}, loss total {losses['total']:.4g} ({parts})"
    )
    return f"{text}, {recalls}" if recalls else text


def log_summary(
    config: TrainConfig,
    places: Sequence[Sequence[Path]],
    model: torch.nn.Module,
    trainable: Sequence[torch.nn.Parameter],
    batches: int,
    device: torch.device,
    world_size: int = 1,
) -> None:
    """What the run will do, before it does it."""
    if config.dinov2_weights:
        start = f"the DINOv2 ViT of {config.dinov2_weights}"
    elif config.weights:
        start = f"FoL weights {config.weights}"
    else:
        start = "random weights"
    backbone = config.backbone if isinstance(config.backbone, str) else "a custom ViT"
    precision = "mixed precision" if config.mixed_precision and device.type == "cuda" else "float32"
    where = f"{world_size} processes ({device} here)" if world_size > 1 else str(device)
    trainable_count = sum(p.numel() for p in trainable)
    logger.info(
        "Training %s from %s: %d places, %d images; %s; %s of %s parameters trainable; %d epochs on %s in %s",
        backbone, start, len(places), sum(len(p) for p in places), describe_steps(config, batches), f"{trainable_count:,}",
        f"{sum(p.numel() for p in model.parameters()):,}", config.epochs, where, precision,
    )  # fmt: skip
    logger.info(
        "Images: %s per place, place order %s, %s, %s, resize %s",
        f"{config.images_per_place} random" if config.random_images else f"the first {config.images_per_place}",
        "shuffled each epoch (last partial batch dropped)" if config.shuffle_each_epoch else "fixed (last batch kept)",
        "ImageNet-normalised" if config.normalize_images else "not normalised",
        "RandAugment" if config.augment else "no augmentation", config.resize_mode,
    )
