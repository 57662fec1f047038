"""The folder lock (``fol_plugin.cache.lock``): one holder, released with its process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fol_plugin.cache import DirectoryLock, RunLockedError
from fol_plugin.cache.lock import command_line

from .conftest import REPO_ROOT

# Takes the lock, then starts a DataLoader-like forked child that outlives it, and waits.
HOLDER_WITH_FORKED_CHILD = textwrap.dedent("""
    import multiprocessing, sys, time
    from fol_plugin.cache import DirectoryLock
    lock = DirectoryLock(sys.argv[1])
    lock.acquire()
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,), daemon=False)
    child.start()
    print(child.pid, flush=True)
    time.sleep(120)
""")


def test_a_second_holder_is_refused_and_named(tmp_path):
    with DirectoryLock(tmp_path):
        with pytest.raises(RunLockedError, match=rf"--output_dir x is in use by another process \(process {os.getpid()} on"):
            DirectoryLock(tmp_path, what="--output_dir x").acquire()
    with DirectoryLock(tmp_path):  # released on exit
        pass


def test_the_lock_dies_with_its_holder_even_while_a_forked_child_lives(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER_WITH_FORKED_CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(RunLockedError):
            DirectoryLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        os.kill(child, 0)  # the child still runs
        with DirectoryLock(tmp_path):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        holder.kill()


def test_a_forked_child_cannot_release_its_parents_lock(tmp_path):
    lock = DirectoryLock(tmp_path)
    lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child unwinds through the lock's release, as a failing worker may
            lock.release()
            os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.1)
        with pytest.raises(RunLockedError):
            DirectoryLock(tmp_path).acquire()
    finally:
        lock.release()


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["/venv/bin/fol-vpr", "eval", "--output_dir", "runs/a b"], {}, "/venv/bin/fol-vpr eval --output_dir 'runs/a b'"),
        (["/src/fol_plugin/__main__.py", "eval", "--x"], {}, "python -m fol_plugin eval --x"),
        (["tests/tiny_fol_vpr.py", "eval"], {}, "python tests/tiny_fol_vpr.py eval"),
        (
            ["/src/fol_plugin/__main__.py", "eval"], {"TORCHELASTIC_RUN_ID": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"},
            "torchrun --standalone --nproc_per_node=2 -m fol_plugin eval",
        ),
        (
            ["/venv/bin/fol-vpr", "eval"], {"TORCHELASTIC_RUN_ID": "1", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"},
            "torchrun --nnodes=2 --nproc_per_node=4 /venv/bin/fol-vpr eval",
        ),
    ],
)
def test_the_recorded_command_runs_again_as_typed(argv, environ, expected):
    assert command_line(argv, environ) == expected


def test_a_released_lock_leaves_no_file_and_the_next_holder_locks_a_new_one(tmp_path):
    first = DirectoryLock(tmp_path, name=".fol-vpr.lock")
    first.acquire()
    waiting = open(tmp_path / ".fol-vpr.lock", "a+")  # opened by another run just before the release
    first.release()
    assert not (tmp_path / ".fol-vpr.lock").exists()
    with DirectoryLock(tmp_path, name=".fol-vpr.lock"):  # not fooled by the removed file still open
        assert (tmp_path / ".fol-vpr.lock").exists()
        with pytest.raises(RunLockedError):
            DirectoryLock(tmp_path, name=".fol-vpr.lock").acquire()
    waiting.close()
