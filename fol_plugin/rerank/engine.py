"""Fast FoL re-ranking scores on the CPU: a bf16 product, then float32 only where it matters.

It gives the scores of the float32 algorithm (:func:`.mutual.reference_match_scores`) by five
steps whose error bounds ``eps`` (bf16 product) and ``delta`` (float32 GEMM) decide every cell
the float32 arithmetic would decide, and recompute the GEMM's own values where they cannot: the
argument, step by step, is in docs/RERANK_ENGINE.md (:func:`_bounds` computes the two bounds).

On CUDA the plain float32 algorithm runs on blocks of candidates at once
(:func:`.mutual.batched_match_scores`), with cuBLAS's own rounding.
"""
from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import kernels
from .mutual import MATCH_THRESHOLD, as_descriptors, batched_match_scores, check_descriptors, mutual_matches

BF16_UNIT_ROUNDOFF = 2.0**-8
HALF_ULP_BELOW_ONE = BF16_UNIT_ROUNDOFF / 2  # bf16 rounding error of any value in (-1, 1)
FP32_UNIT_ROUNDOFF = 2.0**-24
BOUND_SAFETY = 1.01
DOT_MARGIN = 1e-4  # float64 vs float32 dot products differ by far less
# Every value the scans compare exceeds threshold - 3 eps; below this many eps, the reference runs.
KEY_THRESHOLD_MARGIN = 3.0


def _rounding_stats(x: torch.Tensor, x_bf16: torch.Tensor | None = None) -> tuple[float, float, float]:
    """Largest row norm of ``x`` [N, D] float32, of ``bf16(x)`` and of the rounding residual
    ``x - bf16(x)`` (one numba pass)."""
    x = x.detach()
    rounded = x.bfloat16() if x_bf16 is None else x_bf16.detach()
    return kernels.rounding_stats(x.numpy(), rounded.view(torch.int16).numpy())


def _bounds(query_stats: tuple[float, float, float], candidate_stats: tuple[float, float, float], dim: int) -> tuple[float, float]:
    """(eps, delta): bounds on |bf16 product - exact| and |float32 GEMM - exact| (module docstring)."""
    query_norm, query_rounded, query_residual = query_stats
    candidate_norm, candidate_rounded, candidate_residual = candidate_stats
    gamma = dim * FP32_UNIT_ROUNDOFF / (1 - dim * FP32_UNIT_ROUNDOFF)
    inputs = query_residual * candidate_norm + query_rounded * candidate_residual
    accumulation = gamma * query_rounded * candidate_rounded
    if query_norm * candidate_norm < 1 + HALF_ULP_BELOW_ONE:
        output = HALF_ULP_BELOW_ONE
    else:
        output = BF16_UNIT_ROUNDOFF * (1 + gamma) * query_rounded * candidate_rounded
    return BOUND_SAFETY * (inputs + accumulation + output), BOUND_SAFETY * gamma * query_norm * candidate_norm


def bf16_error_bound(query: torch.Tensor, candidate: torch.Tensor) -> float:
    """Bound on |bf16 product - exact similarity| for the entries of ``candidate @ query.T``
    that the exact engine relies on (see the module docstring), from the two inputs' actual
    rounding residuals: all entries below 1 in bf16, and all entries when some row has a norm
    well above 1."""
    return _bounds(_rounding_stats(query.float()), _rounding_stats(candidate.float()), query.shape[1])[0]


def _bf16_keys(similarity: torch.Tensor) -> np.ndarray:
    """The bf16 bit patterns read as int16: the order keys of :mod:`.kernels`."""
    return similarity.view(torch.int16).numpy()


POSITIVE_INFINITY_KEY = 0x7F80


def _key_values() -> np.ndarray:
    """Float value of every key [65536] (key k at k + KEY_OFFSET), non-decreasing: every
    negative key takes -inf (only positive thresholds are compared) and the NaN patterns +inf."""
    keys = np.arange(-kernels.KEY_OFFSET, kernels.KEY_OFFSET, dtype=np.int32)
    values = np.full(len(keys), -np.inf)
    positive = (keys >= 0) & (keys <= POSITIVE_INFINITY_KEY)
    values[positive] = (keys[positive].astype(np.uint32) << 16).view(np.float32)
    values[keys > POSITIVE_INFINITY_KEY] = np.inf
    return values


KEY_VALUES = _key_values()


