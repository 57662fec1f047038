"""What the benchmarks share: the reference weights in a torch.hub cache (the test suite's
fixtures), the host they ran on, one summary line per benchmark printed at the end of the run
(without ``-s``), and scratch folders removed when their module is done.

A speed figure means nothing without the kind of CPU it was measured on: every benchmark puts
:func:`describe_host` in its ``extra_info`` and its summary line names the host's kind.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import parity_fixture, parity_torch_home  # noqa: F401

# CPU flags that change what bf16, fp16 and int8 products cost (from /proc/cpuinfo).
CPU_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512_fp16")
# A bf16 product big enough for oneDNN, run with its verbose log to read the ISA it picks.
ONEDNN_PROBE = "import torch; a = torch.ones(256, 256, dtype=torch.bfloat16); a @ a"
ONEDNN_ISA = re.compile(r"(?:brg_matmul|brgemm|gemm|jit)[:_]([a-z0-9_]+)")

_SUMMARY_LINES: list[str] = []


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    present = set(flags.group(1).split()) if flags else set()
    return (model.group(1).strip() if model else platform.machine()), [f for f in CPU_FLAGS if f in present]


def _onednn_isa() -> str:
    """The ISA oneDNN's bf16 matmul runs with here (its verbose log), or "unknown"."""
    probe = subprocess.run(
        [sys.executable, "-c", ONEDNN_PROBE], env={**os.environ, "ONEDNN_VERBOSE": "1"}, capture_output=True, text=True
    )
    lines = [line for line in probe.stdout.splitlines() if line.startswith("onednn_verbose") and ",exec," in line]
    found = ONEDNN_ISA.search(lines[0]) if lines else None
    return found.group(1) if found else "unknown"


def describe_host() -> dict:
    """The CPU's model, the flags that matter for reduced-precision products, oneDNN's ISA,
    torch's threads and version; ``kind`` sums them up for a summary line."""
    model, flags = _cpu_model_and_flags()
    isa = _onednn_isa()
    kind = "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else "no bf16 units"
    return {
        "cpu": model, "flags": flags, "onednn_isa": isa, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "torch": torch.__version__, "kind": f"{kind} ({isa}, {torch.get_num_threads()} threads)",
    }  # fmt: skip


@pytest.fixture(scope="session")
def host() -> dict:
    return describe_host()


@pytest.fixture
def report(benchmark, host, request) -> Callable[[str], None]:
    """``report(line)``: the benchmark's result in one line, printed at the end of the run with
    the host's kind; the host goes to ``extra_info`` too."""
    benchmark.extra_info["host"] = host

    def add(line: str) -> None:
        benchmark.extra_info["summary"] = line
        _SUMMARY_LINES.append(f"{request.node.name}: {line} [{host['kind']}]")

    return add


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, request) -> Iterator[Path]:
    """A folder for a module's large files, removed when the module is done (passed or not)."""
    folder = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(items) -> None:
    """Refuses a benchmark that would not say which host it ran on (the ``report`` fixture)."""
    here = Path(__file__).parent
    silent = [
        item.nodeid
        for item in items
        if item.path.is_relative_to(here) and "benchmark" in getattr(item, "fixturenames", ()) and "report" not in item.fixturenames
    ]
    if silent:
        raise pytest.UsageError(f"benchmarks without the `report` fixture (their host would go unrecorded): {', '.join(silent)}")


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables: the lines to read are the last ones
def pytest_terminal_summary(terminalreporter) -> None:
    if _SUMMARY_LINES:
        terminalreporter.section("benchmark results")
        for line in _SUMMARY_LINES:
            terminalreporter.write_line(line)
