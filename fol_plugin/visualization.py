"""FoL's figures: the original demo's (selected regions on a query and a database image, their
local matches before and after RANSAC; ``fol-vpr visualize``) and the prediction grids of a run
(``--num_preds_to_save``)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from tqdm import tqdm

from .data import load_image, preprocess
from .files import write_figure
from .data.datasets import utm_from_name
from .data.images import checked_network_size
from .matching import LocalFeatures, match, verify
from .matching.features import in_image_pixels
from .models import FoLModel
from .options import DEFAULT_IMAGE_SIZE, DEFAULT_MAX_IMAGE_PIXELS

PANEL_INCHES = 5.0
REGION_ALPHA = 0.45
REGION_COLOURS = "jet"
KEYPOINT_SIZE = 2.0
KEYPOINT_ALPHA = 0.9
LINE_COLOURS = "hsv"  # a colour per drawn match, so neighbouring lines can be told apart
GOLDEN_RATIO = 0.618034  # hue steps between consecutive lines
LINE_WIDTH = 0.9
MAX_LINES = 150  # match lines drawn per row at most
FONT_SIZE = 10
GAP = 10  # pixels between the two images of a match panel
# The prediction grids (--num_preds_to_save): a panel per image, framed when labelled.
CORRECT_COLOUR = "tab:green"
WRONG_COLOUR = "tab:red"
GRID_PANEL_INCHES = 3.0
TITLE_CHARS = 28
TITLE_FONT_SIZE = 11
FRAME_WIDTH = 5
GRID_DPI = 100
PAIR_DPI = 100  # fol-vpr visualize's figure


@dataclass
class PairResult:
    """What the figure shows, for scripts: matches, RANSAC inliers and the model."""

    features: tuple[LocalFeatures, LocalFeatures]  # keypoints in each original image's pixels
    matches: torch.Tensor  # [K, 2]
    inliers: torch.Tensor  # [K] bool
    model: torch.Tensor | None  # [3, 3], between the original images' pixels


@torch.inference_mode()
def match_pair(
    model: FoLModel,
    paths: tuple[str | os.PathLike, str | os.PathLike],
    image_size: tuple[int, int] | tuple[int] = DEFAULT_IMAGE_SIZE,
    resize_mode: str = "original",
    matcher: str = "fol",
    ransac_model: str = "homography",
    seed: int = 0,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[list[torch.Tensor], torch.Tensor, PairResult]:
    """Extract, match and verify two images, as :func:`fol_plugin.matching.extract_local_features`,
    :func:`~fol_plugin.matching.match` and :func:`~fol_plugin.matching.verify` do one by one
    (images of more than ``max_image_pixels`` are refused before decoding).

    Returns:
        the two original images [3, H_i, W_i] in [0, 1] (keypoints are in their pixels), the
        the two selection scores [h_i, w_i], and the :class:`PairResult`.
    """
    images = [load_image(path, max_image_pixels) for path in paths]
    device = next(model.parameters()).device
    sizes = [
        checked_network_size(path, image_size, *image.shape[-2:], max_image_pixels) for path, image in zip(paths, images)
    ]
    inputs = [preprocess(image, size, resize_mode).to(device) for image, size in zip(images, sizes)]
    if sizes[0] == sizes[1]:  # one batch of two
        batch = model.extract(torch.cat(inputs))
        keypoints, descriptors, regions = batch.keypoints, batch.local_descriptors, list(batch.region_scores.cpu())
    else:  # one shorter side (--image_size S), other aspect ratios: one image at a time
        single = [model.extract(image_input) for image_input in inputs]
        keypoints = [features.keypoints[0] for features in single]
        descriptors = [features.local_descriptors[0] for features in single]
        regions = [features.region_scores[0].cpu() for features in single]
    local = [
        in_image_pixels(points, vectors, tuple(image.shape[-2:]), size)
        for points, vectors, image, size in zip(keypoints, descriptors, images, sizes)
    ]
    matches = match(local[0], local[1], matcher)
    geometric_model, inliers = verify(local[0], local[1], matches, ransac_model, seed=seed)
    return images, regions, PairResult(tuple(local), matches.indices, inliers, geometric_model)


def draw_pair(
    images: list[torch.Tensor],
    region_scores: list[torch.Tensor],
    result: PairResult,
    names: tuple[str, str],
    ransac_model: str,
) -> Figure:
    """Three rows, each image at its own aspect ratio: the selection score of every patch (one
    colour scale for both images, rescaled to [0, 1] over the pair) and the local features of the
    selected regions; the matches; the RANSAC inliers. At most ``MAX_LINES`` lines a row, spread
    evenly over the matches and each in its own colour; the title counts the rest."""
    pictures = [image.permute(1, 2, 0).numpy() for image in images]
    side_by_side = _side_by_side(pictures)
    top_height = max(picture.shape[0] / picture.shape[1] for picture in pictures) * PANEL_INCHES
    pair_height = 2 * PANEL_INCHES * side_by_side.shape[0] / side_by_side.shape[1]
    figure = Figure(figsize=(2 * PANEL_INCHES + 1.0, top_height + 2 * pair_height + 2.0), layout="constrained")
    grid = figure.add_gridspec(3, 2, height_ratios=(top_height, pair_height, pair_height))
    low = min(float(scores.min()) for scores in region_scores)
    spread = max(float(scores.max()) for scores in region_scores) - low or 1.0
    region_axes = []
    for column, (picture, scores, name) in enumerate(zip(pictures, region_scores, names)):
        axis = figure.add_subplot(grid[0, column])
        height, width = picture.shape[:2]
        axis.imshow(picture)
        heat = axis.imshow(
            (scores.numpy() - low) / spread, cmap=REGION_COLOURS, alpha=REGION_ALPHA, vmin=0.0, vmax=1.0,
            extent=(0, width, height, 0), interpolation="nearest",
        )  # fmt: skip
        keypoints = result.features[column].keypoints.numpy()
        axis.scatter(keypoints[:, 0], keypoints[:, 1], s=KEYPOINT_SIZE, c="white", alpha=KEYPOINT_ALPHA, linewidths=0)
        axis.set_title(f"{name}\n{len(keypoints):,} local features in the selected regions", fontsize=FONT_SIZE)
        axis.set_axis_off()
        region_axes.append(axis)
    bar = figure.colorbar(heat, ax=region_axes, fraction=0.03, pad=0.02, ticks=(0.0, 0.5, 1.0))
    bar.set_label("selection score (0: the pair's lowest, 1: its highest)", fontsize=FONT_SIZE - 1)
    offset = np.array([pictures[0].shape[1] + GAP, 0])
    kept = result.inliers
    rows = (
        (result.matches, "matches"),
        (result.matches[kept], f"inliers after RANSAC ({ransac_model})"),
    )
    for row, (pairs, what) in enumerate(rows, start=1):
        axis = figure.add_subplot(grid[row, :])
        axis.imshow(side_by_side)
        drawn = pairs[evenly_spread(len(pairs), MAX_LINES)]
        start = result.features[0].keypoints[drawn[:, 0]].numpy()
        end = result.features[1].keypoints[drawn[:, 1]].numpy() + offset
        colours = colormaps[LINE_COLOURS](np.modf(np.arange(len(drawn)) * GOLDEN_RATIO)[0])  # neighbours differ
        axis.add_collection(LineCollection(np.stack([start, end], axis=1), colors=colours, linewidths=LINE_WIDTH))
        shown = f", {len(drawn)} drawn" if len(drawn) < len(pairs) else ""
        axis.set_title(f"{len(pairs):,} {what}{shown}", fontsize=FONT_SIZE + 1)
        axis.set_axis_off()
    figure.suptitle(f"FoL: {len(result.matches)} matches, {int(kept.sum())} RANSAC inliers", fontsize=FONT_SIZE + 2)
    return figure


def evenly_spread(count: int, most: int) -> np.ndarray:
    """Indices of at most ``most`` of ``count`` items, spread evenly (all of them when fewer)."""
    return np.unique(np.linspace(0, count - 1, min(count, most)).round().astype(np.int64)) if count else np.zeros(0, np.int64)


def _side_by_side(pictures: list[np.ndarray]) -> np.ndarray:
    """Two [H_i, W_i, 3] pictures on one white canvas, top-aligned, ``GAP`` pixels apart."""
    height = max(picture.shape[0] for picture in pictures)
    width = pictures[0].shape[1] + GAP + pictures[1].shape[1]
    canvas = np.ones((height, width, 3), dtype=pictures[0].dtype)
    canvas[: pictures[0].shape[0], : pictures[0].shape[1]] = pictures[0]
    canvas[: pictures[1].shape[0], pictures[0].shape[1] + GAP :] = pictures[1]
    return canvas


def save_prediction_grids(
    folder: Path,
    query_paths: Sequence[str],
    database_paths: Sequence[str],
    predictions: np.ndarray,
    positives: Sequence[np.ndarray] | None,
    title: str,
    scores: np.ndarray | None = None,
    distances: np.ndarray | None = None,
    queries: Sequence[int] | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> None:
    """``folder/{q:03d}.png``: the query then its predictions [Q, n], each titled by
    :func:`panel_labels` (``scores`` and ``distances`` [Q, n], NaN where there is none), framed
    green (positive) or red (not) when labelled.

    Args:
        queries: the queries to draw (all by default).
        max_image_pixels: images of more pixels are refused
            (:func:`fol_plugin.data.images.check_image_pixels`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    shown = range(len(predictions)) if queries is None else queries
    for q in tqdm(shown, desc=f"Figures ({title})", unit="query"):
        row = predictions[q]
        figure = Figure(figsize=(GRID_PANEL_INCHES * (len(row) + 1), GRID_PANEL_INCHES + 1.2), layout="constrained")
        axes = np.atleast_1d(figure.subplots(1, len(row) + 1))
        correct = [None if positives is None else bool(np.isin(i, positives[q])) for i in row]
        labels = panel_labels(
            query_paths[q], [database_paths[i] for i in row], None if scores is None else scores[q],
            None if distances is None else distances[q], correct,
        )  # fmt: skip
        for axis, path, label, frame in zip(axes, [query_paths[q], *(database_paths[i] for i in row)], labels, [None, *correct]):
            axis.imshow(load_image(path, max_image_pixels).permute(1, 2, 0).numpy())
            axis.set_title(label, fontsize=TITLE_FONT_SIZE, loc="left")
            axis.set_xticks([])
            axis.set_yticks([])
            if frame is not None:
                for spine in axis.spines.values():
                    spine.set_edgecolor(CORRECT_COLOUR if frame else WRONG_COLOUR)
                    spine.set_linewidth(FRAME_WIDTH)
        figure.suptitle(f"{title}: query {q}", fontsize=TITLE_FONT_SIZE + 2, x=0.0, ha="left")
        write_figure(folder / f"{q:03d}.png", figure, dpi=GRID_DPI)


def panel_labels(
    query_path: str,
    prediction_paths: Sequence[str],
    scores: np.ndarray | None,
    distances: np.ndarray | None = None,
    correct: Sequence[bool | None] | None = None,
) -> list[str]:
    """Titles of a grid's panels: "query" and its place, then each prediction's rank, whether it
    is a positive, its place, FoL score and global distance (squared L2, as the search returns
    it) (``scores``, ``distances`` [n], NaN where there is none). A place is the UTM coordinates of a VPR-datasets-downloader name
    (``@east@north@...``), else the file name, shortened."""
    labels = [f"query\n{short_name(query_path)}"]
    for rank, path in enumerate(prediction_paths):
        verdict = "" if correct is None or correct[rank] is None else (" correct" if correct[rank] else " wrong")
        lines = [f"#{rank + 1}{verdict}", short_name(path)]
        numbers = []
        if scores is not None and np.isfinite(scores[rank]):
            numbers.append(f"FoL {scores[rank]:.0f}")
        if distances is not None and np.isfinite(distances[rank]):
            numbers.append(f"L2² {distances[rank]:.3f}")
        if numbers:
            lines.append(", ".join(numbers))
        labels.append("\n".join(lines))
    return labels


def short_name(path: str) -> str:
    """How a panel names an image: ``UTM 551234 E, 4178123 N`` for a VPR-datasets-downloader
    name, else its file name, the middle elided past ``TITLE_CHARS`` (bytes that are not UTF-8
    shown as U+FFFD)."""
    try:
        east, north = utm_from_name(path)
        return f"UTM {east:.0f} E, {north:.0f} N"
    except ValueError:
        pass
    name = os.fsencode(Path(path).name).decode("utf-8", errors="replace")
    return name if len(name) <= TITLE_CHARS else name[: TITLE_CHARS // 2 - 1] + "..." + name[-(TITLE_CHARS // 2 - 2) :]
