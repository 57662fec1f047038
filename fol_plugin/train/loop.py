"""``fol-vpr train``: fine-tune FoL on places of K images with the paper's losses.

Per epoch: P places x K images per step, AdamW (the paper's lr 6e-5, weight decay 9.5e-9) with a
linear decay of the learning rate to 0.1x, optional gradient accumulation and (on CUDA) mixed
precision; then validation recalls through the evaluation pipeline, ``last.pth`` (weights,
optimiser and schedule, for ``--resume``) and the best ``best.pth`` by R@5 (model weights only, in
the original checkpoint format, loadable by torch.hub), a loss log (CSV) and its plot (PNG). Every
write is atomic and fsynced, after a check that the disk has room for it.

A new run refuses an ``output_dir`` holding an earlier run's files unless told to overwrite them;
``--resume`` refuses settings that change the run (:data:`RUN_SETTINGS`, and the training places).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import load_model, read_checkpoint, resolve_device
from ..data.datasets import ImageSet, find_positives
from ..data.loader import worker_loader
from ..data.places import PlaceDataset, collate_places
from ..distributed import SINGLE_PROCESS, Processes
from ..evaluation.recalls import compute_recalls
from ..features import ExtractionConfig, InMemoryFeatures, ResumableArray, extract_global
from ..files import MB, atomic_write, ensure_room, json_safe, save_torch, write_text
from ..models import GLOBAL_DIM, FoLModel, ViTConfig
from ..models.fol import TrainingOutputs
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
from ..rerank import rerank
from ..retrieval import exact_search
from .losses import LossWeights, fol_loss
from .sharding import gather_outputs, place_batches

if TYPE_CHECKING:
    import matplotlib.figure

logger = logging.getLogger(__name__)

LAST, BEST, LOG, PLOT = "last.pth", "best.pth", "losses.csv", "losses.png"
VALIDATION_RECALLS = (1, 5, 10)
BEST_BY = 5  # the checkpoint kept as best.pth has the highest R@5 (re-ranked unless --val_rerank_topk 0)
RERANKED = "reranked_"  # prefix of the re-ranked recalls in the log
LOSS_PANEL_COLUMNS = 3
DINOV2_PREFIX = "backbone.model."
RUN_FILES = (LAST, BEST, LOG, PLOT)  # what a run writes; --overwrite removes them first
CHECKPOINT_PATTERN = "*.pth"  # any checkpoint in an output folder marks an earlier run
ADAMW_MOMENTS = 2  # AdamW keeps two moments per trainable weight in last.pth
CHECKPOINT_MARGIN_BYTES = 16 * MB  # beside the tensors: pickle headers, the config, the log, the RNG state
LOG_FILE_BYTES = 1 * MB  # losses.csv and losses.png are each smaller
# The settings of a run that --resume must find unchanged: the flag that sets each (the field
# where no flag does). The others may change: --epochs (more to go on), --device, --num_workers,
# the validation (its folders, --val_image_size, --val_rerank_topk, --patience) and the folder's
# place (output_dir). The training places are compared too (see _places_record).
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


class ResumeMismatchError(ValueError):
    """``--resume`` with settings that differ from those of the run it would continue."""


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
        loss_weights: the weights of :func:`fol_loss`.
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


def load_dinov2_weights(model: FoLModel, path: str | Path) -> None:
    """Load an official DINOv2 checkpoint (its ViT key layout) into the backbone; every backbone
    weight must be there with the right shape."""
    state = read_checkpoint(Path(path), "cpu", option="--dinov2_weights")
    state = state.get("model", state.get("teacher", state)) if isinstance(state, dict) else state
    backbone = model.backbone.model.state_dict()
    missing = sorted(set(backbone) - set(state))
    wrong = sorted(k for k in backbone if k in state and tuple(state[k].shape) != tuple(backbone[k].shape))
    if missing or wrong:
        raise ValueError(
            f"{path} is not a DINOv2 checkpoint for this backbone: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"wrong shapes {wrong[:5]}"
        )
    model.backbone.model.load_state_dict({k: state[k] for k in backbone})


def trainable_parameters(model: FoLModel) -> list[torch.nn.Parameter]:
    """All but the frozen part of the ViT (embeddings and the blocks before the last N)."""
    vit = model.backbone.model
    frozen_blocks = vit.config.depth - model.backbone.num_trainable_blocks
    frozen = {id(p) for p in vit.patch_embed.parameters()}
    frozen |= {id(p) for block in vit.blocks[:frozen_blocks] for p in block.parameters()}
    frozen |= {id(vit.cls_token), id(vit.pos_embed), id(vit.mask_token)}
    return [p for p in model.parameters() if id(p) not in frozen]


@torch.inference_mode()
def validation_recalls(
    model: FoLModel, database: ImageSet, queries: ImageSet, extraction: ExtractionConfig, rerank_topk: int = 0
) -> dict[str, float]:
    """Recalls (percent) of a labelled database / queries pair: global retrieval (``R@N``) and,
    with ``rerank_topk``, FoL re-ranking of each query's first candidates (``reranked_R@N``)."""
    model.eval()
    local = {"database": InMemoryFeatures(), "queries": InMemoryFeatures()} if rerank_topk else {}
    with tempfile.TemporaryDirectory() as folder:
        descriptors = []
        for name, images in (("database", database), ("queries", queries)):
            array = ResumableArray(Path(folder) / f"{name}.npy", (len(images), GLOBAL_DIM))
            extracted = extract_global(model, images.paths, array, extraction, local.get(name), f"Validation {name}")
            descriptors.append(np.array(extracted))
    k = min(max(max(VALIDATION_RECALLS), rerank_topk), len(database))
    predictions = exact_search(descriptors[0], descriptors[1], k, progress=False)[1]
    positives = find_positives(database.utms, queries.utms)
    recall_values = [n for n in VALIDATION_RECALLS if n <= k]
    recalls = {f"R@{n}": value for n, value in compute_recalls(predictions, positives, recall_values).items()}
    if rerank_topk:
        reranked = rerank(predictions, local["queries"], local["database"], rerank_topk, device=extraction.device)
        recalls.update(
            {f"{RERANKED}R@{n}": value for n, value in compute_recalls(reranked, positives, recall_values).items()}
        )
    return recalls


