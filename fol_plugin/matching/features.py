"""FoL local features in the common matching language: keypoints, kornia LAFs, descriptors."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from kornia.feature import laf_from_center_scale_ori

from ..data import preprocess
from ..models import FoLModel
from ..models.local_features import LOCAL_STRIDE
from ..models.resizing import round_to_patch_multiple

# A FoL keypoint stands for one cell of the local grid: its LAF scale is the cell spacing.
LAF_SCALE = LOCAL_STRIDE


@dataclass
class LocalFeatures:
    """One image's local features.

    Attributes:
        keypoints: [N, 2] (x, y) in pixels of the image the features describe.
        descriptors: [N, D] L2-normalised.
        scale: (x, y) image pixels per network-input pixel: 1 for keypoints in the network's
            frame, the resize factors for keypoints mapped back to the original image.
            :func:`.geometry.verify` works in the network's frame, where one local-grid cell is
            the same 3.5 px in every image.
    """

    keypoints: torch.Tensor
    descriptors: torch.Tensor
    scale: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        if self.descriptors.ndim != 2 or self.keypoints.shape != (len(self.descriptors), 2):
            raise ValueError(
                f"expected keypoints [N, 2] and descriptors [N, D], got {tuple(self.keypoints.shape)} "
                f"and {tuple(self.descriptors.shape)}"
            )

    def __len__(self) -> int:
        return len(self.descriptors)

    def lafs(self, scale: float = LAF_SCALE) -> torch.Tensor:
        """Local affine frames [1, N, 2, 3] centred on the keypoints, upright, ``scale`` pixels."""
        return to_lafs(self.keypoints, scale)


def to_lafs(keypoints: torch.Tensor, scale: float = LAF_SCALE) -> torch.Tensor:
    """kornia LAFs [1, N, 2, 3] from keypoints [N, 2] (upright, one local-grid cell wide)."""
    centres = keypoints.float()[None]
    scales = torch.full((1, len(keypoints), 1, 1), float(scale), dtype=centres.dtype, device=centres.device)
    return laf_from_center_scale_ori(centres, scales, torch.zeros_like(scales[..., 0]))


def in_image_pixels(
    keypoints: torch.Tensor, descriptors: torch.Tensor, image_hw: tuple[int, int], network_hw: tuple[int, int]
) -> LocalFeatures:
    """One image's features with keypoints [N, 2] mapped from the network's input (H', W') to the
    image's own pixels (H, W); ``scale`` records the resize."""
    scale = (image_hw[1] / network_hw[1], image_hw[0] / network_hw[0])
    return LocalFeatures(keypoints.cpu() * torch.tensor(scale), descriptors.cpu(), scale)


@torch.inference_mode()
def extract_local_features(
    model: FoLModel, image: torch.Tensor, image_size: tuple[int, int] | None = None, resize_mode: str = "original"
) -> LocalFeatures:
    """FoL local features of one RGB image [3, H, W] in [0, 1], keypoints in its own pixels
    (``scale`` records the resize, so verification runs in the network's frame).

    Args:
        image_size: the network input (H', W'), multiples of 14; None rounds H and W to the
            nearest multiples of 14.
    """
    size = image_size or tuple(round_to_patch_multiple(s) for s in image.shape[-2:])
    device = next(model.parameters()).device
    features = model.extract(preprocess(image, size, resize_mode).to(device))
    return in_image_pixels(features.keypoints[0], features.local_descriptors[0], tuple(image.shape[-2:]), size)
