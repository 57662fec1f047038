"""Fast FoL re-ranking scores on the CPU: a screening product, then exact arithmetic only where it matters.

It gives the scores of the float32 algorithm (:func:`.mutual.reference_match_scores`) by five
steps whose error bounds ``eps`` (screen product) and ``delta`` (float32 GEMM) decide every cell
the float32 arithmetic would decide, and recompute the GEMM's own values where they cannot: the
argument, step by step, is in docs/RERANK_ENGINE.md (:func:`_bounds` computes the two bounds).

The screen is the product this host computes fastest (:func:`fol_plugin.host.screen_product`):
bf16 where bf16 is native (AMX, AVX-512 BF16, Arm bf16), float32 elsewhere (AVX2, where a bf16
product is emulated and 8-24x slower than float32). A float32 screen is within ``delta`` of the
exact value whatever its summation order, so there ``eps = delta``.

On CUDA the plain float32 algorithm runs on blocks of candidates at once
(:func:`.mutual.batched_match_scores`), with cuBLAS's own rounding.
"""
from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..host import SCREEN_PRODUCTS, HostSettingError, screen_product
from . import kernels
from .keys import KEY_VALUES, NO_KEY_VALUES, screen_keys
from .mutual import MATCH_THRESHOLD, as_descriptors, batched_match_scores, check_descriptors, mutual_matches

BF16_UNIT_ROUNDOFF = 2.0**-8
HALF_ULP_BELOW_ONE = BF16_UNIT_ROUNDOFF / 2  # bf16 rounding error of any value in (-1, 1)
FP32_UNIT_ROUNDOFF = 2.0**-24
BOUND_SAFETY = 1.01
DOT_MARGIN = 1e-4  # float64 vs float32 dot products differ by far less
# Every value the scans compare exceeds threshold - 3 eps; below this many eps, the reference runs.
KEY_THRESHOLD_MARGIN = 3.0


SCREEN_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Rows per panel of the screen product (None: the whole product at once). MKL's float32 product
# in panels of 64-128 rows runs 26% faster than the whole [3400, 3400] product (36-37 against
# 50 ms on one thread, AVX2 and AVX-512 alike; 64 rows 8% faster than 128 on two workers), and each
# panel is scanned while in cache; oneDNN's bf16 product is fastest whole (15.2 against 16.8 ms in
# 128-row panels).
PANEL_ROWS = {"bf16": None, "fp32": 64}
# Whether the product's rows are the candidate's cells (the reference's own [m, n] layout) rather
# than the query's: the score is symmetric in the two images (first index on ties both ways, the
# pair's dot product and the GEMM values the same products in the same order), and MKL's float32
# panels of candidate rows against the one query run 5% faster on two workers.
CANDIDATE_ROWS = {"bf16": False, "fp32": True}
Stats = tuple[float, float, float]  # largest row norm of x, of its screen copy, of the rounding residual


def _rounding_stats(x: torch.Tensor, x_bf16: torch.Tensor | None = None) -> Stats:
    """Largest row norm of ``x`` [N, D] float32, of ``bf16(x)`` and of the rounding residual
    ``x - bf16(x)`` (one numba pass)."""
    x = x.detach()
    rounded = x.bfloat16() if x_bf16 is None else x_bf16.detach()
    return kernels.rounding_stats(x.numpy(), rounded.view(torch.int16).numpy())


def _screen_copy(x: torch.Tensor, product: str) -> tuple[torch.Tensor, Stats]:
    """``x`` [N, D] float32 as the screen multiplies it, and its :data:`Stats`."""
    if product == "bf16":
        rounded = x.bfloat16()
        return rounded, _rounding_stats(x, rounded)
    norm = float(torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).max()) if len(x) else 0.0
    return x, (norm, norm, 0.0)