def _write_log(output_dir: Path, rows: list[dict], advice: str) -> None:
    """``losses.csv`` (one row per epoch) and its plot ``losses.png``, each written atomically
    (``advice``: what to do if the disk fills up)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(output_dir / LOG, text.getvalue(), advice)
    atomic_write(output_dir / PLOT, lambda handle: plot_losses(rows).savefig(handle, format="png", dpi=100), advice)


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


def accumulation_divisors(num_batches: int, accumulation_steps: int) -> list[int]:
    """Per batch, the size of its accumulation group: the loss of each batch is divided by it,
    so a last, partial group is the mean of its own batches (not a fraction of a full group)."""
    divisors = []
    for start in range(0, num_batches, accumulation_steps):
        size = min(accumulation_steps, num_batches - start)
        divisors += [size] * size
    return divisors


def save_weights(model: FoLModel, path: Path, advice: str = "rerun the same command") -> None:
    """The model's weights alone, as the original repository saves them (DataParallel keys under
    ``model_state_dict``): what ``load_model`` and the torch.hub entrypoints read. Written
    atomically (``advice``: what to do if the disk fills up)."""
    save_torch(path, {"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, advice)


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes of the elements of ``tensors``."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def checkpoint_writes(model: FoLModel, output_dir: Path, improved: bool) -> list[tuple[Path, float]]:
    """The files an epoch writes, in order, with their estimated bytes: ``best.pth`` (when the
    epoch is the best), the loss log and plot, then ``last.pth`` (the weights, AdamW's moments of
    the trainable ones, and the rest). ``last.pth`` is written last: once it is there, the epoch
    is finished."""
    weights = _tensor_bytes(model.state_dict().values())
    moments = ADAMW_MOMENTS * _tensor_bytes(trainable_parameters(model))
    best = [(output_dir / BEST, weights + CHECKPOINT_MARGIN_BYTES)] if improved else []
    logs = [(output_dir / LOG, LOG_FILE_BYTES), (output_dir / PLOT, LOG_FILE_BYTES)]
    return best + logs + [(output_dir / LAST, weights + moments + CHECKPOINT_MARGIN_BYTES)]


def _disk_full_advice(saved_epochs: int) -> str:
    """What to do when the disk fills up with ``saved_epochs`` epochs in ``last.pth``."""
    if saved_epochs:
        return f"rerun with --resume to continue after epoch {saved_epochs}, the last one saved"
    return "rerun the same command with --overwrite (no epoch was saved)"


def _places_record(places: Sequence[Sequence[Path]]) -> dict[str, object]:
    """What ``--resume`` compares of the training places: how many, the folder their images share,
    and a digest of their ordered listing (absolute paths)."""
    listing = [[os.path.abspath(path) for path in place] for place in places]
    images = [path for place in listing for path in place]
    return {
        "places": len(listing),
        "images": len(images),
        "root": os.path.commonpath(images) if images else "",
        "digest": hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16],
    }


def _shown(value: object) -> str:
    """A setting as its flag takes it: sizes as "H W", None as "none"."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(_shown(item) for item in value)
    return str(value)


