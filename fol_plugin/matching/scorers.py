"""Re-ranking scorers built from a matcher and optional RANSAC: ``fol`` (FoL's own score),
``<matcher>`` (the number of matches) and ``<matcher>+ransac`` (the number of RANSAC inliers)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..options import RANSAC_SUFFIX, SCORERS
from .features import LocalFeatures
from .geometry import DEFAULT_INLIER_THRESHOLD, DEFAULT_SEED, verify
from .matchers import match


@dataclass
class ScorerConfig:
    """A re-ranking scorer.

    Attributes:
        name: one of :data:`SCORERS`; "fol" is FoL's own score (the fast exact engine).
        ransac_model: "homography" or "fundamental", for ``+ransac`` scorers.
        inlier_threshold: RANSAC inlier threshold in pixels of the network input.
        seed: RANSAC seed.
    """

    name: str = "fol"
    ransac_model: str = "homography"
    inlier_threshold: float = DEFAULT_INLIER_THRESHOLD
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.name not in SCORERS:
            raise ValueError(f"re-ranking scorer {self.name!r}; choose one of {', '.join(SCORERS)}")

    @property
    def matcher(self) -> str:
        return self.name.removesuffix(RANSAC_SUFFIX)

    @property
    def uses_ransac(self) -> bool:
        return self.name.endswith(RANSAC_SUFFIX)


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
