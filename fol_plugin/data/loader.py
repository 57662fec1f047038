"""DataLoaders whose worker processes leave nothing behind when a run fails.

A worker that hands a batch to the main process passes file descriptors through a socket in a
``pymp-*`` folder of the temporary directory, which the worker removes when it exits normally,
but not when a failing run terminates it. The main process therefore creates that folder itself
before the workers start: they inherit and use it, and the main process removes it at exit,
whether the run succeeded, failed or was interrupted.
"""
from __future__ import annotations

import multiprocessing.util
from typing import Any

from torch.utils.data import DataLoader, Dataset


def worker_loader(dataset: Dataset, num_workers: int, **options: Any) -> DataLoader:
    """``DataLoader(dataset, num_workers=num_workers, **options)``, its workers' temporary folder
    owned by this process."""
    if num_workers:
        multiprocessing.util.get_temp_dir()
    return DataLoader(dataset, num_workers=num_workers, **options)
