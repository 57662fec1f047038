"""Model pipeline: backbone (DINOv2 ViT) -> aggregator (global) -> local features (re-ranking)."""
from .aggregator import GLOBAL_DIM, FoLAggregator
from .backbone import PATCH_SIZE, VIT_CONFIGS, DINOv2Backbone, ViTConfig
from .fol import FoLFeatures, FoLModel, check_images, nearest_valid_sizes, select_features
from .local_features import LOCAL_DIM

__all__ = [
    "GLOBAL_DIM",
    "LOCAL_DIM",
    "PATCH_SIZE",
    "VIT_CONFIGS",
    "DINOv2Backbone",
    "FoLAggregator",
    "FoLFeatures",
    "FoLModel",
    "ViTConfig",
    "check_images",
    "nearest_valid_sizes",
    "select_features",
]
