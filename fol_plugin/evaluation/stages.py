"""The stages of ``fol-vpr eval`` / ``rerank``, each spread over the run's processes.

Every stage takes the :class:`~fol_plugin.distributed.Processes` of the run and gives each
process a contiguous, batch-aligned part of its work, so that every process forms the batches a
single process would: the outputs do not depend on the number of processes. Shared files
(:class:`~fol_plugin.features.ResumableArray`, :class:`~fol_plugin.features.LocalFeatureStore`)
are created by rank 0 first; each process then writes its own rows or its own store files and
commit log, and a barrier ends every stage before anyone reads what the others wrote.

- query features and database global descriptors: images split across processes;
- global search: the database descriptors split at search-chunk boundaries, each process
  searching its part for all queries, the partial top-k merged exactly (equal distances to the
  lower index), as one process searching chunk by chunk;
- candidates' local features: the missing ids split across processes, once every process has
  indexed the same entries of the store (between two barriers, while nobody writes);
- re-ranking: queries split across processes (only those selected by ``--rerank_fraction``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import numpy as np

from ..distributed import Processes
from ..features import InMemoryFeatures, LocalFeatureStore, ResumableArray, RowFile, extract_global, extract_local
from ..features.extract import FeatureStore
from ..matching import LocalFeatures, make_pair_scorer
from ..models import GLOBAL_DIM, LOCAL_DIM, FoLModel
from ..rerank import order_by_scores, score_candidates
from ..retrieval import exact_search, merge_top_k
from .config import EvalConfig, QuerySet

logger = logging.getLogger(__name__)


def open_array(
    processes: Processes, path: Path, shape: tuple[int, int], block: int, dtype: str = "float32"
) -> ResumableArray:
    """A resumable array of the run, this process responsible for its part of the rows."""
    with processes.main_first():
        array = ResumableArray(path, shape, dtype, rows=processes.shard(shape[0], block), writer=processes.rank)
    return array


def open_local(config: EvalConfig, processes: Processes, folder: Path, num_ids: int) -> FeatureStore:
    """The local features of one image list: in RAM, or in a store named by its precision, with
    this process as one of its writers. Every process has indexed the store when this returns."""
    if config.in_memory:
        return InMemoryFeatures()
    folder = folder.with_name(f"{folder.name}_{config.store_dtype}")
    with processes.main_first():
        store = LocalFeatureStore(folder, num_ids, LOCAL_DIM, config.store_dtype, writer=processes.rank)
    processes.barrier()  # nobody adds before everybody has indexed: every process sees the same missing ids
    return store


def finish(processes: Processes, local: FeatureStore | None) -> None:
    """End a stage: wait for every process, then index what the others stored."""
    processes.barrier()
    if isinstance(local, LocalFeatureStore):
        local.refresh()


def extract_global_part(
    config: EvalConfig,
    processes: Processes,
    model: FoLModel,
    paths: list[str],
    path: Path,
    local: FeatureStore | None,
    label: str,
    dtype: str = "float32",
) -> ResumableArray:
    """Global descriptors [N, 8448] of ``paths`` into the array ``path`` (and, with ``local``,
    their local features), each process extracting its part; returns the whole array."""
    array = open_array(processes, path, (len(paths), GLOBAL_DIM), config.extraction.batch_size, dtype)
    extract_global(model, paths, array, config.extraction, local, label=label)
    finish(processes, local)
    return array


def extract_local_part(
    config: EvalConfig,
    processes: Processes,
    model: FoLModel,
    paths: list[str],
    image_ids: np.ndarray,
    local: FeatureStore,
    label: str,
) -> None:
    """Local features of the ``image_ids`` missing from ``local``, each process extracting its part."""
    finish(processes, local)  # every process indexes the same entries: nobody writes until the next barrier
    processes.barrier()
    missing = local.missing(np.asarray(image_ids, dtype=np.int64))
    part = processes.shard(len(missing), config.extraction.batch_size)
    mine = missing[part.start : part.stop]
    extract_local(model, paths, mine, local, config.extraction, label=label)
    finish(processes, local)


def search(
    config: EvalConfig, processes: Processes, database: Path, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (squared L2 distances [Q, k], database ids [Q, k]) of every query against
    the database descriptors in the .npy file ``database``, each process reading and searching
    its chunks of it (one chunk in RAM at a time)."""
    rows = processes.shard(RowFile(database).shape[0], config.search_chunk_size)
    part = (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64))
    if len(rows):
        distances, indices = exact_search(
            RowFile(database, rows),
            queries,
            min(k, len(rows)),
            config.search_chunk_size,
            progress=config.extraction.progress,
        )
        part = (distances, indices + rows.start)
    parts = processes.gather(part)
    return merge_top_k([d for d, _ in parts], [i for _, i in parts], k)


def rerank(
    config: EvalConfig,
    processes: Processes,
    cache: Path,
    query_set: QuerySet,
    query_local: FeatureStore,
    database_local: FeatureStore,
) -> None:
    """FoL scores of each query's candidates (or another scorer's), queries split across the
    processes; sets ``query_set.scores`` and ``query_set.reranked`` on every process. Only the
    queries of ``query_set.selected`` (all when None) are scored: the others keep their global
    order and NaN scores. Scores are cached per query, so a rerun with another selection reuses
    those computed."""
    top_k = min(config.rerank_topk, query_set.global_predictions.shape[1])
    local_dtype = "float32" if config.in_memory else config.store_dtype
    # Scores already computed are reused only for the same candidates, scorer and features.
    candidates = hashlib.sha1(np.ascontiguousarray(query_set.global_predictions[:, :top_k]).tobytes()).hexdigest()[:16]
    scorer = config.scorer
    method = (
        "exact"
        if scorer.name == "fol"
        else f"{scorer.name}_{scorer.ransac_model}_{scorer.inlier_threshold}_{scorer.seed}"
    )
    path = cache / query_set.key / f"rerank_scores_{method}_{local_dtype}_{candidates}.npy"
    scores = open_array(processes, path, (len(query_set.images), top_k), 1)
    pair_scorer = None
    if scorer.name != "fol":
        score_pair = make_pair_scorer(scorer)

        @functools.lru_cache(maxsize=1)  # one query at a time, against its top-k candidates
        def query_features(q: int) -> LocalFeatures:
            return LocalFeatures(query_local.keypoints(q), query_local[q])

        def pair_scorer(q: int, i: int) -> float:
            return score_pair(query_features(q), LocalFeatures(database_local.keypoints(i), database_local[i]))

    selected = np.arange(len(query_set.images)) if query_set.selected is None else query_set.selected
    chosen = set(selected.tolist())
    score_candidates(
        query_set.global_predictions,
        query_local,
        database_local,
        top_k,
        device=config.extraction.device,
        queries=[q for rows in scores.todo() for q in rows if q in chosen],
        on_query_done=lambda q, row: scores.write(q, row[None]),
        progress=config.extraction.progress,
        pair_scorer=pair_scorer,
    )
    processes.barrier()
    query_set.scores = np.full(scores.shape, np.nan, scores.dtype)
    query_set.scores[selected] = scores.array[selected]
    query_set.reranked = query_set.global_predictions.copy()
    query_set.reranked[selected] = order_by_scores(query_set.global_predictions[selected], query_set.scores[selected])
