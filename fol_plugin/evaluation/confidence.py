"""FoL's confidence as a measured quantity, and adaptive re-ranking.

Each stage has a confidence in its top-1:

- global: minus the top-1's squared L2 distance (higher is surer);
- re-ranked: the top-1's FoL score (the number of counted mutual matches, or the chosen
  scorer's score).

Its average precision (AP, scikit-learn's ``average_precision_score``) is that of "the top-1 is
a positive" ranked by that confidence, as VPR-Bench reports it: 1 when every right top-1 is
surer than every wrong one. It is undefined when every or no top-1 is right, and the record
says so instead of giving a number.

Adaptive re-ranking re-ranks the least confident queries (by global confidence) first:
``--rerank_fraction F`` re-ranks the ``round(F x Q)`` queries (halves up) of lowest global
confidence, equal confidences in query order, and keeps the global order of the others. From a
run's own outputs, :func:`adaptive_curve` gives the re-ranked R@1 for every such fraction.

:func:`assess` builds what a run records: ``confidence`` and ``rerank_selection`` in
``recalls.json`` (per query set), the curves' points in ``<set>/confidence.json``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .config import QuerySet

CONFIDENCE_FILE = "confidence.json"
STAGES = ("global", "reranked")
ALL_RIGHT = "every top-1 is right"
NONE_RIGHT = "no top-1 is right"
NO_DISTANCES = "no global distances (predictions given without descriptors)"
NO_RERANKING = "no re-ranking"
NONE_RERANKED = "no query was re-ranked"
DIGITS = 6  # significant digits kept of the recorded APs, thresholds and curves' points


def global_confidence(distances: np.ndarray) -> np.ndarray:
    """[Q] float64: minus each query's top-1 squared L2 distance (``distances`` [Q, K], ascending)."""
    return -np.asarray(distances, dtype=np.float64)[:, 0]


def reranked_confidence(scores: np.ndarray) -> np.ndarray:
    """[Q] float64: the score of each query's re-ranked top-1, its candidates' best (``scores``
    [Q, k] in the global order); NaN for a query that was not re-ranked (a NaN row)."""
    return np.asarray(scores, dtype=np.float64).max(axis=1)


def num_reranked(num_queries: int, fraction: float) -> int:
    """How many of ``num_queries`` queries ``--rerank_fraction fraction`` re-ranks: the nearest
    whole number to ``fraction x num_queries``, halves up."""
    return min(num_queries, math.floor(fraction * num_queries + 0.5))


def rerank_order(confidence: np.ndarray) -> np.ndarray:
    """[Q] query indices, least confident first; equal confidences in query order."""
    return np.lexsort((np.arange(len(confidence)), confidence))


def select_queries(confidence: np.ndarray, fraction: float) -> np.ndarray:
    """The queries ``--rerank_fraction fraction`` re-ranks: the first :func:`num_reranked` of
    :func:`rerank_order`, as sorted int64 indices."""
    return np.sort(rerank_order(confidence)[: num_reranked(len(confidence), fraction)]).astype(np.int64)


