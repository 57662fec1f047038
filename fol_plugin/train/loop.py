"""``fol-vpr train``: fine-tune FoL on places of K images with the paper's losses.

Per epoch: P places x K images per step, AdamW (the paper's lr 6e-5, weight decay 9.5e-9) with a
linear decay of the learning rate to 0.1x, optional gradient accumulation and (on CUDA) mixed
precision; then validation recalls (:func:`validation_recalls`), and the epoch's files in the
output folder (:mod:`.run_folder`: ``best.pth`` by R@5, the loss log and plot, ``last.pth`` for
``--resume``), each written atomically after a check that the disk has room for it.

The rooms of training: :class:`fol_plugin.config.TrainConfig` (what a run is), :mod:`.run_folder` (its output folder and
resume checks), :mod:`.log` (what it tells), :mod:`.stopping` (best epoch, early stopping),
:mod:`.sharding` (batches over processes), :mod:`.losses`; this module runs the epochs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import load_dinov2_weights, load_model, read_checkpoint, resolve_device, save_weights
from ..data.datasets import ImageSet
from ..data.loader import worker_loader
from ..data.places import PlaceDataset, collate_places
from ..distributed import SINGLE_PROCESS, Processes
from ..evaluation.in_memory import recalls_in_memory
from ..features import ExtractionConfig
from ..files import ensure_room, json_safe, save_torch
from ..models import FoLModel
from ..models.fol import TrainingOutputs
from ..config import TrainConfig
from .log import describe_epoch, log_summary, write_log
from .losses import fol_loss
from .run_folder import BEST, check_resume_settings, check_run, checkpoint_writes, disk_full_advice, places_record
from .sharding import accumulation_divisors, gather_outputs, place_batches
from .stopping import EarlyStopping

logger = logging.getLogger(__name__)

VALIDATION_RECALLS = (1, 5, 10)
BEST_BY = 5  # the checkpoint kept as best.pth has the highest R@5 (re-ranked unless --val_rerank_topk 0)
RERANKED = "reranked_"  # prefix of the re-ranked recalls in the log


def trainable_parameters(model: FoLModel) -> list[torch.nn.Parameter]:
    """All but the frozen part of the ViT (embeddings and the blocks before the last N)."""
    vit = model.backbone.model
    frozen_blocks = vit.config.depth - model.backbone.num_trainable_blocks
    frozen = {id(p) for p in vit.patch_embed.parameters()}
    frozen |= {id(p) for block in vit.blocks[:frozen_blocks] for p in block.parameters()}
    frozen |= {id(vit.cls_token), id(vit.pos_embed), id(vit.mask_token)}
    return [p for p in model.parameters() if id(p) not in frozen]


def validation_recalls(
    model: FoLModel, database: ImageSet, queries: ImageSet, extraction: ExtractionConfig, rerank_topk: int = 0
) -> dict[str, float]:
    """Recalls (percent) of a labelled database / queries pair, by the evaluation's own in-memory
    stages: global retrieval (``R@N``) and, with ``rerank_topk``, FoL re-ranking of each query's
    first candidates (``reranked_R@N``)."""
    recalls = recalls_in_memory(model, database, queries, extraction, VALIDATION_RECALLS, rerank_topk)
    named = {f"R@{n}": value for n, value in recalls["global"].items()}
    named.update({f"{RERANKED}R@{n}": value for n, value in recalls.get("reranked", {}).items()})
    return named


class _TrainingForward(torch.nn.Module):
    """``model.forward_train`` as a module's forward, so that DistributedDataParallel wraps it."""

    def __init__(self, model: FoLModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> TrainingOutputs:
        return self.model.forward_train(images)


@dataclasses.dataclass
class _Run:
    """The state that goes on from epoch to epoch, and into ``last.pth``."""

    model: FoLModel
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stopping: EarlyStopping
    start_epoch: int = 0
    rows: list[dict] = dataclasses.field(default_factory=list)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _start(config: TrainConfig, device: torch.device, saved: dict | None, output_dir: Path) -> _Run:
    """The model, optimiser and schedule of a new run, or restored from ``last.pth`` (``saved``)."""
    _seed_everything(config.seed)
    model = load_model(config.backbone, config.weights, device, num_trainable_blocks=config.num_trainable_blocks)
    if config.dinov2_weights:
        load_dinov2_weights(model, config.dinov2_weights)
    trainable = trainable_parameters(model)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0, end_factor=config.lr_end_factor, total_iters=config.decay_iterations
    )
    run = _Run(model, trainable, optimizer, scheduler, EarlyStopping(config.patience if config.validation else 0))
    if not config.validation:
        logger.info("No validation set: best.pth keeps the epoch of the lowest mean training loss")
    if saved is None:
        return run
    model.load_state_dict(saved["model_state_dict"])
    optimizer.load_state_dict(saved["optimizer_state_dict"])
    scheduler.load_state_dict(saved["scheduler_state_dict"])
    run.start_epoch, run.rows = saved["epoch_num"] + 1, saved["log"]
    run.stopping.best, run.stopping.stale = saved["best_score"], saved.get("epochs_without_gain", 0)
    torch.set_rng_state(saved["rng_state"])
    if run.start_epoch < config.epochs:  # epochs count from 1 in the log, as in "Epoch 2/3"
        logger.info("Resuming %s after epoch %d: epoch %d of %d next", output_dir, run.start_epoch, run.start_epoch + 1,
                    config.epochs)  # fmt: skip
    else:
        logger.info("Resuming %s after epoch %d: all %d epochs are done; give a larger --epochs to train on",
                    output_dir, run.start_epoch, config.epochs)  # fmt: skip
    return run


