"""Re-ranking global retrieval results by FoL's local matching scores."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from ..options import DEFAULT_TOP_K
from .engine import mutual_match_scores
from .mutual import MATCH_THRESHOLD


class FeatureSource(Protocol):
    """Local descriptors by image id: a LocalFeatureStore, a list or a dict of tensors."""

    def __getitem__(self, image_id: int) -> torch.Tensor:
        """[N, D] L2-normalised local descriptors."""


def score_candidates(
    global_predictions: np.ndarray,
    query_features: FeatureSource,
    database_features: FeatureSource,
    top_k: int = DEFAULT_TOP_K,
    threshold: float = MATCH_THRESHOLD,
    device: str | torch.device = "cpu",
    queries: Sequence[int] | None = None,
    on_query_done: Callable[[int, np.ndarray], None] | None = None,
    progress: bool = True,
    pair_scorer: Callable[[int, int], float] | None = None,
) -> np.ndarray:
    """FoL scores (or another scorer's) of each query's first ``top_k`` global candidates.

    Args:
        global_predictions: [Q, K] database ids, best first.
        query_features: ``query_features[q]`` -> [n, 128] local descriptors of query q.
        database_features: ``database_features[i]`` -> [m, 128] of database image i.
        top_k: candidates re-ranked per query (at most K).
        device: where matching runs ("cuda" uses the plain float32 algorithm there).
        queries: the queries to score (all by default); the other rows of the result stay 0.
        on_query_done: called as ``on_query_done(q, scores)`` after each query (to commit it).
        pair_scorer: instead of FoL's score, ``pair_scorer(q, database_id)``, higher is better
            (e.g. RANSAC inliers, :mod:`fol_plugin.matching.scorers`).

    Returns:
        [Q, top_k] float32 scores (the number of counted mutual matches).
    """
    global_predictions = np.asarray(global_predictions)
    top_k = min(top_k, global_predictions.shape[1])
    out = np.zeros((len(global_predictions), top_k), np.float32)
    queries = range(len(global_predictions)) if queries is None else queries
    for q in tqdm(queries, desc="Re-ranking", unit="query", disable=not progress or not len(queries)):
        if pair_scorer is not None:
            out[q] = [pair_scorer(q, int(i)) for i in global_predictions[q, :top_k]]
        else:
            query = query_features[q].to(device)
            candidates = [database_features[int(i)].to(device) for i in global_predictions[q, :top_k]]
            out[q] = mutual_match_scores(query, candidates, threshold).cpu().numpy()
        if on_query_done is not None:
            on_query_done(q, out[q])
    return out


def order_by_scores(global_predictions: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Re-rank the first ``scores.shape[1]`` predictions of each query by descending score;
    equal scores keep the global order (stable), and later predictions stay where they were.

    Args:
        global_predictions: [Q, K] database ids.
        scores: [Q, k] with k <= K.

    Returns:
        [Q, K] database ids.
    """
    global_predictions = np.asarray(global_predictions)
    top_k = scores.shape[1]
    order = np.argsort(-scores, axis=1, kind="stable")
    reranked = global_predictions.copy()
    reranked[:, :top_k] = np.take_along_axis(global_predictions[:, :top_k], order, axis=1)
    return reranked


def rerank(
    global_predictions: np.ndarray,
    query_features: FeatureSource,
    database_store: FeatureSource,
    top_k: int = DEFAULT_TOP_K,
    threshold: float = MATCH_THRESHOLD,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Re-rank global predictions [Q, K] with FoL's local matching -> [Q, K] database ids.

    The first ``top_k`` candidates of each query are ordered by their FoL score (equal scores
    keep the global order); the rest keep their global order.
    """
    scores = score_candidates(
        global_predictions, query_features, database_store, top_k, threshold, device, progress=progress
    )
    return order_by_scores(global_predictions, scores)
