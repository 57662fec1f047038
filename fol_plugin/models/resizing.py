"""A wrapper for harnesses that feed arbitrary image sizes: rounds H and W to multiples of 14."""
from __future__ import annotations

import kornia
import torch
from torch import nn

from .backbone import PATCH_SIZE
from .fol import FoLFeatures, FoLModel


def round_to_patch_multiple(size: int) -> int:
    """The multiple of the patch size nearest to ``size`` (at least one patch)."""
    return max(PATCH_SIZE, round(size / PATCH_SIZE) * PATCH_SIZE)


class PatchSizeResizer(nn.Module):
    """Runs a :class:`FoLModel` on any H x W by bilinearly resizing to the nearest multiples of 14.

    Inputs already at a multiple of 14 are passed through untouched.
    """

    def __init__(self, model: FoLModel) -> None:
        super().__init__()
        self.model = model

    @property
    def descriptor_dim(self) -> int:
        return self.model.descriptor_dim

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 3, H', W'] with H', W' the nearest multiples of 14."""
        size = tuple(round_to_patch_multiple(s) for s in images.shape[-2:])
        if tuple(images.shape[-2:]) == size:
            return images
        return kornia.geometry.transform.resize(images, size, interpolation="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor, test: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] ImageNet-normalised, any H, W -> [B, 8448] (``test``: as :meth:`FoLModel.forward`)."""
        return self.model(self.resize(images), test=test)

    def extract(self, images: torch.Tensor) -> FoLFeatures:
        """As :meth:`FoLModel.extract`, with keypoints in the pixels of the images given."""
        resized = self.resize(images)
        features = self.model.extract(resized)
        scale = torch.tensor(
            [images.shape[-1] / resized.shape[-1], images.shape[-2] / resized.shape[-2]], device=images.device
        )
        features.keypoints = [keypoints * scale for keypoints in features.keypoints]
        return features
