"""``fol-vpr`` as a user runs it (a subprocess, the tiny ViT): what bad input and faults look like
on the command line, and the exit codes."""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

from fol_plugin.cli import USER_ERROR_EXIT

from .conftest import tiny_cli_args, write_blank_png

RUN_TIMEOUT_S = 300
# The address space a run may take in the tests that could exhaust memory on a regression: a
# ViT run with two DataLoader workers fits in it, decoding a 20000 x 20000 image does not.
MEMORY_LIMIT_BYTES = 3 * 2**30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def run_cli(args: list[str], limit_memory: bool = False, **environment: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **environment}
    return subprocess.run(
        [sys.executable, *args], env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        preexec_fn=_limit_memory if limit_memory else None,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if " ERROR " in line]


def test_image_bomb_is_refused_from_its_header(labelled_set, tiny_weights, tmp_path):
    """A 1.7 MB PNG declaring 20000 x 20000 pixels among the queries: refused with one line naming
    the file, its size and the flag, under a memory limit that decoding it would exceed, with
    DataLoader workers as by default."""
    root = tmp_path / "set"
    shutil.copytree(labelled_set, root)
    bomb = write_blank_png(root / "queries" / "@1.00@2.00@17@T@bomb@.png", 20000, 20000)
    result = run_cli(tiny_cli_args(root, tmp_path / "run", tiny_weights, "--num_workers", "2"), limit_memory=True)
    assert result.returncode == USER_ERROR_EXIT, result.stderr[-3000:]
    [line] = error_lines(result)
    assert line.split(" ERROR ")[1].startswith(
        f"image {bomb} is 20000x20000 (400,000,000 pixels), more than --max_image_pixels 134,217,728: resize it"
    )
    assert "Traceback" not in result.stderr
    admitted = run_cli(
        tiny_cli_args(root, tmp_path / "run2", tiny_weights, "--max_image_pixels", str(20000 * 20000 - 1)),
        limit_memory=True,
    )
    assert "more than --max_image_pixels 399,999,999" in admitted.stderr


def test_max_image_pixels_is_in_every_commands_help():
    for command in ("eval", "rerank", "benchmark", "train", "visualize", "report"):
        result = run_cli(["-m", "fol_plugin", command, "--help"])
        assert "--max_image_pixels PIXELS" in result.stdout and "134217728" in result.stdout, command


def test_visualize_refuses_an_image_bomb(tmp_path, tiny_weights):
    bomb = write_blank_png(tmp_path / "bomb.png", 20000, 20000)
    small = write_blank_png(tmp_path / "small.png", 140, 140)
    args = [str(Path(__file__).parent / "tiny_fol_vpr.py"), "visualize", "--query", str(small), "--database", str(bomb),
            "--backbone", "vitb", "--weights", str(tiny_weights), "--image_size", "126", "126",
            "--output", str(tmp_path / "figure.png")]  # fmt: skip
    result = run_cli(args, limit_memory=True)
    assert result.returncode == USER_ERROR_EXIT
    [line] = error_lines(result)
    assert f"image {bomb} is 20000x20000" in line
    assert not (tmp_path / "figure.png").exists()


def test_runs_leave_nothing_in_the_temporary_folder(labelled_set, tiny_weights, tmp_path):
    """Neither a finished run nor one failing in a DataLoader worker leaves folders behind
    (``pymp-*`` of the workers, ``torchinductor_<user>``)."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    done = run_cli(tiny_cli_args(labelled_set, tmp_path / "run", tiny_weights, "--num_workers", "2"), TMPDIR=str(temporary))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(path.name for path in temporary.iterdir()) == []
    root = tmp_path / "broken"
    shutil.copytree(labelled_set, root)
    (root / "queries" / "@999999.00@2.00@17@T@zz@.jpg").write_text("not an image")  # the last: workers sent batches
    args = tiny_cli_args(root, tmp_path / "run2", tiny_weights, "--num_workers", "2", "--batch_size", "1")
    failed = run_cli(args, TMPDIR=str(temporary))
    assert failed.returncode == USER_ERROR_EXIT and "cannot decode image" in failed.stderr
    assert sorted(path.name for path in temporary.iterdir()) == []
