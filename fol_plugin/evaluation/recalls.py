"""Recall@N: the share of queries with a positive among their first N predictions."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..options import DEFAULT_RECALL_VALUES


def compute_recalls(
    predictions: np.ndarray, positives: Sequence[np.ndarray], recall_values: Sequence[int] = DEFAULT_RECALL_VALUES
) -> dict[int, float]:
    """Recall@N in percent.

    Args:
        predictions: [Q, K] database indices, best first.
        positives: per query, the database indices that are correct.
        recall_values: the N of each recall@N; an N above K counts all K predictions, as
            VPR-methods-evaluation does when the database has fewer than N images.

    Returns:
        {N: recall@N in percent}.
    """
    predictions = np.asarray(predictions)
    if len(predictions) != len(positives):
        raise ValueError(f"{len(predictions)} prediction rows for {len(positives)} queries")
    hits = np.array([np.isin(row, query_positives) for row, query_positives in zip(predictions, positives)])
    if len(hits) == 0:
        return {n: 0.0 for n in recall_values}
    never = np.iinfo(np.int64).max
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), never)
    return {n: float((first_hit < n).mean() * 100) for n in recall_values}