def _shown_places(record: dict) -> str:
    return f"{record['places']} places, {record['images']} images under {record['root']} (listing {record['digest']})"


def check_resume_settings(config: TrainConfig, places: dict, checkpoint: dict, last: Path) -> None:
    """Refuse to resume the run of ``last`` (its ``checkpoint``) with settings of ``config`` or
    training ``places`` (a :func:`_places_record`) that differ from the run's own.

    Raises:
        ResumeMismatchError: naming each difference, run's value -> this command's.
    """
    saved, current = checkpoint.get("config", {}), json_safe(config)
    differences = [
        f"{flag} {_shown(saved[name])} -> {_shown(current[name])}"
        for name, flag in RUN_SETTINGS.items()
        if name in saved and saved[name] != current[name]
    ]
    if "places" in checkpoint and checkpoint["places"] != places:
        differences.append(
            f"the training places ({PLACES_FLAGS}) {_shown_places(checkpoint['places'])} -> {_shown_places(places)}"
        )
    if differences:
        raise ResumeMismatchError(
            f"--resume: these settings differ from the run in {last}: {', '.join(differences)}; rerun with the "
            "run's settings, or start a new run in another --output_dir"
        )


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


def _log_summary(
    config: TrainConfig,
    places: Sequence[Sequence[Path]],
    model: FoLModel,
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
    trainable = sum(p.numel() for p in trainable_parameters(model))
    logger.info(
        "Training %s from %s: %d places, %d images; %s; %s of %s parameters trainable; %d epochs on %s in %s",
        backbone, start, len(places), sum(len(p) for p in places), describe_steps(config, batches), f"{trainable:,}",
        f"{sum(p.numel() for p in model.parameters()):,}", config.epochs, where, precision,
    )  # fmt: skip
    logger.info(
        "Images: %s per place, place order %s, %s, %s, resize %s",
        f"{config.images_per_place} random" if config.random_images else f"the first {config.images_per_place}",
        "shuffled each epoch (last partial batch dropped)" if config.shuffle_each_epoch else "fixed (last batch kept)",
        "ImageNet-normalised" if config.normalize_images else "not normalised",
        "RandAugment" if config.augment else "no augmentation", config.resize_mode,
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _TrainingForward(torch.nn.Module):
    """``model.forward_train`` as a module's forward, so that DistributedDataParallel wraps it."""

    def __init__(self, model: FoLModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> TrainingOutputs:
        return self.model.forward_train(images)


def earlier_run_files(output_dir: Path) -> list[str]:
    """The names of an earlier run's files in ``output_dir``: its checkpoints, loss log and plot."""
    if not output_dir.is_dir():
        return []
    return sorted({path.name for path in output_dir.glob(CHECKPOINT_PATTERN)} | {
        name for name in RUN_FILES if (output_dir / name).exists()
    })


def _check_run(
    config: TrainConfig, places: Sequence[Sequence[Path]], resume: bool, overwrite: bool, processes: Processes
) -> Path:
    """Refuse a run that cannot start, then (rank 0) make ``output_dir``, removing an earlier
    run's files with ``overwrite``; returns ``last.pth``."""
    output_dir = Path(config.output_dir)
    last = output_dir / LAST
    if resume and overwrite:
        raise ValueError(
            f"give --resume (continue the run in {output_dir}) or --overwrite (start a new one over it), not both"
        )
    found = earlier_run_files(output_dir)
    if found and not (resume or overwrite):
        resumable = "pass --resume to continue that run, " if LAST in found else ""
        raise FileExistsError(
            f"{output_dir} holds an earlier run's files ({', '.join(found)}): {resumable}pass --overwrite to start a "
            f"new run there (it removes {', '.join(RUN_FILES)} first), or choose another --output_dir"
        )
    if resume and not last.exists():
        raise FileNotFoundError(
            f"--resume: no {last} to continue from; start a new run without --resume (with --overwrite where an "
            "earlier run left files), or in another --output_dir"
        )
    if len(places) < 2:
        raise ValueError(f"training needs at least 2 places, got {len(places)}")
    if config.places_per_batch > len(places):
        raise ValueError(
            f"--places_per_batch {config.places_per_batch} exceeds the {len(places)} places found: give at most "
            f"{len(places)}, or more places"
        )
    place_batches(len(places), config.places_per_batch, processes, None, False)  # a batch splits evenly
    processes.barrier()  # every process checked before rank 0 writes anything
    if processes.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                (output_dir / name).unlink(missing_ok=True)
    return last


def _train_epoch(
    config: TrainConfig,
    forward: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    processes: Processes,
    desc: str,
) -> tuple[dict[str, float], int]:
    """One epoch of steps; returns the summed losses and the number of steps."""
    device = torch.device(processes.device)
    amp = scaler.is_enabled()
    sums: dict[str, float] = {}
    divisors = accumulation_divisors(len(loader), config.accumulation_steps)
    bar = tqdm(loader, desc=desc, unit="batch", disable=not processes.is_main)
    steps = 0
    for step, (images, labels) in enumerate(bar):
        finishes_group = (step + 1) % config.accumulation_steps == 0 or step + 1 == len(loader)
        synchronised = finishes_group or not isinstance(forward, DistributedDataParallel)
        with contextlib.nullcontext() if synchronised else forward.no_sync():
            with torch.autocast(device.type, enabled=amp):
                outputs = forward(images.to(device))
            outputs, labels = gather_outputs(outputs, labels.to(device), processes)
            parts = fol_loss(outputs, labels, config.loss_weights, generator)
            scaler.scale(parts["total"] / divisors[step]).backward()
        if finishes_group:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        steps += 1
        bar.set_postfix(loss=f"{sums['total'] / steps:.4g}")
    return sums, steps


def train(
    config: TrainConfig,
    places: Sequence[Sequence[Path]],
    resume: bool = False,
    processes: Processes = SINGLE_PROCESS,
    overwrite: bool = False,
) -> dict:
    """Fine-tune FoL on ``places`` (image paths per place).

    Args:
        resume: continue from ``output_dir/last.pth``, with the run's settings
            (:data:`RUN_SETTINGS`) and places; without it, an earlier run's files in
            ``output_dir`` are an error.
        processes: this process's place in a ``torchrun`` run (one process by default): each
            takes its share of every global batch, the losses see the whole batch, and rank 0
            validates and writes the checkpoints.
        overwrite: start a new run over an earlier one's files (:data:`RUN_FILES` are removed).

    Returns:
        {"epochs": per-epoch log rows, "best": path of the best checkpoint or None}.

    Raises:
        ResumeMismatchError: ``resume`` with settings that differ from the run's.
        DiskFullError: the disk lacks room for an epoch's files (checked before the first
            epoch and before each epoch's writes); what is on disk is unchanged.
    """
    output_dir = Path(config.output_dir)
    last = _check_run(config, places, resume, overwrite, processes)
    places_record = _places_record(places)
    saved = read_checkpoint(last, "cpu", option="--resume") if resume else None
    if saved is not None:
        check_resume_settings(config, places_record, saved, last)
    device = torch.device(processes.device) if processes.distributed else resolve_device(config.device)
    processes = dataclasses.replace(processes, device=str(device))
    _seed_everything(config.seed)
    model = load_model(config.backbone, config.weights, device, num_trainable_blocks=config.num_trainable_blocks)
    if config.dinov2_weights:
        load_dinov2_weights(model, config.dinov2_weights)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0, end_factor=config.lr_end_factor, total_iters=config.decay_iterations
    )
    start_epoch, rows, best_score, stale = 0, [], -math.inf, 0
    if saved is not None:
        model.load_state_dict(saved["model_state_dict"])
        optimizer.load_state_dict(saved["optimizer_state_dict"])
        scheduler.load_state_dict(saved["scheduler_state_dict"])
        start_epoch, rows, best_score = saved["epoch_num"] + 1, saved["log"], saved["best_score"]
        stale = saved.get("epochs_without_gain", 0)
        torch.set_rng_state(saved["rng_state"])
        if start_epoch < config.epochs:  # epochs count from 1 in the log, as in "Epoch 2/3"
            logger.info("Resuming %s after epoch %d: epoch %d of %d next", output_dir, start_epoch, start_epoch + 1,
                        config.epochs)
        else:
            logger.info("Resuming %s after epoch %d: all %d epochs are done; give a larger --epochs to train on",
                        output_dir, start_epoch, config.epochs)
        del saved  # copied into the model and the optimiser: free its tensors
    forward: torch.nn.Module = _TrainingForward(model)
    if processes.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        forward = DistributedDataParallel(forward, device_ids=device_ids, find_unused_parameters=True)
    dataset = PlaceDataset(
        places, config.image_size, config.images_per_place, config.augment, config.resize_mode,
        config.normalize_images, config.random_images, config.seed, config.max_image_pixels,
    )  # fmt: skip
    extraction = ExtractionConfig(
        config.validation_image_size or config.image_size, batch_size=config.places_per_batch, num_workers=0,
        device=str(device), progress=False, max_image_pixels=config.max_image_pixels,
    )
    best_by = f"{RERANKED if config.validation_rerank_topk else ''}R@{BEST_BY}"
    scaler = torch.amp.GradScaler("cuda", enabled=config.mixed_precision and device.type == "cuda")
    for epoch in range(start_epoch, config.epochs):
        dataset.set_epoch(epoch)
        epoch_seed = config.seed * 1000 + epoch  # the place order and CEL's partners of this epoch
        batches = place_batches(
            len(places), config.places_per_batch, processes, epoch_seed if config.shuffle_each_epoch else None,
            drop_last=config.shuffle_each_epoch,
        )
        loader = worker_loader(dataset, config.num_workers, batch_sampler=batches, collate_fn=collate_places)
        if epoch == start_epoch and processes.is_main:
            _log_summary(config, places, model, len(loader), device, processes.world_size)
            ensure_room(output_dir, checkpoint_writes(model, output_dir, True), _disk_full_advice(epoch))
        model.train()
        generator = torch.Generator().manual_seed(epoch_seed)
        sums, steps = _train_epoch(
            config, forward, loader, optimizer, scheduler, scaler, generator, processes,
            f"Epoch {epoch + 1}/{config.epochs}",
        )  # fmt: skip
        row = {"epoch": epoch + 1, "steps": steps, "lr": scheduler.get_last_lr()[0]}
        row.update({f"loss_{name}": total / max(steps, 1) for name, total in sums.items()})
        rows.append(row)
        stop = False
        if processes.is_main:
            recalls = {}
            if config.validation:
                recalls = validation_recalls(model, *config.validation, extraction, config.validation_rerank_topk)
            row.update(recalls)
            logger.info("%s", describe_epoch(row, config.epochs))
            score = recalls.get(best_by, -row["loss_total"])
            improved = score > best_score
            best_score, stale = max(best_score, score), 0 if improved else stale + 1
            advice = _disk_full_advice(epoch)
            ensure_room(output_dir, checkpoint_writes(model, output_dir, improved), advice)
            if improved:
                save_weights(model, output_dir / BEST, advice)
            _write_log(output_dir, rows, advice)
            checkpoint = {
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": scheduler.state_dict(),
                "epoch_num": epoch,
                "recalls": recalls,
                "log": rows,
                "best_score": best_score,
                "epochs_without_gain": stale,
                "rng_state": torch.get_rng_state(),  # dropout draws continue as without the interruption
                "config": json_safe(config),
                "places": places_record,
            }
            save_torch(last, checkpoint, advice)
            stop = bool(config.validation and config.patience and stale >= config.patience)
            if stop:
                logger.info(
                    "Stopping early: %s has not improved for %d epochs (--patience %d)", best_by, stale, config.patience
                )
        if processes.gather(stop)[0]:
            break
    processes.barrier()
    return {"epochs": rows, "best": str(output_dir / BEST) if (output_dir / BEST).exists() else None}
