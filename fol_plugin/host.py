"""What this CPU computes natively, and so which arithmetic fol-plugin uses on it.

The kind of host decides two things: the product the exact re-ranking engine screens with
(:func:`screen_product`) and the precision ``--extraction_precision auto`` extracts in
(:func:`auto_extraction_precision`). Kinds, from /proc/cpuinfo's flags:

========================  =================================  ===============  ==============
kind                      flags                              bf16 products    screen product
========================  =================================  ===============  ==============
``AMX``                   ``amx_bf16``                       native (tiles)   bf16
``AVX-512 BF16``          ``avx512_bf16``                    native           bf16
``Arm bf16``              ``bf16`` (Arm's Features)          native           bf16
``AVX-512``               ``avx512f``                        emulated         fp32
``AVX2``                  ``avx2``                           emulated         fp32
========================  =================================  ===============  ==============

A host whose libraries are capped below its hardware (``ONEDNN_MAX_CPU_ISA``,
``ATEN_CPU_CAPABILITY``, as the benchmarks do to emulate the kinds below theirs) computes as the
capped kind, and :attr:`Host.emulated` says so. Where the flags cannot tell (no /proc/cpuinfo:
macOS, Windows), a micro-measurement of a bf16 product against a float32 one decides; it is
cached per host in ``<user cache>/host``, as is every measured slow-down.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache.fingerprint import user_cache_dir
from .errors import UserError
from .files import read_json, write_json

logger = logging.getLogger(__name__)

PRODUCT_ENV = "FOL_RERANK_PRODUCT"  # forces the engine's screen product: one of SCREEN_PRODUCTS
SCREEN_PRODUCTS = ("bf16", "fp32")
NATIVE_BF16_KINDS = ("AMX", "AVX-512 BF16", "Arm bf16")
X86_KINDS = ("AMX", "AVX-512 BF16", "AVX-512", "AVX2")  # from the most capable down
# Micro-measurement: a product of this shape, timed this many times after a warm-up (median).
PROBE_SHAPE = (1024, 128, 1024)
PROBE_REPEATS = 5
# Slower than float32 by more than this, a reduced precision is taken as emulated.
EMULATED_SLOWDOWN = 1.2
MEASUREMENTS_FOLDER = "host"


# The settings that make a host compute as a kind below its own, for benchmarks and tests: the
# libraries' instruction sets capped (oneDNN's bf16 and fp32 kernels, ATen's vectorised code, MKL's
# float32 products) and numba's kernels compiled for a CPU of that kind. Measured on an AVX-512 BF16
# host as AVX2: a bf16 product 8-9x slower than float32 (a real AVX2 host: 15-24x), float32
# products and the original's re-ranking within the real AVX2 host's figures (1.8-2.5 s and
# 6.9-8.6 s against 2.45 s and 8.29 s for 100 candidates, 2 workers).
EMULATION_ENV = {
    "AVX-512 BF16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "NUMBA_CPU_NAME": "cooperlake"},
    "AVX-512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "NUMBA_CPU_NAME": "skylake-avx512"},
    "AVX2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "NUMBA_CPU_NAME": "znver3",
    },
}  # fmt: skip


class HostSettingError(UserError, ValueError):
    """A setting that chooses this host's arithmetic (``FOL_RERANK_PRODUCT``) is unknown."""


@dataclass(frozen=True)
class Host:
    """This CPU: its model, the flags that decide reduced-precision arithmetic, its kind."""

    model: str
    flags: tuple[str, ...]
    kind: str  # a row of the module docstring's table, or "unknown" (no /proc/cpuinfo)
    emulated: bool  # the libraries are capped below what the hardware does (ONEDNN_MAX_CPU_ISA, ...)

    @property
    def native_bf16(self) -> bool | None:
        """Whether bf16 products run on bf16 units; None where the flags cannot tell."""
        return None if self.kind == "unknown" else self.kind in NATIVE_BF16_KINDS

    def describe(self) -> str:
        """``AVX2 (emulated on AVX-512 BF16)``, or the kind alone."""
        return f"{self.kind} (emulated on {_hardware_kind(self.flags)})" if self.emulated else self.kind


# Flags of /proc/cpuinfo that change what bf16, fp16 and int8 products cost.
RELEVANT_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512_fp16", "avx512f", "avx2", "fma", "bf16")


def _hardware_kind(flags: tuple[str, ...]) -> str:
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    if "bf16" in flags:
        return "Arm bf16"
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return "unknown"


def _isa_kind(isa: str) -> str | None:
    """The kind a ``ONEDNN_MAX_CPU_ISA`` value caps x86 hosts at (None: no cap below AMX)."""
    isa = isa.upper()
    if not isa or isa == "ALL" or isa.startswith("AVX10") or "AMX" in isa:
        return None
    return "AVX-512 BF16" if "BF16" in isa else "AVX-512" if "AVX512" in isa else "AVX2"