def _bounds(query_stats: Stats, candidate_stats: Stats, dim: int, product: str = "bf16") -> tuple[float, float]:
    """(eps, delta): bounds on |screen product - exact| and |float32 GEMM - exact| (module docstring)."""
    query_norm, query_rounded, query_residual = query_stats
    candidate_norm, candidate_rounded, candidate_residual = candidate_stats
    gamma = dim * FP32_UNIT_ROUNDOFF / (1 - dim * FP32_UNIT_ROUNDOFF)
    delta = BOUND_SAFETY * gamma * query_norm * candidate_norm
    if product == "fp32":  # float32 inputs and output: the float32 sum's own error alone
        return delta, delta
    inputs = query_residual * candidate_norm + query_rounded * candidate_residual
    accumulation = gamma * query_rounded * candidate_rounded
    if query_norm * candidate_norm < 1 + HALF_ULP_BELOW_ONE:
        output = HALF_ULP_BELOW_ONE
    else:
        output = BF16_UNIT_ROUNDOFF * (1 + gamma) * query_rounded * candidate_rounded
    return BOUND_SAFETY * (inputs + accumulation + output), delta


def bf16_error_bound(query: torch.Tensor, candidate: torch.Tensor) -> float:
    """Bound on |bf16 product - exact similarity| for the entries of ``candidate @ query.T``
    that the exact engine relies on (see the module docstring), from the two inputs' actual
    rounding residuals: all entries below 1 in bf16, and all entries when some row has a norm
    well above 1."""
    return _bounds(_rounding_stats(query.float()), _rounding_stats(candidate.float()), query.shape[1])[0]




def _as_rows_and_columns(product: str, query: torch.Tensor, candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the product's rows, its columns): the candidate's cells as rows where
    :data:`CANDIDATE_ROWS` says so, else the query's."""
    return (candidate, query) if CANDIDATE_ROWS[product] else (query, candidate)


def _panels(rows: int, product: str) -> list[tuple[int, int]]:
    """[start, stop) row panels of a product of ``rows`` rows (:data:`PANEL_ROWS`)."""
    step = PANEL_ROWS[product] or max(rows, 1)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _screen_into(similarity: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, start: int, stop: int) -> None:
    """Rows [start, stop) of the screen product ``rows @ columns.T`` into ``similarity``."""
    torch.mm(rows[start:stop], columns.T, out=similarity[start:stop])


def _count_exact(
    similarity: torch.Tensor,
    query_screen: torch.Tensor,
    candidate_screen: torch.Tensor,
    product: str,
    query: torch.Tensor,
    candidate: torch.Tensor,
    threshold: float,
    eps: float,
    delta: float,
) -> int:
    """Exact count for one candidate: the screen product into ``similarity`` [n, m] panel by
    panel, each panel's rows scanned while still in cache, then the mutual check. ``query`` [n, D]
    plays the rows and ``candidate`` [m, D] the columns; the count is the same with the two
    images' roles swapped (:data:`CANDIDATE_ROWS`)."""
    query_np, candidate_np = query.numpy(), candidate.numpy()
    keys = screen_keys(similarity)
    key_values = KEY_VALUES if product == "bf16" else NO_KEY_VALUES
    # Each query cell's best candidate in the float32 GEMM, its exact value and (where contenders
    # were compared) its GEMM value.
    best_candidate, best_exact, best_gemm, column_block_max = outputs = kernels.row_best_outputs(keys)
    for start, stop in _panels(len(query), product):
        _screen_into(similarity, query_screen, candidate_screen, start, stop)
        kernels.exact_row_best(keys, start, stop, key_values, eps, delta, threshold, query_np, candidate_np, *outputs)
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
        keys, column_block_max, rows, partners, best_exact[rows], best_gemm[rows], key_values, eps, delta, query_np, candidate_np
    )