def _train_epoch(
    config: TrainConfig,
    forward: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    processes: Processes,
    label: str,
) -> tuple[dict[str, float], int]:
    """One epoch of steps; returns the summed losses and the number of batches."""
    device = torch.device(processes.device)
    amp = scaler.is_enabled()
    sums: dict[str, float] = {}
    divisors = accumulation_divisors(len(loader), config.accumulation_steps)
    bar = tqdm(loader, desc=label, unit="batch", disable=not processes.is_main)
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


def _best_by(config: TrainConfig) -> str:
    """The validation recall that picks ``best.pth``."""
    return f"{RERANKED if config.validation_rerank_topk else ''}R@{BEST_BY}"


def _finish_epoch(config: TrainConfig, run: _Run, epoch: int, row: dict, last: Path, places: dict) -> None:
    """Rank 0 after an epoch: whether it is the best (minus the loss without validation), then
    ``best.pth``, the log and ``last.pth``."""
    output_dir = last.parent
    score = row.get(_best_by(config), -row["loss_total"])
    improved = run.stopping.update(score)
    advice = disk_full_advice(epoch)
    ensure_room(output_dir, checkpoint_writes(run.model, run.trainable, output_dir, improved), advice)
    if improved:
        save_weights(run.model, output_dir / BEST, advice)
    write_log(output_dir, run.rows, advice)
    checkpoint = {
        "model_state_dict": run.model.state_dict(),
        "optimizer_state_dict": run.optimizer.state_dict(),
        "scheduler_state_dict": run.scheduler.state_dict(),
        "epoch_num": epoch,
        "recalls": {name: value for name, value in row.items() if "R@" in name},
        "log": run.rows,
        "best_score": run.stopping.best,
        "epochs_without_gain": run.stopping.stale,
        "rng_state": torch.get_rng_state(),  # dropout draws continue as without the interruption
        "config": json_safe(config),
        "places": places,
    }
    save_torch(last, checkpoint, advice)


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
            (:data:`~fol_plugin.train.run_folder.RUN_SETTINGS`) and places; without it, an earlier
            run's files in ``output_dir`` are an error.
        processes: this process's place in a ``torchrun`` run (one process by default): each
            takes its share of every global batch, the losses see the whole batch, and rank 0
            validates and writes the checkpoints.
        overwrite: start a new run over an earlier one's files (they are removed first).

    Returns:
        {"epochs": per-epoch log rows, "best": path of the best checkpoint or None}.

    Raises:
        ResumeMismatchError: ``resume`` with settings that differ from the run's.
        DiskFullError: the disk lacks room for an epoch's files (checked before the first
            epoch and before each epoch's writes); what is on disk is unchanged.
    """
    output_dir = Path(config.output_dir)
    last = check_run(config, places, resume, overwrite, processes)
    places_seen = places_record(places)
    written_here = (
        "fol-vpr train wrote it, so it cannot be downloaded again: rerun with --overwrite instead of --resume to start "
        "the run afresh"
    )
    saved = read_checkpoint(last, "cpu", option="--resume", fix=written_here) if resume else None
    if saved is not None:
        check_resume_settings(config, places_seen, saved, last)
    device = torch.device(processes.device) if processes.distributed else resolve_device(config.device)
    processes = dataclasses.replace(processes, device=str(device))
    run = _start(config, device, saved, output_dir)
    del saved  # copied into the model and the optimiser: free its tensors
    forward: torch.nn.Module = _TrainingForward(run.model)
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
    scaler = torch.amp.GradScaler("cuda", enabled=config.mixed_precision and device.type == "cuda")
    for epoch in range(run.start_epoch, config.epochs):
        dataset.set_epoch(epoch)
        epoch_seed = config.seed * 1000 + epoch  # the place order and CEL's partners of this epoch
        batches = place_batches(
            len(places), config.places_per_batch, processes, epoch_seed if config.shuffle_each_epoch else None,
            drop_last=config.shuffle_each_epoch,
        )
        loader = worker_loader(dataset, config.num_workers, batch_sampler=batches, collate_fn=collate_places)
        if epoch == run.start_epoch and processes.is_main:
            log_summary(config, places, run.model, run.trainable, len(loader), device, processes.world_size)
            ensure_room(output_dir, checkpoint_writes(run.model, run.trainable, output_dir, True), disk_full_advice(epoch))
        run.model.train()
        sums, steps = _train_epoch(
            config, forward, loader, run.optimizer, run.scheduler, scaler, torch.Generator().manual_seed(epoch_seed),
            processes, f"Epoch {epoch + 1}/{config.epochs}",
        )  # fmt: skip
        row = {"epoch": epoch + 1, "steps": steps, "lr": run.scheduler.get_last_lr()[0]}
        row.update({f"loss_{name}": total / max(steps, 1) for name, total in sums.items()})
        run.rows.append(row)
        if processes.is_main:
            if config.validation:
                row.update(validation_recalls(run.model, *config.validation, extraction, config.validation_rerank_topk))
            logger.info("%s", describe_epoch(row, config.epochs))
            _finish_epoch(config, run, epoch, row, last, places_seen)
            if run.stopping.should_stop:
                logger.info("Stopping early: %s has not improved for %d epochs (--patience %d)", _best_by(config),
                            run.stopping.stale, config.patience)  # fmt: skip
        if processes.gather(processes.is_main and run.stopping.should_stop)[0]:
            break
    processes.barrier()
    return {"epochs": run.rows, "best": str(output_dir / BEST) if (output_dir / BEST).exists() else None}
