"""Global and local features of image lists, on disk: resumable arrays and the local-feature store."""
from .arrays import ResumableArray, RowFile
from .extract import ExtractionConfig, check_image_size, extract_global, extract_local
from .store import STORE_DTYPES, InMemoryFeatures, LocalFeatureStore

__all__ = [
    "STORE_DTYPES",
    "ExtractionConfig",
    "InMemoryFeatures",
    "LocalFeatureStore",
    "ResumableArray",
    "RowFile",
    "check_image_size",
    "extract_global",
    "extract_local",
]
