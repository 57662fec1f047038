"""numba scans over a screening similarity matrix, for the fast exact matcher (:mod:`.engine`).

The matrix ``S~ = Q~ D~^T`` [n, m] arrives as its raw bit patterns read as integers, the keys the
scans compare (int16 for a bf16 product, int32 for a float32 one): :mod:`.keys` says why they
order as the values do, and gives the thresholds and values of each kind.

One full pass (:func:`exact_row_best`) records the maxima of rows, columns and blocks of cells;
the later scans read only the blocks whose maximum reaches their threshold. Exact similarities
are float32 products summed in float64; where two cells are closer than float32 rounding,
:func:`gemm_value` recomputes the float32 GEMM's own value to decide as the original does. The
scans release the GIL, so callers can run several in threads.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numba
import xxhash
import numpy as np
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic

from ..cache.fingerprint import user_cache_dir
from .keys import key_below, key_value, lowest_key, no_threshold

ROW_BLOCK_CELLS = 64  # cells of a row per recorded block maximum
COLUMN_BLOCK_ROWS = 16  # rows of a column per recorded block maximum
SUB_BLOCK_CELLS = 16  # cells of a row block whose maximum is taken before testing them one by one
SCREEN_COLUMNS = 64  # columns whose block maxima the mutual check tests at once before one by one
PREFETCH_AHEAD = 2  # columns of a block of rows whose keys the mutual check asks for ahead of use
# Let LLVM reorder the float64 sums of the exact dot products, so they vectorise.
DOT_FASTMATH = {"reassoc", "contract"}
# Fused multiply-adds in order, never reordered: the float32 GEMM's own arithmetic.
GEMM_FASTMATH = {"contract"}


def _sources_digest() -> str:
    """xxh3 of the sources the cached kernels are compiled from: this module and :mod:`.keys`,
    whose inlined functions numba's own cache check (this file's time stamp) does not see."""
    digest = xxhash.xxh3_64()
    here = Path(__file__)
    for source in (here, here.with_name("keys.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()


SOURCES_DIGEST = _sources_digest()


def _cached_njit(**options) -> Callable:
    """``numba.njit(cache=True)``, its compiled cache in ``<user cache>/numba/<sources digest>``
    instead of beside the installed package (a ``NUMBA_CACHE_DIR`` of the user's own still wins),
    so that a change of either source compiles afresh. numba picks the cache folder when it
    decorates, so the setting is changed for that moment only."""

    def decorate(function: Callable) -> Callable:
        previous = numba.config.CACHE_DIR
        numba.config.CACHE_DIR = previous or str(user_cache_dir() / "numba" / SOURCES_DIGEST)
        try:
            return numba.njit(cache=True, **options)(function)
        finally:
            numba.config.CACHE_DIR = previous

    return decorate


@intrinsic
def _prefetch(typingctx, array, row, column):
    """Asks the CPU to bring ``array[row, column]`` into its caches, without waiting for it
    (LLVM's prefetch: a read, kept in all cache levels); for a C-contiguous 2-D array."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, args[1:], wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        word = ir.IntType(32)
        name = "llvm.prefetch.p0" if getattr(byte_pointer, "is_opaque", False) else "llvm.prefetch.p0i8"
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, word, word, word]), name
        )
        read, keep_in_all_levels, data_cache = (ir.Constant(word, value) for value in (0, 3, 1))
        builder.call(function, [builder.bitcast(pointer, byte_pointer), read, keep_in_all_levels, data_cache])
        return context.get_dummy_value()

    return numba.types.void(array, row, column), codegen


@numba.njit(inline="always")
def _dot(query: np.ndarray, j: int, candidate: np.ndarray, i: int) -> float:
    """query[j] . candidate[i], float32 products accumulated in float64."""
    total = 0.0
    for k in range(query.shape[1]):
        total += np.float64(query[j, k]) * np.float64(candidate[i, k])
    return total


@numba.njit(inline="always")
def _scan_row(row: np.ndarray, row_block_max: np.ndarray, column_block_max_row: np.ndarray) -> int:
    """Maximum key of one row; writes each ROW_BLOCK_CELLS block's maximum to ``row_block_max``
    and raises ``column_block_max_row`` (the running column maxima of the row's block of rows) to
    the row's keys."""
    m = row.shape[0]
    full_blocks = m // ROW_BLOCK_CELLS
    best = lowest_key(row)
    for c in range(row_block_max.shape[0]):
        start = c * ROW_BLOCK_CELLS
        block_best = lowest_key(row)
        if c < full_blocks:  # a fixed trip count vectorises
            for t in range(ROW_BLOCK_CELLS):
                k = row[start + t]
                block_best = max(block_best, k)
                column_block_max_row[start + t] = max(column_block_max_row[start + t], k)
        else:
            for i in range(start, m):
                k = row[i]
                block_best = max(block_best, k)
                column_block_max_row[i] = max(column_block_max_row[i], k)
        row_block_max[c] = block_best
        best = max(best, block_best)
    return best


