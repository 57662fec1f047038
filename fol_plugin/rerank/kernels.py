"""numba scans over a bf16 similarity matrix, for the fast exact matcher (:mod:`.engine`).

The matrix ``S~ = bf16(Q) bf16(D)^T`` [n, m] arrives as its raw bf16 bit patterns (uint16). Each
pattern is mapped to an order key (an integer whose order is the float order), so the scans
compare integers: for a sign bit s, ``key = bits ^ (s * 0x7FFF | 0x8000)``. Thresholds use the
same keys; :data:`NO_THRESHOLD` is above every key. One full pass (:func:`scan_maxima`) records
the maxima of rows, columns and blocks of CHUNK cells; the exact scans then read only the blocks
whose maximum reaches their threshold. Exact similarities are float32 dot products accumulated in
float64. The scans release the GIL, so callers can run several in threads.
"""
from __future__ import annotations

import numba
import numpy as np

NO_THRESHOLD = 1 << 16
CHUNK = 64  # cells per block whose maximum is recorded
# Let LLVM reorder the float64 sums of the exact dot products, so they vectorise.
DOT_FASTMATH = {"reassoc", "contract"}


@numba.njit(inline="always")
def _key(bits: np.uint16) -> np.int32:
    value = np.int32(bits)
    return value ^ (((value >> 15) * 0x7FFF) | 0x8000)


@numba.njit(inline="always")
def _dot(query: np.ndarray, j: int, candidate: np.ndarray, i: int) -> float:
    """query[j] . candidate[i], float32 products accumulated in float64."""
    total = 0.0
    for k in range(query.shape[1]):
        total += np.float64(query[j, k]) * np.float64(candidate[i, k])
    return total


@numba.njit(inline="always")
def _scan_row(row: np.ndarray, chunk_key: np.ndarray, col_block_key: np.ndarray) -> np.int32:
    """Maximum key of one row; writes each CHUNK block's maximum to ``chunk_key`` and raises
    ``col_block_key`` (the running column maxima of the row's block of rows) to the row's keys."""
    m = row.shape[0]
    full_chunks = m // CHUNK
    best = np.int32(-1)
    for c in range(chunk_key.shape[0]):
        start = c * CHUNK
        chunk_best = np.int32(-1)
        if c < full_chunks:  # a fixed trip count vectorises
            for t in range(CHUNK):
                k = _key(row[start + t])
                chunk_best = max(chunk_best, k)
                col_block_key[start + t] = max(col_block_key[start + t], k)
        else:
            for i in range(start, m):
                k = _key(row[i])
                chunk_best = max(chunk_best, k)
                col_block_key[i] = max(col_block_key[i], k)
        chunk_key[c] = chunk_best
        best = max(best, chunk_best)
    return best


