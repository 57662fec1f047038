"""Runs spread over processes with ``torchrun``: who this process is, which part of the work is
its own, and waiting for the others.

Owns the process group (:func:`start` / :meth:`Processes.stop`) and the split of work:
contiguous, block-aligned shards (:meth:`Processes.shard`), so that a process's batches are the
batches a single process would form and outputs do not depend on the number of processes.
Nothing here is global state: a :class:`Processes` is passed to what needs it, and the single
process of a plain run is ``Processes()``.

Under ``torchrun``, rank, world size and local rank come from its environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``); the backend is NCCL on CUDA and gloo on the CPU, and each process
uses ``cuda:LOCAL_RANK``. A process that fails ends the run: torchrun stops the others (they may
be waiting at a barrier) and reports the failed rank's error.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .options import DEFAULT_DIST_TIMEOUT_MIN

logger = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of a run.

    Attributes:
        rank: this process, in ``[0, world_size)``; rank 0 writes the run's outputs.
        world_size: the number of processes.
        local_rank: this process on its node (its GPU).
        device: where this process runs its model.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, count: int, block: int = 1) -> range:
        """This process's contiguous part of ``range(count)``. Parts start at multiples of
        ``block`` (a batch, a search chunk) and differ by at most one block."""
        blocks = -(-count // block)
        first = self.rank * blocks // self.world_size
        last = (self.rank + 1) * blocks // self.world_size
        return range(min(first * block, count), min(last * block, count))

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.distributed:
            if torch.device(self.device).type == "cuda":
                dist.barrier(device_ids=[torch.device(self.device).index])
            else:
                dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (picklable, small), in rank order, on every process."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the body on rank 0, then on the others (creating shared files, downloading)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def stop(self) -> None:
        """Leave the process group (after a last barrier)."""
        if self.distributed and dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()


SINGLE_PROCESS = Processes()  # a plain run


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets its variables)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def start(device: str, timeout_min: float = DEFAULT_DIST_TIMEOUT_MIN) -> Processes:
    """This process's :class:`Processes`; under torchrun with more than one process, also join
    the process group.

    Args:
        device: the asked device. Under torchrun, "cuda" becomes ``cuda:LOCAL_RANK``; a device
            with an index is refused when there is more than one process.
        timeout_min: minutes a barrier waits for the slowest process.
    """
    if not under_torchrun():
        return Processes(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    kind = torch.device(device)
    if kind.type == "cuda":
        if kind.index is not None and world_size > 1:
            raise ValueError(
                f"--device {device} under torchrun: give --device cuda and each process takes cuda:LOCAL_RANK"
            )
        device = f"cuda:{local_rank if kind.index is None else kind.index}"
        torch.cuda.set_device(torch.device(device))
    processes = Processes(rank, world_size, local_rank, device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if kind.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=timeout_min)
        )
        logger.debug("Process %d of %d (local rank %d) on %s", rank, world_size, local_rank, device)
    return processes
