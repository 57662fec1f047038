"""fol-plugin: FoL ("Focus on Local", AAAI 2025) visual place recognition as a drop-in method.

Pipeline: ``data`` (images) -> ``models`` (backbone -> aggregator -> global / local features)
-> ``rerank`` (FoL's local mutual matching).
"""
from .checkpoint import WEIGHT_URLS, CheckpointDownloadError, CheckpointError, load_model
from .data import load_image, preprocess
from .models import GLOBAL_DIM, FoLFeatures, FoLModel, ViTConfig
from .models.resizing import PatchSizeResizer
from .rerank import mutual_match_scores

__version__ = "0.1.0"

__all__ = [
    "GLOBAL_DIM",
    "WEIGHT_URLS",
    "CheckpointDownloadError",
    "CheckpointError",
    "FoLFeatures",
    "FoLModel",
    "PatchSizeResizer",
    "ViTConfig",
    "load_image",
    "load_model",
    "mutual_match_scores",
    "preprocess",
]
