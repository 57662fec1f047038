"""Training over the processes of a ``torchrun`` run, as one process on the same global batch.

Owns the split of each global batch of places (:func:`place_batches`: every process forms the
same global batches, then takes its contiguous share of each) and the gathering of the
processes' :class:`~fol_plugin.models.fol.TrainingOutputs` with their gradients
(:func:`gather_outputs`), so that the losses mine the whole global batch, as the original's
DataParallel does. Every process then computes the same loss; the gather's backward sums the
processes' identical gradients (W times each share's), and DistributedDataParallel's average over
the W processes gives back the single-process gradient. Also the accumulation groups of an
epoch's batches (:func:`accumulation_divisors`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed.nn.functional as distributed_functional
import torch.nn.functional as F

from ..distributed import Processes
from ..models.fol import TrainingOutputs


def place_batches(
    num_places: int, places_per_batch: int, processes: Processes, shuffle_seed: int | None, drop_last: bool
) -> list[list[int]]:
    """This process's share of each global batch of places, for one epoch.

    Args:
        shuffle_seed: a new order of the places from this seed, or None for their given order.
        drop_last: leave out a last global batch smaller than ``places_per_batch`` (one smaller
            than the number of processes is always left out: each process needs a place).

    Raises:
        ValueError: ``places_per_batch`` is not a multiple of the number of processes.
    """
    if places_per_batch % processes.world_size:
        raise ValueError(
            f"--places_per_batch {places_per_batch} must be a multiple of the {processes.world_size} processes, so "
            "that every process takes the same share of a batch"
        )
    order = list(range(num_places))
    if shuffle_seed is not None:
        order = torch.randperm(num_places, generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    batches = [order[start : start + places_per_batch] for start in range(0, num_places, places_per_batch)]
    if batches and len(batches[-1]) < (places_per_batch if drop_last else processes.world_size):
        batches.pop()  # dropped, or too small to give every process a place
    shares = [processes.shard(len(batch)) for batch in batches]  # contiguous, differing by at most one
    return [batch[share.start : share.stop] for batch, share in zip(batches, shares)]


def _counts(count: int, device: torch.device) -> list[int]:
    """Every process's ``count``, in rank order."""
    return torch.cat(distributed_functional.all_gather(torch.tensor([count], device=device))).tolist()


def _gather(tensor: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every process's ``tensor`` [counts[r], ...] concatenated in rank order, with gradients
    (padded to the largest count for the transfer)."""
    padded = F.pad(tensor.contiguous(), (0, 0) * (tensor.ndim - 1) + (0, max(counts) - len(tensor)))
    parts = distributed_functional.all_gather(padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def _gather_ragged(tensors: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    """Every process's list of [N_i, D] tensors, in rank order, with gradients (padded to the
    longest for the transfer)."""
    device = tensors[0].device
    lengths = torch.tensor([len(t) for t in tensors], device=device)
    longest = max(_counts(int(lengths.max()), device))
    padded = torch.stack([F.pad(t, (0, 0, 0, longest - len(t))) for t in tensors])
    gathered, gathered_lengths = _gather(padded, counts), _gather(lengths, counts)
    return [row[: int(length)] for row, length in zip(gathered, gathered_lengths)]


def gather_outputs(
    outputs: TrainingOutputs, labels: torch.Tensor, processes: Processes
) -> tuple[TrainingOutputs, torch.Tensor]:
    """The global batch's outputs [B, ...] and labels [B] on every process (unchanged for one)."""
    if not processes.distributed:
        return outputs, labels
    counts = _counts(len(labels), labels.device)
    fields = {}
    for field in dataclasses.fields(outputs):
        value = getattr(outputs, field.name)
        if isinstance(value, torch.Tensor):
            fields[field.name] = _gather(value, counts)
        elif field.name == "local_descriptors":
            fields[field.name] = _gather_ragged(value, counts)
        else:
            fields[field.name] = value
    return TrainingOutputs(**fields), _gather(labels, counts)


def accumulation_divisors(num_batches: int, accumulation_steps: int) -> list[int]:
    """Per batch, the size of its accumulation group: the loss of each batch is divided by it,
    so a last, partial group is the mean of its own batches (not a fraction of a full group)."""
    divisors = []
    for start in range(0, num_batches, accumulation_steps):
        size = min(accumulation_steps, num_batches - start)
        divisors += [size] * size
    return divisors
