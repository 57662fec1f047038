"""torch.hub entrypoints for FoL, compatible with chenshunpeng/FoL's.

    model = torch.hub.load("<owner>/fol-plugin", "FoL", pretrained=True)            # ViT-L
    model = torch.hub.load("<owner>/fol-plugin", "fol_vitb14", pretrained=True)
    model = torch.hub.load("<owner>/fol-plugin", "get_trained_model", backbone="vitb")  # any image size
    model = torch.hub.load("path/to/clone", "fol_vitb14", source="local", weights="FoL_base.pth")

``model(images)`` returns [B, 8448] L2-normalised descriptors; ``model.extract(images)`` also
returns FoL's local features for re-ranking. Code written for the original's hub runs unchanged:
every entrypoint takes ``strict=`` (``strict=False``, the original's default, loads what matches
and warns with the missing and unexpected keys; ours is ``strict=True``, which refuses partial
weights), and ``model(images, test=True)`` returns the original's evaluation pair (global
descriptors, zero-padded local descriptors [B, L, 128]).
"""
from __future__ import annotations

import os

import torch

from fol_plugin.checkpoint import load_model
from fol_plugin.models import FoLModel
from fol_plugin.models.resizing import PatchSizeResizer

dependencies = ["torch", "kornia", "numpy", "numba", "tqdm", "PIL", "xxhash"]


def _build(
    backbone: str,
    pretrained: bool,
    progress: bool,
    map_location: str | torch.device,
    weights: str | os.PathLike | None,
    strict: bool,
    **kwargs,
) -> FoLModel:
    if weights is None:
        weights = "auto" if pretrained else None
    return load_model(
        backbone, weights=weights, device="cpu", progress=progress, map_location=map_location, strict=strict, **kwargs
    )


def FoL(
    pretrained: bool = True,
    backbone: str = "vitl",
    progress: bool = True,
    map_location: str | torch.device = "cpu",
    weights: str | os.PathLike | None = None,
    strict: bool = True,
    **kwargs,
) -> FoLModel:
    """FoL with a "vitl" (FoL_large) or "vitb" (FoL_base) backbone.

    Args:
        pretrained: load the published checkpoint (torch.hub cache, downloaded when absent).
        backbone: "vitl" or "vitb".
        progress: show a download progress bar.
        map_location: where the checkpoint's tensors are read to; the model is returned on the CPU.
        weights: a local checkpoint file (or URL) to load instead of the published one.
        strict: refuse a checkpoint that lacks some weights (default); False loads what matches
            and warns, as the original's hub does.
        **kwargs: model options, e.g. ``num_trainable_blocks``.
    """
    return _build(backbone, pretrained, progress, map_location, weights, strict, **kwargs)


def fol_vitl14(
    pretrained: bool = True,
    progress: bool = True,
    map_location: str | torch.device = "cpu",
    weights: str | os.PathLike | None = None,
    strict: bool = True,
    **kwargs,
) -> FoLModel:
    """FoL with the DINOv2 ViT-L/14 backbone (FoL_large.pth); arguments as :func:`FoL`'s."""
    return _build("vitl", pretrained, progress, map_location, weights, strict, **kwargs)


def fol_vitb14(
    pretrained: bool = True,
    progress: bool = True,
    map_location: str | torch.device = "cpu",
    weights: str | os.PathLike | None = None,
    strict: bool = True,
    **kwargs,
) -> FoLModel:
    """FoL with the DINOv2 ViT-B/14 backbone (FoL_base.pth); arguments as :func:`FoL`'s."""
    return _build("vitb", pretrained, progress, map_location, weights, strict, **kwargs)


def get_trained_model(
    backbone: str = "vitl",
    weights: str | os.PathLike | None = None,
    progress: bool = True,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
) -> PatchSizeResizer:
    """Harness entrypoint: pretrained FoL that takes any image size (rounded to multiples of 14).

    For gmberton/VPR-methods-evaluation: ``--descriptors_dimension 8448``.
    """
    return PatchSizeResizer(_build(backbone, True, progress, map_location, weights, strict)).eval()
