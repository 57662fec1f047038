"""The output folder of a fine-tuning run: what an earlier run left there, whether a new run or
``--resume`` may start, and the room its checkpoints need.

A run writes ``best.pth`` (the weights of its best epoch, in the original format), the loss log
``losses.csv`` and plot ``losses.png``, then ``last.pth`` (weights, optimiser, schedule, log, the
settings and the places), each atomically. ``last.pth`` comes last: once it is there, its epoch is
finished. A new run refuses a folder holding an earlier run's files unless told to overwrite
them; ``--resume`` refuses settings (:data:`RUN_SETTINGS`) or places that
differ from the run's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..distributed import Processes
from ..errors import UserError
from ..files import MB, json_safe
from ..config import RECIPES, TrainConfig
from ..flags import FLAG
from .sharding import place_batches

LAST, BEST, LOG, PLOT = "last.pth", "best.pth", "losses.csv", "losses.png"
RUN_FILES = (LAST, BEST, LOG, PLOT)  # what a run writes; --overwrite removes them first
CHECKPOINT_PATTERN = "*.pth"  # any checkpoint in an output folder marks an earlier run
ADAMW_MOMENTS = 2  # AdamW keeps two moments per trainable weight in last.pth
CHECKPOINT_MARGIN_BYTES = 16 * MB  # beside the tensors: pickle headers, the config, the log, the RNG state
LOG_FILE_BYTES = 1 * MB  # losses.csv and losses.png are each smaller
# The settings of a run that --resume must find unchanged (TrainConfig fields). The others may
# change: --epochs (more to go on), --device, --num_workers, the validation (its folders,
# --val_image_size, --val_rerank_topk, --patience) and the folder's place (output_dir). The
# training places are compared too (see :func:`places_record`).
RUN_SETTINGS = (
    "backbone", "weights", "dinov2_weights", "num_trainable_blocks", "image_size", "places_per_batch",
    "images_per_place", "accumulation_steps", "lr", "weight_decay", "lr_end_factor", "decay_iterations", "seed",
    "augment", "normalize_images", "random_images", "shuffle_each_epoch", "resize_mode", "mixed_precision",
    "loss_weights",
)  # fmt: skip
PLACES_FLAGS = "--dataset, --data_root, --cities"


class ResumeMismatchError(UserError, ValueError):
    """``--resume`` with settings that differ from those of the run it would continue."""


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes of the elements of ``tensors``."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def checkpoint_writes(
    model: torch.nn.Module, trainable: Sequence[torch.nn.Parameter], output_dir: Path, improved: bool
) -> list[tuple[Path, float]]:
    """The files an epoch writes, in order, with their estimated bytes: ``best.pth`` (when the
    epoch is the best), the loss log and plot, then ``last.pth`` (the weights, AdamW's moments of
    the trainable ones, and the rest). ``last.pth`` is written last: once it is there, the epoch
    is finished."""
    weights = _tensor_bytes(model.state_dict().values())
    moments = ADAMW_MOMENTS * _tensor_bytes(trainable)
    best = [(output_dir / BEST, weights + CHECKPOINT_MARGIN_BYTES)] if improved else []
    logs = [(output_dir / LOG, LOG_FILE_BYTES), (output_dir / PLOT, LOG_FILE_BYTES)]
    return best + logs + [(output_dir / LAST, weights + moments + CHECKPOINT_MARGIN_BYTES)]


def disk_full_advice(saved_epochs: int) -> str:
    """What to do when the disk fills up with ``saved_epochs`` epochs in ``last.pth``."""
    if saved_epochs:
        return f"rerun with --resume to continue after epoch {saved_epochs}, the last one saved"
    return "rerun the same command with --overwrite (no epoch was saved)"


def places_record(places: Sequence[Sequence[Path]]) -> dict[str, object]:
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


def _setting(name: str) -> str:
    """How the user sets a :class:`~fol_plugin.config.TrainConfig` field: its flag, the recipe
    that sets it, or (where nothing does) its name."""
    field = next(field for field in dataclasses.fields(TrainConfig) if field.name == name)
    if FLAG in field.metadata:
        return f"--{field.metadata[FLAG]['flag'] or name}"
    return f"--recipe ({name})" if any(name in recipe for recipe in RECIPES.values()) else name


def check_resume_settings(config: TrainConfig, places: dict, checkpoint: dict, last: Path) -> None:
    """Refuse to resume the run of ``last`` (its ``checkpoint``) with settings of ``config`` or
    training ``places`` (a :func:`places_record`) that differ from the run's own.

    Raises:
        ResumeMismatchError: naming each difference, run's value -> this command's.
    """
    saved, current = checkpoint.get("config", {}), json_safe(config)
    differences = [
        f"{_setting(name)} {_shown(saved[name])} -> {_shown(current[name])}"
        for name in RUN_SETTINGS
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


def earlier_run_files(output_dir: Path) -> list[str]:
    """The names of an earlier run's files in ``output_dir``: its checkpoints, loss log and plot."""
    if not output_dir.is_dir():
        return []
    return sorted({path.name for path in output_dir.glob(CHECKPOINT_PATTERN)} | {
        name for name in RUN_FILES if (output_dir / name).exists()
    })


def check_run(
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
