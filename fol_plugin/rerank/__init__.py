"""Second stage: re-rank retrieved candidates by FoL's local mutual matching."""
from .mutual import MATCH_THRESHOLD, mutual_match_scores, mutual_matches

__all__ = ["MATCH_THRESHOLD", "mutual_match_scores", "mutual_matches"]
