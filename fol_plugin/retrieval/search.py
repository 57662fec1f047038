"""First-stage retrieval: exact L2 nearest neighbours of the global descriptors (faiss)."""
from __future__ import annotations

import logging

import faiss
import numpy as np
from tqdm import tqdm

from ..options import DEFAULT_SEARCH_CHUNK

logger = logging.getLogger(__name__)



def exact_search(
    database: np.ndarray, queries: np.ndarray, k: int, chunk_size: int = DEFAULT_SEARCH_CHUNK, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest database descriptors of each query by L2 distance, as ``faiss.IndexFlatL2``.

    The database is searched ``chunk_size`` rows at a time (``faiss.knn``, which computes what
    ``IndexFlatL2.search`` does without copying the rows into an index) and the per-chunk results
    merged; equal distances keep the lower database index. RAM holds one chunk: give a
    :class:`~fol_plugin.features.RowFile` for a database larger than RAM (a memory map keeps
    every page it read resident).

    Args:
        database: [N, D] float32 or float16 rows, an array or a
            :class:`~fol_plugin.features.RowFile`; each chunk is searched in float32.
        queries: [Q, D] float32.
        k: predictions per query, at most N.

    Returns:
        distances [Q, k] float32 (squared L2, ascending) and indices [Q, k] int64.
    """
    num_database, dim = database.shape
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be [Q, {dim}] like the database, got {queries.shape}")
    if not 0 < k <= num_database:
        raise ValueError(f"k={k} must be between 1 and the database size {num_database}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_distances = np.full((len(queries), 0), np.inf, np.float32)
    best_indices = np.zeros((len(queries), 0), np.int64)
    starts = range(0, num_database, chunk_size)
    for start in tqdm(starts, desc="Global search", unit="chunk", disable=not progress or len(starts) == 1):
        chunk = np.ascontiguousarray(database[start : start + chunk_size], dtype=np.float32)
        distances, indices = faiss.knn(queries, chunk, min(k, len(chunk)))
        del chunk
        best_distances, best_indices = merge_top_k([best_distances, distances], [best_indices, indices + start], k)
    return best_distances, best_indices


def merge_top_k(
    distances: list[np.ndarray], indices: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of several partial results for the same queries: ascending distance, equal
    distances to the lower database index (so the merge order never matters).

    Args:
        distances: per part, [Q, k_i] float32.
        indices: per part, [Q, k_i] int64 database ids.

    Returns:
        distances [Q, k] and indices [Q, k].
    """
    distances, indices = np.concatenate(distances, axis=1), np.concatenate(indices, axis=1)
    order = np.lexsort((indices, distances), axis=1)[:, :k]
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(indices, order, axis=1)
