"""fol-plugin: FoL ("Focus on Local", AAAI 2025) visual place recognition as a drop-in method.

Pipeline: ``data`` (images) -> ``models`` (backbone -> aggregator -> global / local features)
-> ``retrieval`` (global search) -> ``rerank`` (FoL's local mutual matching) -> ``evaluation``.

The names below are imported when first used, so that ``fol-vpr --help`` starts without torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "GLOBAL_DIM": ".models",
    "WEIGHT_URLS": ".checkpoint",
    "CheckpointDownloadError": ".checkpoint",
    "CheckpointError": ".checkpoint",
    "FoLFeatures": ".models",
    "FoLModel": ".models",
    "OnnxFoL": ".export",
    "PatchSizeResizer": ".models.resizing",
    "ViTConfig": ".config",
    "export_onnx": ".export",
    "load_image": ".data",
    "load_model": ".checkpoint",
    "mutual_match_scores": ".rerank",
    "preprocess": ".data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
