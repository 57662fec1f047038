"""FoL's local features: the dense up-sampled map, the selected regions and their geometry.

Implements docs/METHOD.md section 4. The dense map comes from two stride-2 transposed convolutions
over the patch grid, so an h x w patch grid gives a (4h - 3) x (4w - 3) local grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..options import LOCAL_STRIDE, PATCH_SIZE

LOCAL_DIM = 128
UPCONV_DIM = 256
NUM_SELECTED_PATCHES = 225
# chenshunpeng/FoL (network_FoL.py) pads a batch's local descriptors to a length picked from the
# local grid's height: (height above which, length), else height**2.
ORIGINAL_PADDED_LENGTHS = ((80, 3600), (70, 3500), (40, 1000))
LOCAL_OFFSET = PATCH_SIZE / 2  # input pixel of cell 0: the centre of patch 0


def make_upconv(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    """One stride-2 up-sampling step of the local head: n cells -> 2n - 1 cells."""
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)


def local_grid_size(h: int, w: int) -> tuple[int, int]:
    """Local-grid size for an h x w patch grid: (4h - 3, 4w - 3)."""
    return 4 * h - 3, 4 * w - 3


def original_padded_length(grid_height: int) -> int:
    """The length the original pads local descriptors to, for a local grid of ``grid_height`` rows."""
    return next((length for above, length in ORIGINAL_PADDED_LENGTHS if grid_height > above), grid_height**2)


def pad_like_original(descriptors: list[torch.Tensor], patch_grid: tuple[int, int]) -> torch.Tensor:
    """The local descriptors of a batch as the original's ``forward(x, test=True)`` returns them.

    Args:
        descriptors: B tensors [N_i, 128] (raster order, L2-normalised).
        patch_grid: (h, w) patches of the batch's images.

    Returns:
        [B, L, 128], each image's descriptors then zero rows, L =
        :func:`original_padded_length` of the local grid height, or the longest N_i where that is
        longer (where the original raises instead).
    """
    grid_height, _ = local_grid_size(*patch_grid)
    length = max(original_padded_length(grid_height), *(len(d) for d in descriptors))
    padded = descriptors[0].new_zeros(len(descriptors), length, LOCAL_DIM)
    for row, image_descriptors in zip(padded, descriptors):
        row[: len(image_descriptors)] = image_descriptors
    return padded


def select_patches(selection_score: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Binary mask of the 225 best-scored patches (all of them when there are fewer).

    Args:
        selection_score: [B, N], N = h*w.

    Returns:
        [B, h, w] float mask.
    """
    b, n = selection_score.shape
    _, top = torch.topk(selection_score, min(NUM_SELECTED_PATCHES, n), dim=-1)
    mask = torch.zeros((b, n), dtype=torch.float32, device=selection_score.device)
    return mask.scatter_(1, top, 1.0).view(b, h, w)


def cell_keypoints(cells: torch.Tensor, grid_width: int) -> torch.Tensor:
    """Input-pixel positions of local-grid cells.

    Args:
        cells: [N] raster indices into a grid of ``grid_width`` columns.

    Returns:
        [N, 2] (x, y) in network-input pixels: x = 3.5 col + 7, y = 3.5 row + 7.
    """
    rows = torch.div(cells, grid_width, rounding_mode="floor")
    cols = cells - rows * grid_width
    return torch.stack((cols, rows), dim=-1).float() * LOCAL_STRIDE + LOCAL_OFFSET


def gather_selected(
    dense: torch.Tensor, patch_mask: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Local descriptors and keypoints of the selected regions, in raster order.

    Args:
        dense: [B, 128, H', W'] dense local map (not normalised).
        patch_mask: [B, h, w] binary patch selection.

    Returns:
        descriptors: B tensors [N_i, 128], L2-normalised.
        keypoints: B tensors [N_i, 2], (x, y) in input pixels.
    """
    grid_h, grid_w = dense.shape[-2:]
    cell_mask = F.interpolate(patch_mask.unsqueeze(1), size=(grid_h, grid_w), mode="nearest").flatten(1)
    vectors = dense.flatten(2).transpose(1, 2)  # [B, H'*W', 128]
    descriptors, keypoints = [], []
    for image_vectors, image_mask in zip(vectors, cell_mask):
        cells = image_mask.nonzero().squeeze(1)
        descriptors.append(F.normalize(image_vectors[cells], p=2, dim=-1))
        keypoints.append(cell_keypoints(cells, grid_w))
    return descriptors, keypoints
