"""The original demo's figure: FoL's selected regions on a query and a database image, and their
local matches before and after RANSAC (``fol-vpr visualize``)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import kornia
import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from .data import load_image, preprocess
from .matching import LocalFeatures, match, verify
from .models import FoLModel

PANEL_INCHES = 5.0
REGION_ALPHA = 0.45
MATCH_COLOUR = "gold"
INLIER_COLOUR = "lime"
LINE_WIDTH = 0.6
GAP = 10  # pixels between the two images of a match panel


@dataclass
class PairResult:
    """What the figure shows, for scripts: matches, RANSAC inliers and the model."""

    features: tuple[LocalFeatures, LocalFeatures]
    matches: torch.Tensor  # [K, 2]
    inliers: torch.Tensor  # [K] bool
    model: torch.Tensor | None  # [3, 3]


@torch.inference_mode()
def match_pair(
    model: FoLModel,
    paths: tuple[str | os.PathLike, str | os.PathLike],
    image_size: tuple[int, int] = (322, 322),
    resize_mode: str = "original",
    matcher: str = "fol",
    ransac_model: str = "homography",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, PairResult]:
    """Extract, match and verify two images.

    Returns:
        the two images resized to ``image_size`` [2, 3, H, W] in [0, 1] (keypoints are in their
        pixels), the selection scores [2, h, w], and the :class:`PairResult`.
    """
    raw = [load_image(path) for path in paths]
    shown = torch.cat([kornia.geometry.transform.resize(image[None], image_size, antialias=True) for image in raw]).clamp(0, 1)
    device = next(model.parameters()).device
    inputs = torch.cat([preprocess(image, image_size, resize_mode) for image in raw]).to(device)
    features = model.extract(inputs)
    local = tuple(LocalFeatures(k.cpu(), d.cpu()) for k, d in zip(features.keypoints, features.local_descriptors))
    matches = match(local[0], local[1], matcher)
    homography, inliers = verify(local[0], local[1], matches, ransac_model, seed=seed)
    return shown, features.region_scores.cpu(), PairResult(local, matches.indices, inliers, homography)


def draw_pair(
    images: torch.Tensor, region_scores: torch.Tensor, result: PairResult, names: tuple[str, str], ransac_model: str
) -> Figure:
    """Three rows: selected regions on both images, all matches, and the RANSAC inliers."""
    height, width = images.shape[-2:]
    pictures = [image.permute(1, 2, 0).numpy() for image in images]
    figure = Figure(figsize=(2 * PANEL_INCHES, 3 * PANEL_INCHES * height / width + 1.2))
    grid = figure.add_gridspec(3, 2)
    for column, (picture, scores, name) in enumerate(zip(pictures, region_scores, names)):
        axis = figure.add_subplot(grid[0, column])
        axis.imshow(picture)
        heat = kornia.geometry.transform.resize(scores[None, None], (height, width), interpolation="nearest")[0, 0]
        axis.imshow(heat.numpy(), cmap="jet", alpha=REGION_ALPHA, extent=(0, width, height, 0))
        keypoints = result.features[column].keypoints.numpy()
        axis.scatter(keypoints[:, 0], keypoints[:, 1], s=0.3, c="white", alpha=0.5)
        axis.set_title(f"{name}: {len(keypoints)} local features in the selected regions", fontsize=9)
        axis.set_axis_off()
    side_by_side = np.concatenate([pictures[0], np.ones((height, GAP, 3)), pictures[1]], axis=1)
    kept = result.inliers
    rows = (
        (result.matches, MATCH_COLOUR, f"{len(result.matches)} matches"),
        (result.matches[kept], INLIER_COLOUR, f"{int(kept.sum())} inliers after RANSAC ({ransac_model})"),
    )
    for row, (pairs, colour, title) in enumerate(rows, start=1):
        axis = figure.add_subplot(grid[row, :])
        axis.imshow(side_by_side)
        start = result.features[0].keypoints[pairs[:, 0]].numpy()
        end = result.features[1].keypoints[pairs[:, 1]].numpy() + np.array([width + GAP, 0])
        axis.add_collection(LineCollection(np.stack([start, end], axis=1), colors=colour, linewidths=LINE_WIDTH))
        axis.set_title(title, fontsize=10)
        axis.set_axis_off()
    figure.suptitle(f"FoL: {len(result.matches)} matches, {int(kept.sum())} RANSAC inliers", fontsize=11)
    figure.tight_layout()
    return figure
