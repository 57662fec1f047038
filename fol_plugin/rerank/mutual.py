"""FoL's re-ranking score: thresholded mutual nearest neighbours between local descriptors.

Implements docs/METHOD.md section 5 exactly, as the original computes it: arg-max both ways over the
float32 similarity matrix, and the threshold applied to the matched pair's own dot product.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MATCH_THRESHOLD = 0.7
BATCH_SIMILARITY_BYTES = 2 * 2**30  # the largest [k, m, n] float32 similarity block of batched_match_scores


def as_descriptors(descriptors: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Descriptors as a tensor outside autograd: NumPy arrays are wrapped (no copy), tensors detached."""
    if isinstance(descriptors, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(descriptors))
    if not isinstance(descriptors, torch.Tensor):
        raise TypeError(f"local descriptors must be a tensor or a NumPy array, got {type(descriptors).__name__}")
    return descriptors.detach()


def check_descriptors(name: str, descriptors: torch.Tensor, dim: int | None = None) -> None:
    if descriptors.ndim != 2 or (dim is not None and descriptors.shape[1] != dim):
        expected = f"[N, {dim}]" if dim is not None else "[N, D]"
        raise ValueError(f"{name} must be {expected} local descriptors, got shape {tuple(descriptors.shape)}")


def mutual_matches(
    query: torch.Tensor, candidate: torch.Tensor, threshold: float = MATCH_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor]:
    """FoL's counted matches between two images.

    Args:
        query: [n, D] L2-normalised query descriptors.
        candidate: [m, D] L2-normalised candidate descriptors.
        threshold: a mutual match counts when its cosine similarity is strictly above this.

    Returns:
        query_indices [K] and candidate_indices [K] (int64) of the counted matches, by query index.
    """
    check_descriptors("query", query)
    check_descriptors("candidate", candidate, query.shape[1])
    empty = torch.zeros(0, dtype=torch.long, device=query.device)
    if len(query) == 0 or len(candidate) == 0:
        return empty, empty
    candidate = candidate.to(device=query.device, dtype=query.dtype)
    similarity = candidate @ query.T  # [m, n]
    best_candidate = similarity.argmax(dim=0)  # [n]
    best_query = similarity.argmax(dim=1)  # [m]
    query_indices = torch.arange(len(query), device=query.device)
    mutual = best_query[best_candidate] == query_indices
    cosine = (query * candidate[best_candidate]).sum(dim=-1)
    keep = mutual & (cosine > threshold)
    return query_indices[keep], best_candidate[keep]


def reference_match_scores(
    query: torch.Tensor, candidates: Sequence[torch.Tensor], threshold: float = MATCH_THRESHOLD
) -> torch.Tensor:
    """FoL re-ranking scores by the plain float32 algorithm, one candidate at a time (any device).

    Returns:
        [len(candidates)] float32 on the query's device: the number of counted mutual matches.
    """
    scores = torch.zeros(len(candidates), dtype=torch.float32, device=query.device)
    for index, candidate in enumerate(candidates):
        scores[index] = len(mutual_matches(query, candidate, threshold)[0])
    return scores


def batched_match_scores(
    query: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    threshold: float = MATCH_THRESHOLD,
    block_bytes: int = BATCH_SIMILARITY_BYTES,
) -> torch.Tensor:
    """The float32 algorithm of :func:`reference_match_scores` on blocks of candidates at once,
    for GPUs: candidates zero-padded to the longest of their block, padded cells masked out of
    the arg-maxima, ties to the first index as everywhere.

    Args:
        query: [n, D] L2-normalised.
        candidates: [m_j, D] L2-normalised, on the query's device or not.
        block_bytes: the largest similarity block [k, max m_j, n] float32 computed at once.

    Returns:
        [len(candidates)] float32 on the query's device.
    """
    device, dim = query.device, query.shape[1]
    scores = torch.zeros(len(candidates), dtype=torch.float32, device=device)
    nonempty = [index for index, candidate in enumerate(candidates) if len(candidate)]
    if len(query) == 0 or not nonempty:
        return scores
    query_indices = torch.arange(len(query), device=device)
    start = 0
    while start < len(nonempty):
        block = [nonempty[start]]
        longest = len(candidates[nonempty[start]])
        for index in nonempty[start + 1 :]:
            if (len(block) + 1) * max(longest, len(candidates[index])) * len(query) * 4 > block_bytes:
                break
            block.append(index)
            longest = max(longest, len(candidates[index]))
        start += len(block)
        lengths = torch.tensor([len(candidates[index]) for index in block], device=device)
        padded = torch.zeros(len(block), longest, dim, dtype=query.dtype, device=device)
        for row, index in enumerate(block):
            padded[row, : len(candidates[index])] = candidates[index].to(device=device, dtype=query.dtype)
        similarity = padded @ query.T  # [k, m, n], as candidate @ query.T
        padding = torch.arange(longest, device=device)[None, :] >= lengths[:, None]  # [k, m]
        similarity.masked_fill_(padding[:, :, None], float("-inf"))
        best_candidate = similarity.argmax(dim=1)  # [k, n]
        best_query = similarity.argmax(dim=2)  # [k, m]
        mutual = best_query.gather(1, best_candidate) == query_indices[None]
        partners = padded.gather(1, best_candidate[:, :, None].expand(-1, -1, dim))  # [k, n, D]
        cosine = (query[None] * partners).sum(dim=-1)
        scores[torch.tensor(block, device=device)] = (mutual & (cosine > threshold)).sum(dim=1).float()
    return scores
