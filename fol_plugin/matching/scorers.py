"""Re-ranking scorers built from a matcher and optional RANSAC: ``fol`` (FoL's own score),
``<matcher>`` (the number of matches) and ``<matcher>+ransac`` (the number of RANSAC inliers)."""
from __future__ import annotations

from collections.abc import Callable

from ..config import ScorerConfig
from .features import LocalFeatures
from .geometry import verify
from .matchers import match


def make_pair_scorer(config: ScorerConfig) -> Callable[[LocalFeatures, LocalFeatures], float]:
    """score(query, candidate) -> higher is better: matches, or RANSAC inliers among them."""

    def score(query: LocalFeatures, candidate: LocalFeatures) -> float:
        matches = match(query, candidate, config.matcher)
        if not config.uses_ransac:
            return float(len(matches))
        _, inliers = verify(
            query, candidate, matches, config.ransac_model, config.inlier_threshold, seed=config.seed
        )
        return float(inliers.sum())

    return score
