"""Second stage: re-rank retrieved candidates by FoL's local mutual matching."""
from .engine import mutual_match_scores
from .mutual import MATCH_THRESHOLD, batched_match_scores, mutual_matches, reference_match_scores
from .rerank import DEFAULT_TOP_K, order_by_scores, rerank, score_candidates

__all__ = [
    "DEFAULT_TOP_K",
    "MATCH_THRESHOLD",
    "batched_match_scores",
    "mutual_match_scores",
    "mutual_matches",
    "order_by_scores",
    "reference_match_scores",
    "rerank",
    "score_candidates",
]