@numba.njit(inline="always")
def _first_reaching(row: np.ndarray, row_block_max: np.ndarray, target: int) -> int:
    """Index of the first key of ``row`` equal to ``target``, its maximum, searching from the
    first ROW_BLOCK_CELLS block whose maximum (``row_block_max``) is the target."""
    index = 0
    while row_block_max[index // ROW_BLOCK_CELLS] != target:
        index += ROW_BLOCK_CELLS
    while row[index] != target:
        index += 1
    return index


@numba.njit(inline="always")
def _collect_reaching(row: np.ndarray, start: int, stop: int, floor: int, cells: np.ndarray, count: int) -> int:
    """Appends to ``cells[count:]`` the indices in [start, stop) of keys at or above ``floor``,
    in increasing order -> the new count. A full block is tested SUB_BLOCK_CELLS cells at a time
    by their maximum first; cells are kept by counting them, with no branch to mispredict."""
    if stop - start == ROW_BLOCK_CELLS:
        for sub in range(start, stop, SUB_BLOCK_CELLS):
            sub_best = lowest_key(row)
            for t in range(SUB_BLOCK_CELLS):  # a fixed trip count vectorises
                sub_best = max(sub_best, row[sub + t])
            if sub_best >= floor:
                for i in range(sub, sub + SUB_BLOCK_CELLS):
                    cells[count] = i
                    count += row[i] >= floor
    else:
        for i in range(start, stop):
            cells[count] = i
            count += row[i] >= floor
    return count



@_cached_njit(nogil=True, fastmath=GEMM_FASTMATH)
def gemm_value(query: np.ndarray, j: int, candidate: np.ndarray, i: int) -> np.float32:
    """candidate[i] . query[j] as torch's float32 CPU matmul computes it: one fused multiply-add
    per term, in order (checked bit for bit by the tests)."""
    total = np.float32(0.0)
    for k in range(query.shape[1]):
        total = total + candidate[i, k] * query[j, k]
    return total


@_cached_njit(nogil=True, fastmath=DOT_FASTMATH)
def exact_row_best(
    keys: np.ndarray,
    first_row: int,
    last_row: int,
    key_values: np.ndarray,
    eps: float,
    delta: float,
    threshold: float,
    query: np.ndarray,
    candidate: np.ndarray,
    best_arg: np.ndarray,
    best_exact: np.ndarray,
    best_gemm: np.ndarray,
    column_block_max: np.ndarray,
) -> None:
    """One pass over rows [first_row, last_row) (a panel the caller has just computed, so still in
    cache): the maxima of rows and of blocks of cells, and, while each row is still in cache, the
    float32 GEMM's arg-max of every row whose screen maximum exceeds ``threshold - eps - delta``
    (its first column on ties).

    The exact value E of the row's first screen arg-max bounds the maximum from below, so only
    cells at or above ``E - eps - 2 delta`` in the screen can win; their exact values (float64 sums)
    leave as contenders the cells within ``2 delta`` of the best. A lone contender is the arg-max;
    between several, :func:`gemm_value` decides.

    Args:
        keys: [n, m] the screen product's keys (int16 for bf16, int32 for float32).
        key_values: [65536] float value of bf16 key k at k + KEY_OFFSET, non-decreasing (unused
            for float32 keys).
        eps: bound on |screen product - exact similarity|.
        delta: bound on |float32 GEMM value - exact similarity|.
        threshold: positive, above ``3 eps``.

    Writes the panel's rows of (from :func:`row_best_outputs`) best_arg [n] (-1 where the row
    cannot count), best_exact [n] (the arg-max's exact value; -inf there), best_gemm [n] (its
    float32 GEMM value where contenders were compared, NaN where it was alone), and raises
    column_block_max [ceil(n / COLUMN_BLOCK_ROWS), m], the maxima of blocks of
    ``COLUMN_BLOCK_ROWS`` rows of each column, to the panel's keys.
    """
    m = keys.shape[1]
    num_blocks = (m + ROW_BLOCK_CELLS - 1) // ROW_BLOCK_CELLS
    row_block_max = np.empty(num_blocks, keys.dtype)
    cells = np.empty(m, np.int64)
    exact = np.empty(m, np.float64)
    for j in range(first_row, last_row):
        row = keys[j]
        best = _scan_row(row, row_block_max, column_block_max[j // COLUMN_BLOCK_ROWS])
        if key_value(keys, key_values, best) <= threshold - eps - delta:
            continue
        first = _first_reaching(row, row_block_max, best)
        first_exact = _dot(query, j, candidate, first)
        # Any key at or below the window's lower end keeps every cell of the window.
        window = key_below(keys, key_values, first_exact - eps - 2 * delta)
        count = 0
        for c in range(num_blocks):
            if row_block_max[c] >= window:
                count = _collect_reaching(row, c * ROW_BLOCK_CELLS, min(c * ROW_BLOCK_CELLS + ROW_BLOCK_CELLS, m), window, cells, count)
        top = -np.inf
        for t in range(count):
            value = first_exact if cells[t] == first else _dot(query, j, candidate, cells[t])
            exact[t] = value
            top = max(top, value)
        contenders = 0
        for t in range(count):  # cells in increasing order: strict > keeps the first on ties
            if exact[t] >= top - 2 * delta:
                contenders += 1
                if contenders == 1:
                    best_arg[j] = cells[t]
                    best_exact[j] = exact[t]
                    continue
                if contenders == 2:
                    best_gemm[j] = gemm_value(query, j, candidate, best_arg[j])
                value = gemm_value(query, j, candidate, cells[t])
                if value > best_gemm[j]:
                    best_gemm[j] = value
                    best_arg[j] = cells[t]
                    best_exact[j] = exact[t]


def row_best_outputs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The arrays :func:`exact_row_best` fills for ``keys`` [n, m], before any row is scanned:
    best_arg [n] -1, best_exact [n] -inf, best_gemm [n] NaN and column_block_max the lowest key."""
    n, m = keys.shape
    column_block_max = np.full(((n + COLUMN_BLOCK_ROWS - 1) // COLUMN_BLOCK_ROWS, m), np.iinfo(keys.dtype).min, keys.dtype)
    return np.full(n, -1, np.int64), np.full(n, -np.inf), np.full(n, np.nan), column_block_max


@_cached_njit(nogil=True, fastmath=DOT_FASTMATH)
def rounding_stats(x: np.ndarray, rounded_bits: np.ndarray) -> tuple[float, float, float]:
    """Largest row norm of ``x`` [N, D] float32, of its bf16 copy (``rounded_bits``, the copy's
    bit patterns as int16) and of the rounding residual, in one pass (float64 sums)."""
    norm = rounded_norm = residual_norm = 0.0
    bits = np.empty(x.shape[1], np.uint32)
    row = bits.view(np.float32)  # a bf16 value is the upper half of its float32's bits
    for r in range(x.shape[0]):
        for k in range(x.shape[1]):
            bits[k] = np.uint32(np.uint16(rounded_bits[r, k])) << np.uint32(16)
        total = rounded_total = residual_total = 0.0
        for k in range(x.shape[1]):
            value = np.float64(x[r, k])
            rounded = np.float64(row[k])
            total += value * value
            rounded_total += rounded * rounded
            residual_total += (value - rounded) * (value - rounded)
        norm = max(norm, total)
        rounded_norm = max(rounded_norm, rounded_total)
        residual_norm = max(residual_norm, residual_total)
    return np.sqrt(norm), np.sqrt(rounded_norm), np.sqrt(residual_norm)


@numba.njit(inline="always")
def _prefetch_column(keys: np.ndarray, first_row: int, last_row: int, column: int) -> None:
    """Asks for ``keys[first_row:last_row, column]`` ahead of use (:func:`_prefetch`)."""
    for j in range(first_row, last_row):
        _prefetch(keys, j, column)


@numba.njit(inline="always")
def _collect_reached(block_max: np.ndarray, col_threshold: np.ndarray, reached: np.ndarray) -> int:
    """Writes to ``reached`` the columns i, increasing, where ``block_max[i] >= col_threshold[i]``
    -> their number. SCREEN_COLUMNS columns are tested at once (vectorised), and only those that
    some column reaches one by one, kept by counting them, with no branch to mispredict."""
    m = len(block_max)
    whole = m - m % SCREEN_COLUMNS
    count = 0
    for start in range(0, whole, SCREEN_COLUMNS):
        any_reached = False
        for t in range(SCREEN_COLUMNS):  # a fixed trip count vectorises
            any_reached |= block_max[start + t] >= col_threshold[start + t]
        if any_reached:
            for i in range(start, start + SCREEN_COLUMNS):
                reached[count] = i
                count += block_max[i] >= col_threshold[i]
    for i in range(whole, m):
        reached[count] = i
        count += block_max[i] >= col_threshold[i]
    return count


@numba.njit(inline="always")
def _lowest_bit(mask: int) -> int:
    """Index of the lowest set bit of a non-zero ``mask``."""
    index = 0
    while not (mask >> index) & 1:
        index += 1
    return index


@numba.njit(inline="always")
def _pair_gemm(known: float, query: np.ndarray, j: int, candidate: np.ndarray, i: int) -> float:
    """The float32 GEMM value of (j, i): ``known`` unless NaN (not computed yet)."""
    return gemm_value(query, j, candidate, i) if np.isnan(known) else known


@_cached_njit(nogil=True, fastmath=DOT_FASTMATH)
def count_unbeaten_anchors(
    keys: np.ndarray,
    column_block_max: np.ndarray,
    rows: np.ndarray,
    partners: np.ndarray,
    exacts: np.ndarray,
    gemms: np.ndarray,
    key_values: np.ndarray,
    eps: float,
    delta: float,
    query: np.ndarray,
    candidate: np.ndarray,
) -> int:
    """Mutual matches among the pairs (rows[t], partners[t]) (query cell, its GEMM arg-max),
    rows increasing, ``exacts`` their exact values, ``gemms`` their float32 GEMM values (NaN
    where not computed yet).

    Each claimed column keeps its strongest claimant in the GEMM, the first row on ties (the
    anchor): the only row the column's arg-max can be among the claimants. The pair is mutual
    unless another row beats the anchor; only rows at or above ``exact - eps - 2 delta`` in the
    screen can. They are looked for one block of ``COLUMN_BLOCK_ROWS`` rows at a time across all the
    columns (the block's maxima read in order, not a column's down the whole product); exact
    values settle every row farther than ``2 delta`` from the anchor, :func:`gemm_value` the rest.
    """
    n, m = keys.shape
    top = np.full(m, -np.inf)
    for t in range(len(rows)):
        top[partners[t]] = max(top[partners[t]], exacts[t])
    anchor_row = np.full(m, -1, np.int64)
    anchor_exact = np.full(m, -np.inf)
    anchor_gemm = np.full(m, np.nan)
    for t in range(len(rows)):  # increasing rows: strict > keeps the first on ties
        i, j = partners[t], rows[t]
        if exacts[t] < top[i] - 2 * delta:
            continue
        if anchor_row[i] < 0:
            anchor_row[i], anchor_exact[i], anchor_gemm[i] = j, exacts[t], gemms[t]
            continue
        anchor_gemm[i] = _pair_gemm(anchor_gemm[i], query, anchor_row[i], candidate, i)
        value = _pair_gemm(gemms[t], query, j, candidate, i)
        if value > anchor_gemm[i]:
            anchor_row[i], anchor_exact[i], anchor_gemm[i] = j, exacts[t], value
    col_threshold = np.full(m, no_threshold(keys))
    claimed = 0
    for i in range(m):
        if anchor_row[i] >= 0:
            col_threshold[i] = key_below(keys, key_values, anchor_exact[i] - eps - 2 * delta)
            claimed += 1
    beaten = 0
    reached = np.empty(m, np.int64)
    for b in range(column_block_max.shape[0]):
        block_max = column_block_max[b]
        first_row = b * COLUMN_BLOCK_ROWS
        # The columns whose threshold this block of rows reaches; then, per column, the mask of
        # its rows that reach it: independent loads, asked for a few columns ahead, so that the
        # cache misses overlap.
        count = _collect_reached(block_max, col_threshold, reached)
        last_row = min(first_row + COLUMN_BLOCK_ROWS, n)
        for t in range(min(PREFETCH_AHEAD, count)):
            _prefetch_column(keys, first_row, last_row, reached[t])
        for t in range(count):
            if t + PREFETCH_AHEAD < count:
                _prefetch_column(keys, first_row, last_row, reached[t + PREFETCH_AHEAD])
            i = reached[t]
            mask = 0
            for j in range(first_row, last_row):
                mask |= np.int64(keys[j, i] >= col_threshold[i]) << (j - first_row)
            anchor = anchor_row[i]
            while mask:
                j = first_row + _lowest_bit(mask)
                mask &= mask - 1
                if j == anchor:
                    continue
                value = _dot(query, j, candidate, i)
                if value < anchor_exact[i] - 2 * delta:
                    continue
                if value <= anchor_exact[i] + 2 * delta:
                    anchor_gemm[i] = _pair_gemm(anchor_gemm[i], query, anchor, candidate, i)
                    value = gemm_value(query, j, candidate, i)
                    if not (value > anchor_gemm[i] or (value == anchor_gemm[i] and j < anchor)):
                        continue
                col_threshold[i] = no_threshold(keys)  # beaten: no row can unbeat it
                beaten += 1
                break
    return claimed - beaten
