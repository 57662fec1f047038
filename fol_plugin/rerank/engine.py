"""Fast FoL re-ranking scores on the CPU: a bf16 product, then float32 only where it matters.

Exact mode gives the scores of the float32 algorithm (:func:`.mutual.reference_match_scores`):

1. ``S~ = bf16(Q) bf16(D)^T`` with float32 accumulation. For L2-normalised rows, every entry is
   within ``eps = ((1 + u)^3 (1 + gamma_K) - 1) |q| |d|`` of the exact similarity (u = 2^-8
   for the bf16 inputs and output, gamma_K for the K-term float32 sum): about 0.0118.
2. One pass over ``S~`` (:func:`.kernels.exact_row_best`) finds each row's maximum; a query
   cell can only count when it exceeds ``threshold - eps``, and its true best candidate then
   lies among the cells within ``2 eps`` of it, which are re-computed exactly (float32 products
   summed in float64), ties to the first index.
3. The count threshold is applied to each pair's float32 dot product, as the original does.
4. Each candidate cell claimed by such pairs keeps its strongest claimant (the anchor); the pair
   is mutual unless a cell of that column within ``eps`` of the anchor in bf16 beats it exactly
   (:func:`.kernels.beaten_anchors`, ties to the first index).

The original compares its GEMM's float32 values where this compares exact sums, so two cells
whose similarities differ by float32 rounding alone (about 1e-7) could order differently; no
score differed in the tests or benchmarks. ``precision="bf16"`` takes the arg-maxima of ``S~``
itself: faster, approximate (the benchmarks measure its agreement).
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import kernels
from .mutual import MATCH_THRESHOLD, check_descriptors, reference_match_scores

PRECISIONS = ("exact", "bf16")
BF16_UNIT_ROUNDOFF = 2.0**-8
FP32_UNIT_ROUNDOFF = 2.0**-24
BOUND_SAFETY = 1.01
DOT_MARGIN = 1e-4  # float64 vs float32 dot products differ by far less
PRODUCT_BATCH = 4  # candidates whose bf16 similarities are held at once (~23 MB each)


def bf16_error_bound(query: torch.Tensor, candidate: torch.Tensor) -> float:
    """Bound on |bf16 product - float32 similarity| for any entry of ``candidate @ query.T``."""
    dim = query.shape[1]
    gamma = dim * FP32_UNIT_ROUNDOFF / (1 - dim * FP32_UNIT_ROUNDOFF)
    norms = float(query.norm(dim=1).max()) * float(candidate.norm(dim=1).max())
    return BOUND_SAFETY * ((1 + BF16_UNIT_ROUNDOFF) ** 3 * (1 + gamma) - 1) * norms


def _bf16_bits(similarity: torch.Tensor) -> np.ndarray:
    return similarity.view(torch.int16).numpy().view(np.uint16)


NEGATIVE_INFINITY_KEY = 0xFF80 ^ 0xFFFF  # order keys of the bf16 infinities
POSITIVE_INFINITY_KEY = 0x7F80 ^ 0x8000


def _key_values() -> np.ndarray:
    """Float value of every order key [65536], non-decreasing: the NaN patterns at both ends of
    the key range take the neighbouring infinity."""
    keys = np.arange(1 << 16, dtype=np.uint32)
    bits = np.where(keys >= 0x8000, keys ^ 0x8000, keys ^ 0xFFFF) << 16
    with np.errstate(invalid="ignore"):  # the NaN patterns, replaced below
        values = bits.view(np.float32).astype(np.float64)
    values[: NEGATIVE_INFINITY_KEY] = -np.inf
    values[POSITIVE_INFINITY_KEY + 1 :] = np.inf
    return values


KEY_VALUES = _key_values()


def _floor_keys(values: np.ndarray) -> np.ndarray:
    """Order keys at or below ``values``: every cell at or above ``values`` has a key at or above."""
    return (np.searchsorted(KEY_VALUES, values) - 1).astype(np.int32)


def _count_exact(bits: np.ndarray, query: torch.Tensor, candidate: torch.Tensor, threshold: float) -> int:
    """Exact count for one candidate, from the bf16 similarity's bit patterns [n, m]."""
    m = bits.shape[1]
    query_np, candidate_np = query.numpy(), candidate.numpy()
    eps = bf16_error_bound(query, candidate)
    # Each query cell's exact best candidate, among the cells within 2 eps of its bf16 maximum.
    best_candidate, best_value, col_chunk_keys = kernels.exact_row_best(
        bits, KEY_VALUES, eps, threshold, query_np, candidate_np
    )
    rows = np.flatnonzero(best_value > threshold - DOT_MARGIN)
    partners = best_candidate[rows]
    # The count threshold on the pair's own float32 dot product, as the original applies it.
    cosine = (query[torch.from_numpy(rows)] * candidate[torch.from_numpy(partners)]).sum(dim=1).numpy()
    keep = cosine > threshold
    rows, partners, values = rows[keep], partners[keep], best_value[rows[keep]]
    if len(rows) == 0:
        return 0
    # Per candidate cell, its strongest claimant (first row on ties) is the only one that can be
    # mutual; it is, unless a row within eps of it in bf16 beats it exactly.
    order = np.lexsort((rows, -values))
    claimed, first = np.unique(partners[order], return_index=True)
    anchor_row = np.full(m, -1, np.int64)
    anchor_value = np.full(m, -np.inf)
    anchor_row[claimed] = rows[order][first]
    anchor_value[claimed] = values[order][first]
    col_threshold = np.full(m, kernels.NO_THRESHOLD, np.int32)
    col_threshold[claimed] = _floor_keys(anchor_value[claimed] - eps)
    beaten = np.zeros(m, np.bool_)
    beaten[claimed] = kernels.beaten_anchors(
        bits, col_chunk_keys, claimed, col_threshold, anchor_row, anchor_value, query_np, candidate_np
    )
    return int(((anchor_row[partners] == rows) & ~beaten[partners]).sum())


