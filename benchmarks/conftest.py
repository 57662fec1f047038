"""What the benchmarks share: the reference weights in a torch.hub cache (the test suite's
fixtures), the host they ran on, one summary line per benchmark printed at the end of the run
(without ``-s``), and scratch folders removed when their module is done.

A speed figure means nothing without the kind of CPU it was measured on: every benchmark puts
:func:`describe_host` in its ``extra_info`` and its summary line names the host's kind. Benchmarks
that take a ``kind`` argument run once per kind this host can compute as: its own, natively, and
each kind below it, emulated (:data:`fol_plugin.host.EMULATION_ENV`), in a process of its own
(:func:`run_as_kind`); their lines say which.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from fol_plugin.host import EMULATION_ENV, detect_host, emulable_kinds

from tests.conftest import parity_fixture, parity_torch_home  # noqa: F401

# A bf16 product big enough for oneDNN, run with its verbose log to read the ISA it picks.
ONEDNN_PROBE = "import torch; a = torch.ones(256, 256, dtype=torch.bfloat16); a @ a"
ONEDNN_ISA = re.compile(r"(?:brg_matmul|brgemm|gemm|jit)[:_]([a-z0-9_]+)")
REPO_ROOT = Path(__file__).resolve().parents[1]

_SUMMARY_LINES: list[str] = []


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
    host = detect_host()
    isa = _onednn_isa()
    return {
        "cpu": host.model, "flags": list(host.flags), "onednn_isa": isa, "threads": torch.get_num_threads(),
        "cores": os.cpu_count(), "torch": torch.__version__,
        "kind": f"{host.describe()} ({isa}, {torch.get_num_threads()} threads)",
    }  # fmt: skip


def kinds_here() -> list[str]:
    """This host's own kind, then those it can emulate."""
    host = detect_host()
    return [host.kind, *emulable_kinds(host)]


def pytest_generate_tests(metafunc) -> None:
    """A benchmark with a ``kind`` argument runs once per kind of :func:`kinds_here`."""
    if "kind" in metafunc.fixturenames:
        metafunc.parametrize("kind", kinds_here())


def run_as_kind(kind: str, module: str, *args: str) -> dict:
    """``python -m <module> <args>`` in a process that computes as ``kind`` (natively when it is
    this host's own, else under :data:`EMULATION_ENV`) -> the JSON record it prints last, with
    ``host`` (:func:`describe_host` there, ``emulated`` true or false) added."""
    emulated = kind != detect_host().kind
    environ = {**os.environ, **(EMULATION_ENV[kind] if emulated else {})}
    finished = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=environ, capture_output=True, text=True
    )
    if finished.returncode:
        raise RuntimeError(f"{module} {' '.join(args)} as {kind} failed:\n{finished.stderr[-4000:]}")
    record = json.loads(finished.stdout.strip().splitlines()[-1])
    assert record["host"]["emulated"] == emulated, record["host"]  # the process computed as asked
    return record


def describe_process() -> dict:
    """:func:`describe_host` of this process, for a record :func:`run_as_kind` reads."""
    return {**describe_host(), "emulated": detect_host().emulated}


@pytest.fixture(scope="session")
def host() -> dict:
    return describe_host()


@pytest.fixture
def report(benchmark, host, request) -> Callable[..., None]:
    """``report(line)``: the benchmark's result in one line, printed at the end of the run with
    the host's kind; the host goes to ``extra_info`` too. ``report(line, measured_on)`` names the
    host a :func:`run_as_kind` record was measured on instead."""
    benchmark.extra_info["host"] = host

    def add(line: str, measured_on: dict | None = None) -> None:
        measured_on = measured_on or host
        benchmark.extra_info["host"] = measured_on
        benchmark.extra_info["summary"] = line
        _SUMMARY_LINES.append(f"{request.node.name}: {line} [{measured_on['kind']}]")

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