def top1_correct(predictions: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """[Q] bool: whether each query's first prediction (``predictions`` [Q, K]) is a positive."""
    return np.array([np.isin(row[0], query_positives) for row, query_positives in zip(predictions, positives)], bool)


def undefined_reason(correct: np.ndarray) -> str | None:
    """Why the AP of ``correct`` [Q] bool is undefined (every or no top-1 right), or None."""
    if correct.all():
        return ALL_RIGHT
    if not correct.any():
        return NONE_RIGHT
    return None


def average_precision(correct: np.ndarray, confidence: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score`` of ``correct`` [Q] bool ranked by ``confidence``
    [Q] (defined only when some but not all are right: see :func:`undefined_reason`)."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(correct, confidence))


def precision_recall(correct: np.ndarray, confidence: np.ndarray) -> dict[str, list[float]]:
    """scikit-learn's precision-recall curve of ``correct`` [Q] ranked by ``confidence`` [Q]:
    ``precision`` and ``recall`` [P + 1] (recall decreasing to 0), ``thresholds`` [P]."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(correct, confidence)
    return {name: _rounded(values) for name, values in (("precision", precision), ("recall", recall),
                                                       ("thresholds", thresholds))}  # fmt: skip


def adaptive_curve(
    confidence: np.ndarray, global_correct: np.ndarray, reranked_correct: np.ndarray, num_done: int
) -> dict[str, list[float]]:
    """Re-ranked R@1 against the fraction of queries re-ranked, least confident first.

    Args:
        confidence: [Q] global confidence.
        global_correct, reranked_correct: [Q] bool, top-1 right before and after re-ranking.
        num_done: how many queries the run re-ranked, the first of :func:`rerank_order` (Q, or
            fewer with ``--rerank_fraction``): the curve goes that far.

    Returns:
        ``fraction`` [num_done + 1] (0 to num_done / Q) and ``R@1`` [num_done + 1] in percent.
    """
    order = rerank_order(confidence)[:num_done]
    gained = np.concatenate([[0], np.cumsum(reranked_correct[order].astype(np.int64) - global_correct[order])])
    recall = 100 * (global_correct.sum() + gained) / len(confidence)
    return {"fraction": _rounded(np.arange(num_done + 1) / len(confidence)), "R@1": _rounded(recall)}


def _significant(value: float) -> float:
    return float(f"{value:.{DIGITS}g}")


def _rounded(values: np.ndarray) -> list[float]:
    return [_significant(value) for value in values]


def stage_ap(confidence: dict | None, stage: str) -> tuple[float | None, str | None]:
    """(AP, why it is undefined) of ``stage`` from a query set's ``confidence`` record; (None,
    None) without one (no labels)."""
    if confidence is None:
        return None, None
    return confidence.get(f"{stage}_ap"), confidence.get("undefined", {}).get(f"{stage}_ap")


def ap_text(value: float | None, undefined: str | None) -> str:
    """An AP as tables show it: 3 decimals, else why it is undefined, else "–" (no labels)."""
    if value is not None:
        return f"{value:.3f}"
    return undefined or "–"


def selection_record(query_set: QuerySet, fraction: float) -> dict:
    """``rerank_selection`` of a query set re-ranked with ``--rerank_fraction`` below 1: the
    fraction, how many queries were re-ranked, the global confidence at or below which they were
    (None when none was), and which."""
    selected = query_set.selected
    threshold = None
    if len(selected):
        threshold = _significant(global_confidence(query_set.global_distances)[selected].max())
    return {
        "fraction": fraction, "num_reranked": len(selected), "confidence_threshold": threshold,
        "queries": selected.tolist(),
    }  # fmt: skip


def assess(query_set: QuerySet) -> tuple[dict | None, dict | None]:
    """A labelled query set's confidence: (``confidence`` for ``recalls.json``, the points for
    ``confidence.json``); (None, None) without labels.

    ``confidence`` holds ``global_ap`` and ``reranked_ap`` (None where undefined, with the reason
    under ``undefined``); the re-ranked AP counts the queries that were re-ranked. The points
    hold each stage's precision-recall curve (None where its AP is undefined) and the
    ``adaptive`` curve (None without global distances or re-ranking).
    """
    if query_set.positives is None:
        return None, None
    global_correct = top1_correct(query_set.global_predictions, query_set.positives)
    done = np.arange(len(global_correct)) if query_set.selected is None else query_set.selected
    stages: dict[str, tuple[np.ndarray, np.ndarray] | str] = {}
    if query_set.global_distances is None:
        stages["global"] = NO_DISTANCES
    else:
        stages["global"] = (global_correct, global_confidence(query_set.global_distances))
    reranked_correct = None
    if query_set.reranked is None:
        stages["reranked"] = NO_RERANKING
    else:
        reranked_correct = top1_correct(query_set.reranked, query_set.positives)
        stages["reranked"] = (reranked_correct[done], reranked_confidence(query_set.scores)[done])
        if not len(done):
            stages["reranked"] = NONE_RERANKED
    summary: dict = {}
    points: dict = {}
    undefined = {}
    for stage, given in stages.items():
        reason = given if isinstance(given, str) else undefined_reason(given[0])
        summary[f"{stage}_ap"] = None if reason else _significant(average_precision(*given))
        points[stage] = None if reason else precision_recall(*given)
        if reason:
            undefined[f"{stage}_ap"] = reason
    if undefined:
        summary["undefined"] = undefined
    points["adaptive"] = None
    if reranked_correct is not None and query_set.global_distances is not None:
        points["adaptive"] = adaptive_curve(
            global_confidence(query_set.global_distances), global_correct, reranked_correct, len(done)
        )
    return summary, points