def _capped_kind(kind: str, environ: dict[str, str]) -> str:
    """The kind the libraries compute as under ``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY``."""
    caps = [_isa_kind(environ.get("ONEDNN_MAX_CPU_ISA", ""))]
    if environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default"):
        caps.append("AVX2")
    for cap in caps:
        if cap and kind in X86_KINDS and X86_KINDS.index(cap) > X86_KINDS.index(kind):
            kind = cap
    return kind


@functools.lru_cache(maxsize=None)
def _read_cpuinfo() -> tuple[str, tuple[str, ...]] | None:
    """(model, relevant flags) of /proc/cpuinfo, read once per process (the engine asks per call)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    model = re.search(r"^(?:model name|Model|CPU part)\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.MULTILINE)
    present = set(flags.group(1).split()) if flags else set()
    return (model.group(1).strip() if model else platform.machine()), tuple(f for f in RELEVANT_FLAGS if f in present)


@functools.lru_cache(maxsize=None)
def _detect(cpuinfo: tuple[str, tuple[str, ...]] | None, caps: tuple[tuple[str, str], ...]) -> Host:
    if cpuinfo is None:
        return Host(platform.processor() or platform.machine(), (), "unknown", False)
    model, flags = cpuinfo
    hardware = _hardware_kind(flags)
    kind = _capped_kind(hardware, dict(caps))
    return Host(model, flags, kind, kind != hardware)


def detect_host() -> Host:
    """This host, under the library caps set in the environment (decided once per setting)."""
    caps = tuple((name, os.environ[name]) for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if name in os.environ)
    return _detect(_read_cpuinfo(), caps)


def emulable_kinds(host: Host) -> tuple[str, ...]:
    """The kinds below this host's own that :data:`EMULATION_ENV` can make it compute as."""
    if host.emulated or host.kind not in X86_KINDS:
        return ()
    return X86_KINDS[X86_KINDS.index(host.kind) + 1 :]


def _measurements_file(host: Host) -> Path:
    key = json.dumps([host.model, host.flags, host.kind, torch.__version__, torch.get_num_threads()])
    return user_cache_dir() / MEASUREMENTS_FOLDER / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _time_product(dtype: torch.dtype) -> float:
    n, k, m = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, k, generator=generator).to(dtype)
    b = torch.randn(m, k, generator=generator).to(dtype)
    out = torch.empty(n, m, dtype=dtype)
    torch.mm(a, b.T, out=out)  # warm-up
    seconds = []
    for _ in range(PROBE_REPEATS):
        start = time.perf_counter()
        torch.mm(a, b.T, out=out)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def product_slowdown(precision: str) -> float:
    """How many times slower a ``precision`` ("bf16" or "fp16") matrix product is than float32
    on this host: measured once (a [1024, 128] x [128, 1024] product, the median of 5 after a
    warm-up) and cached per host, torch version and thread count."""
    path = _measurements_file(detect_host())
    measured = read_json(path, fix=f"remove {path}") if path.exists() else {}
    if precision not in measured:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        measured[precision] = _time_product(dtype) / _time_product(torch.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, measured, advice=f"remove {path}")
    return float(measured[precision])


def native_bf16() -> bool:
    """Whether bf16 products are native here: from the flags, else measured."""
    known = detect_host().native_bf16
    return known if known is not None else product_slowdown("bf16") < EMULATED_SLOWDOWN


def screen_product() -> str:
    """The product the exact engine screens with on this host: ``$FOL_RERANK_PRODUCT`` when set,
    else bf16 where bf16 is native and fp32 elsewhere (docs/RERANK_ENGINE.md)."""
    forced = os.environ.get(PRODUCT_ENV)
    if forced:
        if forced not in SCREEN_PRODUCTS:
            raise HostSettingError(f"{PRODUCT_ENV}={forced!r}; choose one of {', '.join(SCREEN_PRODUCTS)} or unset it")
        return forced
    product = "bf16" if native_bf16() else "fp32"
    _log_choice(detect_host(), product)
    return product


@functools.lru_cache(maxsize=None)
def _log_choice(host: Host, product: str) -> None:
    logger.debug("re-ranking screens with %s products on this %s host (%s)", product, host.describe(), host.model)


def auto_extraction_precision() -> str:
    """``--extraction_precision auto`` on the CPU: bf16 where bf16 is native, else fp32."""
    return "bf16" if native_bf16() else "fp32"


def emulated_precision_warning(precision: str) -> str | None:
    """A one-line warning when ``precision`` (of a CPU extraction) is emulated on this host,
    naming the measured slow-down of its products; None when it is native or fp32."""
    if precision == "fp32" or (precision == "bf16" and native_bf16()):
        return None
    if precision == "fp16" and "avx512_fp16" in detect_host().flags:
        return None
    slowdown = product_slowdown(precision)
    if slowdown < EMULATED_SLOWDOWN:
        return None
    return (
        f"--extraction_precision {precision}: this CPU ({detect_host().describe()}) has no {precision} units, and a "
        f"{precision} matrix product measured {slowdown:.1f}x slower than float32 here; use fp32 (the published "
        f"numbers) or auto"
    )