def _count_bf16(bits: np.ndarray, query: torch.Tensor, candidate: torch.Tensor, threshold: float) -> int:
    """Approximate count for one candidate: arg-maxima of the bf16 similarity itself."""
    best_candidate, best_query = kernels.first_arg_maxima(bits, *kernels.scan_maxima(bits))
    best_candidate, best_query = torch.from_numpy(best_candidate), torch.from_numpy(best_query)
    mutual = best_query[best_candidate] == torch.arange(len(query))
    cosine = (query * candidate[best_candidate]).sum(dim=1)
    return int((mutual & (cosine > threshold)).sum())


def mutual_match_scores(
    query: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    threshold: float = MATCH_THRESHOLD,
    precision: str = "exact",
) -> torch.Tensor:
    """FoL re-ranking scores of one query against several candidates (FOL_SPEC section 5).

    On the CPU the bf16-then-float32 engine above computes them; elsewhere (CUDA) the plain
    float32 algorithm does.

    Args:
        query: [n, 128] L2-normalised local descriptors of the query.
        candidates: one [m_j, 128] L2-normalised tensor per candidate image.
        threshold: cosine similarity a mutual match must exceed to count.
        precision: "exact" (the float32 algorithm's scores) or "bf16" (faster, approximate).

    Returns:
        [len(candidates)] float32 on the query's device: the number of counted mutual matches.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {PRECISIONS}")
    check_descriptors("query", query)
    for candidate in candidates:
        check_descriptors("candidate", candidate, query.shape[1])
    if query.device.type != "cpu" or len(query) == 0:
        return reference_match_scores(query, candidates, threshold)
    query = query.float().contiguous()
    count = _count_exact if precision == "exact" else _count_bf16
    query_bf16 = query.bfloat16()
    candidates = [candidate.float().contiguous() for candidate in candidates]
    nonempty = [index for index, candidate in enumerate(candidates) if len(candidate)]
    scores = torch.zeros(len(candidates), dtype=torch.float32)
    # Products in batches (torch's threads), then the scans of a batch in parallel (numba
    # releases the GIL): alternating the two per candidate leaves torch's threads spinning.
    # Reused product buffers: fresh 20+ MB tensors per candidate cost as much in page faults.
    largest = max((len(candidates[index]) for index in nonempty), default=0)
    buffers = torch.empty(min(PRODUCT_BATCH, len(nonempty)), len(query) * largest, dtype=torch.bfloat16)
    with ThreadPoolExecutor(torch.get_num_threads()) as pool:
        for start in range(0, len(nonempty), PRODUCT_BATCH):
            batch = nonempty[start : start + PRODUCT_BATCH]
            bits = []
            for buffer, index in zip(buffers, batch):
                product = buffer[: len(query) * len(candidates[index])].view(len(query), len(candidates[index]))
                torch.mm(query_bf16, candidates[index].bfloat16().T, out=product)
                bits.append(_bf16_bits(product))
            counts = pool.map(lambda job: count(job[0], query, candidates[job[1]], threshold), zip(bits, batch))
            scores[batch] = torch.tensor(list(counts), dtype=torch.float32)
    return scores
