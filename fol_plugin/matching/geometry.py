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
    """RANSAC on the matched keypoints, in the network's input frame.

    Keypoints are mapped to the network's frame first (divided by each side's ``scale``), where
    one local-grid cell is the same 3.5 px in every image, so the inliers do not depend on the
    frame the keypoints are given in (original image or network pixels).

    Args:
        model: "homography" or "fundamental".
        inlier_threshold: kornia's ``inl_th``, in network-input pixels (default: one cell).
        max_iterations: kornia's ``max_iter`` (each iteration scores a batch of hypotheses).
        seed: kornia's sampling seed: the same inputs and seed give the same inliers.

    Returns:
        The model [3, 3] mapping the keypoints' own frames (None with too few matches) and the
        inlier mask [K] bool.
    """
    if model not in GEOMETRIC_MODELS:
        raise ValueError(f"geometric model {model!r}; choose one of {GEOMETRIC_MODELS}")
    inliers = torch.zeros(len(matches), dtype=torch.bool, device=matches.indices.device)
    if len(matches) < MIN_MATCHES[model]:
        return None, inliers
    points0 = _in_network_pixels(features0, matches.indices[:, 0])
    points1 = _in_network_pixels(features1, matches.indices[:, 1])
    ransac = RANSAC(model, inl_th=inlier_threshold, max_iter=max_iterations, confidence=confidence, seed=seed)
    matrix, inliers = ransac(points0, points1)
    # Back to the keypoints' frames: x1 ~ H x0 in network pixels is S1^-1 H S0 in image pixels.
    to_network0, to_network1 = _to_network(features0, matrix), _to_network(features1, matrix)
    if model == "homography":
        matrix = torch.linalg.inv(to_network1) @ matrix @ to_network0
    else:  # x1^T F x0 = 0 in network pixels
        matrix = to_network1.T @ matrix @ to_network0
    return matrix, inliers.reshape(-1).bool()


def _in_network_pixels(features: LocalFeatures, indices: torch.Tensor) -> torch.Tensor:
    """[K, 2] keypoints of ``indices`` in the network's input frame."""
    keypoints = features.keypoints[indices].float()
    return keypoints / torch.tensor(features.scale, dtype=keypoints.dtype, device=keypoints.device)


def _to_network(features: LocalFeatures, like: torch.Tensor) -> torch.Tensor:
    """[3, 3] from the keypoints' frame to the network's: diag(1 / scale_x, 1 / scale_y, 1)."""
    diagonal = torch.tensor([1 / features.scale[0], 1 / features.scale[1], 1.0], dtype=like.dtype, device=like.device)
    return torch.diag(diagonal)
