"""Matching FoL's local features: kornia LAFs, one matcher interface, RANSAC, re-ranking scorers."""
from .features import LAF_SCALE, LocalFeatures, extract_local_features, to_lafs
from .geometry import GEOMETRIC_MODELS, verify
from .matchers import MATCHERS, Matches, match
from ..options import SCORERS
from .scorers import ScorerConfig, make_pair_scorer

__all__ = [
    "GEOMETRIC_MODELS",
    "LAF_SCALE",
    "MATCHERS",
    "SCORERS",
    "LocalFeatures",
    "Matches",
    "ScorerConfig",
    "extract_local_features",
    "make_pair_scorer",
    "match",
    "to_lafs",
    "verify",
]
