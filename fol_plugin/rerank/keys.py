"""A screen product's values as integer keys, which the numba scans of :mod:`.kernels` compare.

The product ``S~ = Q~ D~^T`` [n, m] is read as its raw bit patterns: int16 for a bf16 product,
int32 for a float32 one (:func:`screen_keys`). Among non-negative values the key order is the
float order, and every negative value has a negative key, below them all (though negative keys
are not in float order). The scans only decide on positive thresholds, so the keys serve as they
are. Thresholds are keys too: :func:`no_threshold` is above every key, :func:`lowest_key` at or
below every key, :func:`key_below` the largest key below a value. A bf16 key's value is read from
a table (:data:`KEY_VALUES`); a float32 key's from its bits (the table is unused there).

The numba functions here are compiled into the cached kernels of :mod:`.kernels`, whose cache
folder is named by the source of both modules (``kernels._cached_njit``): editing this one
recompiles them.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

KEY_MIN = -(1 << 15)  # bf16 keys (int16)
NO_THRESHOLD = 1 << 16  # above every bf16 key (an int32 threshold)
FLOAT32_KEY_MIN = -(1 << 31)  # float32 keys (int32)
FLOAT32_NO_THRESHOLD = 1 << 32  # above every float32 key (an int64 threshold)
KEY_OFFSET = 1 << 15  # key k has its float value at key_values[k + KEY_OFFSET]
BF16_MANTISSA_STEPS = 128  # 7 stored mantissa bits
BF16_EXPONENT_BIAS = 127
SMALLEST_NORMAL = 2.0**-126
POSITIVE_INFINITY_KEY = 0x7F80
KEY_DTYPES = {torch.bfloat16: torch.int16, torch.float32: torch.int32}  # a screen value's bits read as keys


def screen_keys(similarity: torch.Tensor) -> np.ndarray:
    """A screen product's bit patterns read as integers (int16 for bf16, int32 for float32):
    the keys :mod:`.kernels` compares."""
    return similarity.view(KEY_DTYPES[similarity.dtype]).numpy()


def _key_values() -> np.ndarray:
    """Float value of every bf16 key [65536] (key k at k + KEY_OFFSET), non-decreasing: every
    negative key takes -inf (only positive thresholds are compared) and the NaN patterns +inf."""
    keys = np.arange(-KEY_OFFSET, KEY_OFFSET, dtype=np.int32)
    values = np.full(len(keys), -np.inf)
    positive = (keys >= 0) & (keys <= POSITIVE_INFINITY_KEY)
    values[positive] = (keys[positive].astype(np.uint32) << 16).view(np.float32)
    values[keys > POSITIVE_INFINITY_KEY] = np.inf
    return values


KEY_VALUES = _key_values()
NO_KEY_VALUES = np.empty(0)  # float32 keys carry their values in their bits


@intrinsic
def _float32_bits(typingctx, value):
    """The bits of a float32 read as an int32 (LLVM's bitcast)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bits are the int32 ``bits`` (LLVM's bitcast)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


# Functions of the keys' kind (int16 for bf16, int32 for float32), for the kernels only: numba
# compiles each from its overload below, by the dtype of ``keys``; they have no Python body.


def lowest_key(keys: np.ndarray):
    """A key at or below every key of ``keys``' kind."""


def no_threshold(keys: np.ndarray):
    """A threshold above every key of ``keys``' kind."""


def key_value(keys: np.ndarray, key_values: np.ndarray, key):
    """The float value of ``key`` (-inf for every negative key), as float64."""


def key_below(keys: np.ndarray, key_values: np.ndarray, x: float):
    """The largest key of ``keys``' kind whose value is below ``x``."""


def _is_bf16(keys) -> bool:
    return keys.dtype == types.int16


@overload(lowest_key, inline="always")
def _lowest_key_kind(keys):
    if _is_bf16(keys):
        return lambda keys: np.int16(KEY_MIN)
    return lambda keys: np.int32(FLOAT32_KEY_MIN)


@overload(no_threshold, inline="always")
def _no_threshold_kind(keys):
    if _is_bf16(keys):
        return lambda keys: np.int32(NO_THRESHOLD)
    return lambda keys: np.int64(FLOAT32_NO_THRESHOLD)


@overload(key_value, inline="always")
def _key_value_kind(keys, key_values, key):
    if _is_bf16(keys):
        return lambda keys, key_values, key: key_values[key + KEY_OFFSET]
    return lambda keys, key_values, key: np.float64(_float32_from_bits(np.int32(key))) if key >= 0 else -np.inf


@overload(key_below, inline="always")
def _key_below_kind(keys, key_values, x):
    if _is_bf16(keys):
        return lambda keys, key_values, x: _bf16_key_below(key_values, x)
    return lambda keys, key_values, x: _float32_key_below(x)


@numba.njit(inline="always")
def _bf16_key_below(key_values: np.ndarray, x: float) -> int:
    """The largest bf16 key whose value is below ``x``: ``searchsorted(key_values, x) - 1 - KEY_OFFSET``,
    from ``x``'s own exponent and mantissa and a step or two along the table (no binary search
    through its 512 KB)."""
    if not SMALLEST_NORMAL <= x < np.inf:  # zero, negative, subnormal, infinite or NaN: the plain search
        return np.searchsorted(key_values, x) - 1 - KEY_OFFSET
    mantissa, exponent = math.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    key = min(
        (exponent - 1 + BF16_EXPONENT_BIAS) * BF16_MANTISSA_STEPS + int((2 * mantissa - 1) * BF16_MANTISSA_STEPS),
        KEY_OFFSET - 2,
    )
    while key >= -KEY_OFFSET and key_values[key + KEY_OFFSET] >= x:
        key -= 1
    while key_values[key + 1 + KEY_OFFSET] < x:
        key += 1
    return key


@numba.njit(inline="always")
def _float32_key_below(x: float) -> int:
    """The largest float32 key whose value is below ``x``: the bits of the float32 just below it."""
    if not x > 0:  # every negative key has the value -inf; key 0 is +0.0
        return -1
    nearest = np.float32(x)
    if np.float64(nearest) >= x:
        nearest = np.nextafter(nearest, np.float32(-np.inf))
    return _float32_bits(nearest)

