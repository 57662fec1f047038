"""The original FoL evaluation, re-implemented from its description (docs/METHOD.md section 5) as the
reference our pipeline and engine are checked and timed against."""
from __future__ import annotations

import faiss
import numpy as np
import torch

ORIGINAL_PAD = 3600  # the original zero-pads every image's local features to this length


def original_scores(query: torch.Tensor, candidates: list[torch.Tensor], threshold: float = 0.7) -> torch.Tensor:
    """The original algorithm: pad to 3600 cells, one batched product, arg-max both ways, then a
    Python loop per candidate thresholding the mutual matches."""

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(ORIGINAL_PAD - len(x), x.shape[1])])

    fm1, fm2 = pad(query), torch.stack([pad(c) for c in candidates])
    similarity = torch.matmul(fm2, fm1.T)
    best_candidate = torch.argmax(similarity, dim=1)
    best_query = torch.argmax(similarity, dim=2)
    mutual = best_query[torch.arange(len(fm2)).reshape(-1, 1), best_candidate]
    valid = torch.arange(similarity.shape[-1]).repeat(len(fm2), 1) == mutual
    scores = torch.zeros(len(fm2))
    for i in range(len(fm2)):
        query_cells = torch.nonzero(valid[i]).squeeze(1)
        cosine = torch.sum(fm1[query_cells] * fm2[i][best_candidate[i][query_cells]], dim=1)
        scores[i] = int((cosine > threshold).sum())
    return scores


def original_search(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The original's global retrieval: one faiss.IndexFlatL2 over the whole database."""
    index = faiss.IndexFlatL2(database.shape[1])
    index.add(database)
    return index.search(queries, k)


def original_rerank(
    predictions: np.ndarray, query_locals: list[torch.Tensor], database_locals: list[torch.Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    """The original's re-ranking: scores by :func:`original_scores`, then
    ``numpy.argsort(scores)[::-1]`` (arbitrary order among equal scores).

    Returns:
        re-ranked predictions [Q, K] and the scores [Q, K] in the global order.
    """
    reranked, scores = [], []
    for q, row in enumerate(predictions):
        row_scores = original_scores(query_locals[q], [database_locals[i] for i in row]).numpy()
        reranked.append(row[row_scores.argsort()[::-1]])
        scores.append(row_scores)
    return np.array(reranked), np.array(scores)
