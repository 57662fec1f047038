"""numba scans over a bf16 similarity matrix, for the fast exact matcher (:mod:`.engine`).

The matrix ``S~ = bf16(Q) bf16(D)^T`` [n, m] arrives as its raw bf16 bit patterns read as int16,
the keys the scans compare. Among non-negative values the key order is the float order, and every
negative value has a negative key, below them all (though negative keys are not in float order).
The scans only decide on positive thresholds, so the keys serve as they are. Thresholds are keys
too; :data:`NO_THRESHOLD` is above every key, :data:`KEY_MIN` at or below every key. One full pass (:func:`scan_maxima`) records
the maxima of rows, columns and blocks of cells; the exact scans then read only the blocks
whose maximum reaches their threshold. Exact similarities are float32 dot products accumulated in
float64. The scans release the GIL, so callers can run several in threads.
"""
from __future__ import annotations

import numba
import numpy as np

NO_THRESHOLD = 1 << 16
KEY_MIN = -(1 << 15)
KEY_OFFSET = 1 << 15  # key k has its float value at key_values[k + KEY_OFFSET]
CELL_BLOCK = 64  # cells of a row per recorded block maximum
ROW_BLOCK = 64  # rows of a column per recorded block maximum
# Let LLVM reorder the float64 sums of the exact dot products, so they vectorise.
DOT_FASTMATH = {"reassoc", "contract"}


@numba.njit(inline="always")
def _dot(query: np.ndarray, j: int, candidate: np.ndarray, i: int) -> float:
    """query[j] . candidate[i], float32 products accumulated in float64."""
    total = 0.0
    for k in range(query.shape[1]):
        total += np.float64(query[j, k]) * np.float64(candidate[i, k])
    return total


@numba.njit(inline="always")
def _scan_row(row: np.ndarray, chunk_key: np.ndarray, col_block_key: np.ndarray) -> np.int16:
    """Maximum key of one row; writes each CELL_BLOCK block's maximum to ``chunk_key`` and raises
    ``col_block_key`` (the running column maxima of the row's block of rows) to the row's keys."""
    m = row.shape[0]
    full_chunks = m // CELL_BLOCK
    best = np.int16(KEY_MIN)
    for c in range(chunk_key.shape[0]):
        start = c * CELL_BLOCK
        chunk_best = np.int16(KEY_MIN)
        if c < full_chunks:  # a fixed trip count vectorises
            for t in range(CELL_BLOCK):
                k = row[start + t]
                chunk_best = max(chunk_best, k)
                col_block_key[start + t] = max(col_block_key[start + t], k)
        else:
            for i in range(start, m):
                k = row[i]
                chunk_best = max(chunk_best, k)
                col_block_key[i] = max(col_block_key[i], k)
        chunk_key[c] = chunk_best
        best = max(best, chunk_best)
    return best


