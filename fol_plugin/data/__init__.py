"""First stage: images in (decoding, normalisation, resizing)."""
from .images import IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODES, load_image, normalize, preprocess

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RESIZE_MODES", "load_image", "normalize", "preprocess"]
