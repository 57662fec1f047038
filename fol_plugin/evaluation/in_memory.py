"""The two-stage evaluation held in memory, for image sets small enough (training's validation):
global descriptors, exact search, FoL re-ranking and recalls, without an output folder or cache.
:func:`~fol_plugin.evaluation.pipeline.run_eval` is the resumable, on-disk form of the same stages."""
from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import ImageSet, find_positives
from ..features import ExtractionConfig, InMemoryFeatures, ResumableArray, extract_global
from ..models import GLOBAL_DIM, FoLModel
from ..options import DEFAULT_POSITIVE_DISTANCE
from ..rerank import rerank
from ..retrieval import exact_search
from .recalls import compute_recalls


@torch.inference_mode()
def recalls_in_memory(
    model: FoLModel,
    database: ImageSet,
    queries: ImageSet,
    extraction: ExtractionConfig,
    recall_values: Sequence[int],
    rerank_topk: int = 0,
    positive_dist_threshold: float = DEFAULT_POSITIVE_DISTANCE,
) -> dict[str, dict[int, float]]:
    """Recalls (percent) of a labelled database and query set.

    Returns:
        {"global": {N: R@N}, "reranked": {N: R@N}} (no "reranked" without ``rerank_topk``), for
        the N of ``recall_values`` up to the database size.
    """
    model.eval()
    local = {"database": InMemoryFeatures(), "queries": InMemoryFeatures()} if rerank_topk else {}
    with tempfile.TemporaryDirectory() as folder:
        descriptors = []
        for name, images in (("database", database), ("queries", queries)):
            array = ResumableArray(Path(folder) / f"{name}.npy", (len(images), GLOBAL_DIM))
            extracted = extract_global(model, images.paths, array, extraction, local.get(name), f"Validation {name}")
            descriptors.append(np.array(extracted))
    k = min(max(max(recall_values), rerank_topk), len(database))
    predictions = exact_search(descriptors[0], descriptors[1], k, progress=False)[1]
    positives = find_positives(database.utms, queries.utms, positive_dist_threshold)
    values = [n for n in recall_values if n <= k]
    recalls = {"global": compute_recalls(predictions, positives, values)}
    if rerank_topk:
        reranked = rerank(predictions, local["queries"], local["database"], rerank_topk, device=extraction.device)
        recalls["reranked"] = compute_recalls(reranked, positives, values)
    return recalls
