"""Second stage: re-rank retrieved candidates by FoL's local mutual matching."""
from .engine import PRECISIONS, mutual_match_scores
from .mutual import MATCH_THRESHOLD, mutual_matches, reference_match_scores

__all__ = ["MATCH_THRESHOLD", "PRECISIONS", "mutual_match_scores", "mutual_matches", "reference_match_scores"]