def _count_exact(
    keys: np.ndarray, query: torch.Tensor, candidate: torch.Tensor, threshold: float, eps: float, delta: float
) -> int:
    """Exact count for one candidate, from the bf16 similarity's keys [n, m] and the bounds."""
    query_np, candidate_np = query.numpy(), candidate.numpy()
    # Each query cell's best candidate in the float32 GEMM, its exact value and (where contenders
    # were compared) its GEMM value.
    best_candidate, best_exact, best_gemm, column_block_max = kernels.exact_row_best(
        keys, KEY_VALUES, eps, delta, threshold, query_np, candidate_np
    )
    rows = np.flatnonzero(best_exact > threshold - DOT_MARGIN)
    partners, exact = best_candidate[rows], best_exact[rows]
    # The count threshold on the pair's own float32 dot product, as the original applies it: that
    # sum is within delta of the exact value, so it decides only for pairs that close to the threshold.
    keep = exact > threshold
    near = np.flatnonzero(np.abs(exact - threshold) <= delta)
    if len(near):
        pairs = torch.from_numpy(rows[near]), torch.from_numpy(partners[near])
        keep[near] = ((query[pairs[0]] * candidate[pairs[1]]).sum(dim=1) > threshold).numpy()
    rows, partners = rows[keep], partners[keep]
    if len(rows) == 0:
        return 0
    # Per candidate cell, its strongest claimant (first row on ties) is the only one that can be
    # mutual; it is, unless a row near it in bf16 beats it in the float32 GEMM.
    return kernels.count_unbeaten_anchors(
        keys, column_block_max, rows, partners, best_exact[rows], best_gemm[rows], KEY_VALUES, eps, delta, query_np, candidate_np
    )


def mutual_match_scores(
    query: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    threshold: float = MATCH_THRESHOLD,
) -> torch.Tensor:
    """FoL re-ranking scores of one query against several candidates (docs/METHOD.md section 5).

    On the CPU the bf16-then-float32 engine above computes them; elsewhere (CUDA) the plain
    float32 algorithm does, on blocks of candidates at once.

    Args:
        query: [n, 128] L2-normalised local descriptors of the query (a tensor or a NumPy array).
        candidates: one [m_j, 128] L2-normalised tensor (or array) per candidate image.
        threshold: cosine similarity a mutual match must exceed to count.

    Returns:
        [len(candidates)] float32 on the query's device: the number of counted mutual matches.
    """
    query = as_descriptors(query)
    candidates = [as_descriptors(candidate) for candidate in candidates]
    check_descriptors("query", query)
    for candidate in candidates:
        check_descriptors("candidate", candidate, query.shape[1])
    if query.device.type != "cpu" or len(query) == 0:
        return batched_match_scores(query, candidates, threshold)
    query = query.float().contiguous()
    query_bf16 = query.bfloat16()
    query_stats = _rounding_stats(query, query_bf16)

    candidates = [candidate.float().contiguous() for candidate in candidates]

    def score(index: int, buffer: torch.Tensor) -> int:
        candidate = candidates[index]
        candidate_bf16 = candidate.bfloat16()
        eps, delta = _bounds(query_stats, _rounding_stats(candidate, candidate_bf16), query.shape[1])
        if threshold <= KEY_THRESHOLD_MARGIN * eps:  # the keys order positive values only
            return len(mutual_matches(query, candidate, threshold)[0])
        product = buffer[: len(query) * len(candidate)].view(len(query), len(candidate))
        torch.mm(query_bf16, candidate_bf16.T, out=product)
        return _count_exact(_bf16_keys(product), query, candidate, threshold, eps, delta)

    return torch.tensor(_on_workers(score, len(query), candidates), dtype=torch.float32)


def bf16_products(query: torch.Tensor, candidates: Sequence[torch.Tensor]) -> None:
    """The engine's bf16 products alone, the floor it is measured against: the products
    :func:`mutual_match_scores` computes on the CPU, on the same workers into the same buffers,
    without the exact decisions (nor the inputs' conversion to bf16).

    Args:
        query: [n, D] bf16.
        candidates: [m_j, D] bf16 each.
    """

    def multiply(index: int, buffer: torch.Tensor) -> int:
        candidate = candidates[index]
        torch.mm(query, candidate.T, out=buffer[: len(query) * len(candidate)].view(len(query), len(candidate)))
        return 0

    _on_workers(multiply, len(query), candidates)


def _on_workers(work: Callable[[int, torch.Tensor], int], query_cells: int, candidates: Sequence[torch.Tensor]) -> list[int]:
    """``work(index, buffer)`` for each non-empty candidate, one candidate per worker at a time
    -> its result, 0 for empty candidates.

    Each worker computes one candidate's product into ``buffer`` (room for query_cells x the
    longest candidate in bf16), and :func:`mutual_match_scores` scans it there while it is still
    in cache; numba and torch's matmul release the GIL. A buffer per worker, reused: fresh 20+ MB
    tensors per candidate cost as much in page faults. One intra-op thread per worker: the workers are the parallelism (torch's
    setting is process-wide, and is restored when they finish).
    """
    results = [0] * len(candidates)
    nonempty = [index for index, candidate in enumerate(candidates) if len(candidate)]
    if not nonempty:
        return results
    workers = min(torch.get_num_threads(), len(nonempty))
    largest = max(len(candidates[index]) for index in nonempty)
    free_buffers: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
    for _ in range(workers):
        free_buffers.put(torch.empty(query_cells * largest, dtype=torch.bfloat16))

    def run(index: int) -> int:
        buffer = free_buffers.get()
        try:
            with torch.inference_mode():  # worker threads do not inherit the caller's grad mode
                return work(index, buffer)
        finally:
            free_buffers.put(buffer)

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for index, result in zip(nonempty, pool.map(run, nonempty)):
                results[index] = result
    finally:
        torch.set_num_threads(threads)
    return results
