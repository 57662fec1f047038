"""Geometric verification of matches with kornia's RANSAC (seeded, deterministic)."""
from __future__ import annotations

import torch
from kornia.geometry.ransac import RANSAC

from ..options import GEOMETRIC_MODELS
from .features import LAF_SCALE, LocalFeatures
from .matchers import Matches

MIN_MATCHES = {"homography": 4, "fundamental": 8}
DEFAULT_INLIER_THRESHOLD = LAF_SCALE  # pixels: one local-grid cell
DEFAULT_SEED = 0


def verify(
    features0: LocalFeatures,
    features1: LocalFeatures,
    matches: Matches,
    model: str = "homography",
    inlier_threshold: float = DEFAULT_INLIER_THRESHOLD,
    max_iterations: int = 10,
    confidence: float = 0.99,
    seed: int = DEFAULT_SEED,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """RANSAC on the matched keypoints.

    Args:
        model: "homography" or "fundamental".
        inlier_threshold: kornia's ``inl_th``, in pixels of the keypoints.
        max_iterations: kornia's ``max_iter`` (each iteration scores a batch of hypotheses).
        seed: kornia's sampling seed: the same inputs and seed give the same inliers.

    Returns:
        The model [3, 3] (None with too few matches) and the inlier mask [K] bool.
    """
    if model not in GEOMETRIC_MODELS:
        raise ValueError(f"geometric model {model!r}; choose one of {GEOMETRIC_MODELS}")
    inliers = torch.zeros(len(matches), dtype=torch.bool, device=matches.indices.device)
    if len(matches) < MIN_MATCHES[model]:
        return None, inliers
    points0 = features0.keypoints[matches.indices[:, 0]].float()
    points1 = features1.keypoints[matches.indices[:, 1]].float()
    ransac = RANSAC(model, inl_th=inlier_threshold, max_iter=max_iterations, confidence=confidence, seed=seed)
    matrix, inliers = ransac(points0, points1)
    return matrix, inliers.reshape(-1).bool()