def mutual_match_scores(
    query: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    threshold: float = MATCH_THRESHOLD,
    product: str | None = None,
) -> torch.Tensor:
    """FoL re-ranking scores of one query against several candidates (docs/METHOD.md section 5).

    On the CPU the screen-then-exact engine above computes them; elsewhere (CUDA) the plain
    float32 algorithm does, on blocks of candidates at once. Every screen gives the same scores.

    Args:
        query: [n, 128] L2-normalised local descriptors of the query (a tensor or a NumPy array).
        candidates: one [m_j, 128] L2-normalised tensor (or array) per candidate image.
        threshold: cosine similarity a mutual match must exceed to count.
        product: the screen product, "bf16" or "fp32"; None: this host's
            (:func:`fol_plugin.host.screen_product`, ``$FOL_RERANK_PRODUCT`` when set).

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
    product = screen_product() if product is None else product
    if product not in SCREEN_PRODUCTS:
        raise HostSettingError(f"screen product {product!r}; choose one of {', '.join(SCREEN_PRODUCTS)}")
    query = query.float().contiguous()
    query_screen, query_stats = _screen_copy(query, product)
    candidates = [candidate.float().contiguous() for candidate in candidates]

    def score(index: int, buffer: torch.Tensor) -> int:
        candidate = candidates[index]
        candidate_screen, candidate_stats = _screen_copy(candidate, product)
        eps, delta = _bounds(query_stats, candidate_stats, query.shape[1], product)
        if threshold <= KEY_THRESHOLD_MARGIN * eps:  # the keys order positive values only
            return len(mutual_matches(query, candidate, threshold)[0])
        rows, columns = _as_rows_and_columns(product, query, candidate)
        screens = _as_rows_and_columns(product, query_screen, candidate_screen)
        similarity = buffer[: len(rows) * len(columns)].view(len(rows), len(columns))
        return _count_exact(similarity, *screens, product, rows, columns, threshold, eps, delta)

    return torch.tensor(_on_workers(score, len(query), candidates, SCREEN_DTYPES[product]), dtype=torch.float32)


def screen_products(query: torch.Tensor, candidates: Sequence[torch.Tensor]) -> None:
    """The engine's screen products alone, the floor it is measured against: the products
    :func:`mutual_match_scores` computes on the CPU, in the same panels, on the same workers into
    the same buffers, without the exact decisions (nor the inputs' conversion to the screen's dtype).

    Args:
        query: [n, D] bf16 or float32 (the screen's dtype).
        candidates: [m_j, D] of the query's dtype each.
    """
    product = next(name for name, dtype in SCREEN_DTYPES.items() if dtype == query.dtype)

    def multiply(index: int, buffer: torch.Tensor) -> int:
        rows, columns = _as_rows_and_columns(product, query, candidates[index])
        similarity = buffer[: len(rows) * len(columns)].view(len(rows), len(columns))
        for start, stop in _panels(len(rows), product):
            _screen_into(similarity, rows, columns, start, stop)
        return 0

    _on_workers(multiply, len(query), candidates, query.dtype)


def _on_workers(
    work: Callable[[int, torch.Tensor], int], query_cells: int, candidates: Sequence[torch.Tensor], dtype: torch.dtype
) -> list[int]:
    """``work(index, buffer)`` for each non-empty candidate, one candidate per worker at a time
    -> its result, 0 for empty candidates.

    Each worker computes one candidate's product into ``buffer`` (room for query_cells x the
    longest candidate in ``dtype``), and :func:`mutual_match_scores` scans it there while it is
    still in cache; numba and torch's matmul release the GIL. A buffer per worker, reused: fresh
    20+ MB tensors per candidate cost as much in page faults. One intra-op thread per worker: the
    workers are the parallelism (torch's setting is process-wide, and is restored when they finish).
    """
    results = [0] * len(candidates)
    nonempty = [index for index, candidate in enumerate(candidates) if len(candidate)]
    if not nonempty:
        return results
    workers = min(torch.get_num_threads(), len(nonempty))
    largest = max(len(candidates[index]) for index in nonempty)
    free_buffers: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
    for _ in range(workers):
        free_buffers.put(torch.empty(query_cells * largest, dtype=dtype))

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