@numba.njit(nogil=True, cache=True)
def scan_maxima(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Maximum keys of ``keys`` [n, m] per row, per column, and per block of cells.

    Returns:
        row_key [n], col_key [m], row_chunk_key [n, ceil(m / CELL_BLOCK)] (row j, columns
        c*CELL_BLOCK...), col_chunk_key [ceil(n / ROW_BLOCK), m] (rows b*ROW_BLOCK..., column i).
    """
    n, m = keys.shape
    num_chunks = (m + CELL_BLOCK - 1) // CELL_BLOCK
    row_key = np.empty(n, np.int16)
    col_key = np.full(m, KEY_MIN, np.int16)
    row_chunk_key = np.empty((n, num_chunks), np.int16)
    col_chunk_key = np.full(((n + ROW_BLOCK - 1) // ROW_BLOCK, m), KEY_MIN, np.int16)
    for j in range(n):
        row_key[j] = _scan_row(keys[j], row_chunk_key[j], col_chunk_key[j // ROW_BLOCK])
    for b in range(col_chunk_key.shape[0]):
        for i in range(m):
            col_key[i] = max(col_key[i], col_chunk_key[b, i])
    return row_key, col_key, row_chunk_key, col_chunk_key


@numba.njit(inline="always")
def _first_reaching(line: np.ndarray, block_keys: np.ndarray, block: int, target: np.int16) -> int:
    """Index of the first key of ``line`` equal to ``target``, its maximum, searching from the
    first block of ``block`` cells whose maximum (``block_keys``) is the target."""
    index = 0
    while block_keys[index // block] != target:
        index += block
    while line[index] != target:
        index += 1
    return index


@numba.njit(nogil=True, cache=True)
def first_arg_maxima(
    keys: np.ndarray, row_key: np.ndarray, col_key: np.ndarray, row_chunk_key: np.ndarray, col_chunk_key: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """First column reaching each row's maximum key [n], and first row reaching each column's
    [m], reading only the first block that holds the maximum."""
    n, m = keys.shape
    row_arg = np.empty(n, np.int64)
    col_arg = np.empty(m, np.int64)
    for j in range(n):
        row_arg[j] = _first_reaching(keys[j], row_chunk_key[j], CELL_BLOCK, row_key[j])
    for i in range(m):
        col_arg[i] = _first_reaching(keys[:, i], col_chunk_key[:, i], ROW_BLOCK, col_key[i])
    return row_arg, col_arg


@numba.njit(nogil=True, cache=True, fastmath=DOT_FASTMATH)
def exact_row_best(
    keys: np.ndarray, key_values: np.ndarray, eps: float, threshold: float, query: np.ndarray, candidate: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass: the maxima of :func:`scan_maxima`, and, while each row is still in cache, the
    exact best candidate of every row whose maximum exceeds ``threshold - eps``: the first
    column of maximal exact similarity. The exact value L of the row's first bf16 arg-max
    bounds that maximum from below, so only cells at or above ``L - eps`` are re-computed.

    Args:
        key_values: [65536] float value of key k at k + KEY_OFFSET, non-decreasing.
        threshold: positive, above ``3 eps``.

    Returns:
        best_arg [n] (-1 where the row cannot count), best_value [n] (-inf there), and
        col_chunk_key as in :func:`scan_maxima`.
    """
    n, m = keys.shape
    num_chunks = (m + CELL_BLOCK - 1) // CELL_BLOCK
    chunk_key = np.empty(num_chunks, np.int16)
    col_chunk_key = np.full(((n + ROW_BLOCK - 1) // ROW_BLOCK, m), KEY_MIN, np.int16)
    best_arg = np.full(n, -1, np.int64)
    best_value = np.full(n, -np.inf)
    for j in range(n):
        row = keys[j]
        best = _scan_row(row, chunk_key, col_chunk_key[j // ROW_BLOCK])
        if key_values[best + KEY_OFFSET] <= threshold - eps:
            continue
        first = _first_reaching(row, chunk_key, CELL_BLOCK, best)
        best_arg[j] = first
        best_value[j] = _dot(query, j, candidate, first)
        # Any key at or below the window's lower end keeps every cell of the window.
        window = np.searchsorted(key_values, best_value[j] - eps) - 1 - KEY_OFFSET
        for c in range(num_chunks):
            if chunk_key[c] < window:
                continue
            for i in range(c * CELL_BLOCK, min(c * CELL_BLOCK + CELL_BLOCK, m)):
                if row[i] >= window and i != first:
                    value = _dot(query, j, candidate, i)
                    if value > best_value[j] or (value == best_value[j] and i < best_arg[j]):
                        best_value[j] = value
                        best_arg[j] = i
    return best_arg, best_value, col_chunk_key


@numba.njit(nogil=True, cache=True, fastmath=DOT_FASTMATH)
def beaten_anchors(
    keys: np.ndarray,
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
    n = keys.shape[0]
    beaten = np.zeros(len(columns), np.bool_)
    for index in range(len(columns)):
        i = columns[index]
        threshold = col_threshold[i]
        for b in range(col_chunk_key.shape[0]):
            if beaten[index]:
                break
            if col_chunk_key[b, i] < threshold:
                continue
            for j in range(b * ROW_BLOCK, min(b * ROW_BLOCK + ROW_BLOCK, n)):
                if j != anchor_row[i] and keys[j, i] >= threshold:
                    value = _dot(query, j, candidate, i)
                    if value > anchor_value[i] or (value == anchor_value[i] and j < anchor_row[i]):
                        beaten[index] = True
                        break
    return beaten
