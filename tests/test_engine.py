"""The CPU re-ranking engine (``fol_plugin.rerank.engine``) in any grad mode and on NumPy input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fol_plugin.rerank import mutual_match_scores, rerank


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "plain"])
def test_reranking_works_in_every_grad_mode(mode):
    generator = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(300, 128, generator=generator), dim=-1)
    noise = 0.01 * torch.randn(300, 128, generator=generator)
    database = {i: F.normalize(query[: 300 - 50 * i] + noise[: 300 - 50 * i], dim=-1) for i in range(4)}
    expected = torch.tensor([mutual_match_scores(query, [database[i]])[0] for i in range(4)])
    global_order = np.array([3, 2, 1, 0])
    context = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "plain": torch.enable_grad}[mode]
    with context():
        scores = mutual_match_scores(query.clone(), [database[i].clone() for i in range(4)])
        reranked = rerank(global_order[None], [query.clone()], database, top_k=4, progress=False)
    assert torch.equal(scores, expected) and len(set(expected.tolist())) == 4
    assert reranked[0].tolist() == global_order[np.argsort(-expected.numpy()[global_order])].tolist()


def test_numpy_descriptors_are_accepted_by_the_engine():
    generator = torch.Generator().manual_seed(1)
    query = F.normalize(torch.randn(100, 128, generator=generator), dim=-1)
    candidate = F.normalize(query + 0.1 * torch.randn(100, 128, generator=generator), dim=-1)
    assert torch.equal(mutual_match_scores(query.numpy(), [candidate.numpy()]), mutual_match_scores(query, [candidate]))