@numba.njit(nogil=True, cache=True)
def scan_maxima(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Maximum keys of ``bits`` [n, m] per row, per column, and per block of CHUNK cells.

    Returns:
        row_key [n], col_key [m], row_chunk_key [n, ceil(m / CHUNK)] (row j, columns c*CHUNK...),
        col_chunk_key [ceil(n / CHUNK), m] (rows b*CHUNK..., column i).
    """
    n, m = bits.shape
    num_chunks = (m + CHUNK - 1) // CHUNK
    row_key = np.empty(n, np.int32)
    col_key = np.full(m, -1, np.int32)
    row_chunk_key = np.empty((n, num_chunks), np.int32)
    col_chunk_key = np.full(((n + CHUNK - 1) // CHUNK, m), -1, np.int32)
    for j in range(n):
        row_key[j] = _scan_row(bits[j], row_chunk_key[j], col_chunk_key[j // CHUNK])
    for b in range(col_chunk_key.shape[0]):
        for i in range(m):
            col_key[i] = max(col_key[i], col_chunk_key[b, i])
    return row_key, col_key, row_chunk_key, col_chunk_key


@numba.njit(inline="always")
def _first_reaching(line: np.ndarray, block_keys: np.ndarray, target: np.int32) -> int:
    """Index of the first key of ``line`` equal to ``target``, its maximum, searching from the
    first block of CHUNK cells whose maximum (``block_keys``) is the target."""
    block = 0
    while block_keys[block] != target:
        block += 1
    index = block * CHUNK
    while _key(line[index]) != target:
        index += 1
    return index


@numba.njit(nogil=True, cache=True)
def first_arg_maxima(
    bits: np.ndarray, row_key: np.ndarray, col_key: np.ndarray, row_chunk_key: np.ndarray, col_chunk_key: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """First column reaching each row's maximum key [n], and first row reaching each column's
    [m], reading only the first block that holds the maximum."""
    n, m = bits.shape
    row_arg = np.empty(n, np.int64)
    col_arg = np.empty(m, np.int64)
    for j in range(n):
        row_arg[j] = _first_reaching(bits[j], row_chunk_key[j], row_key[j])
    for i in range(m):
        col_arg[i] = _first_reaching(bits[:, i], col_chunk_key[:, i], col_key[i])
    return row_arg, col_arg


@numba.njit(nogil=True, cache=True, fastmath=DOT_FASTMATH)
def exact_row_best(
    bits: np.ndarray, key_values: np.ndarray, eps: float, threshold: float, query: np.ndarray, candidate: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass: the maxima of :func:`scan_maxima`, and, while each row is still in cache, the
    exact best candidate of every row whose maximum exceeds ``threshold - eps``, among its cells
    within ``2 eps`` of that maximum: the first column of maximal exact similarity.

    Args:
        key_values: [65536] float value of each key, non-decreasing.

    Returns:
        best_arg [n] (-1 where the row cannot count), best_value [n] (-inf there), and
        col_chunk_key as in :func:`scan_maxima`.
    """
    n, m = bits.shape
    num_chunks = (m + CHUNK - 1) // CHUNK
    chunk_key = np.empty(num_chunks, np.int32)
    col_chunk_key = np.full(((n + CHUNK - 1) // CHUNK, m), -1, np.int32)
    best_arg = np.full(n, -1, np.int64)
    best_value = np.full(n, -np.inf)
    for j in range(n):
        row = bits[j]
        best = _scan_row(row, chunk_key, col_chunk_key[j // CHUNK])
        if key_values[best] <= threshold - eps:
            continue
        # Any key at or below the window's lower end keeps every cell of the window.
        window = np.searchsorted(key_values, key_values[best] - 2 * eps) - 1
        for c in range(num_chunks):
            if chunk_key[c] < window:
                continue
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, m)):
                if _key(row[i]) >= window:
                    value = _dot(query, j, candidate, i)
                    if value > best_value[j]:
                        best_value[j] = value
                        best_arg[j] = i
    return best_arg, best_value, col_chunk_key


@numba.njit(nogil=True, cache=True, fastmath=DOT_FASTMATH)
def beaten_anchors(
    bits: np.ndarray,
    col_chunk_key: np.ndarray,
    columns: np.ndarray,
    col_threshold: np.ndarray,
    anchor_row: np.ndarray,
    anchor_value: np.ndarray,
    query: np.ndarray,
    candidate: np.ndarray,
) -> np.ndarray:
    """For each listed column i with an anchor (row ``anchor_row[i]``, exact similarity
    ``anchor_value[i]``): whether a row at or above the column's threshold key beats it, i.e. has
    a larger exact similarity, or an equal one at a smaller row index. -> [len(columns)] bool."""
    n = bits.shape[0]
    beaten = np.zeros(len(columns), np.bool_)
    for index in range(len(columns)):
        i = columns[index]
        threshold = col_threshold[i]
        for b in range(col_chunk_key.shape[0]):
            if beaten[index]:
                break
            if col_chunk_key[b, i] < threshold:
                continue
            for j in range(b * CHUNK, min(b * CHUNK + CHUNK, n)):
                if j != anchor_row[i] and _key(bits[j, i]) >= threshold:
                    value = _dot(query, j, candidate, i)
                    if value > anchor_value[i] or (value == anchor_value[i] and j < anchor_row[i]):
                        beaten[index] = True
                        break
    return beaten
