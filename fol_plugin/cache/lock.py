"""One process at a time in a folder: an exclusive, non-blocking ``fcntl`` lock on a lock file.

The lock file also records who holds it (process id, host, start time, command), so a refused
run can name the other one. The operating system releases the lock when the holder exits, even
after ``kill -9``: a stale lock file never blocks anyone.

The lock file is removed when the lock is released, so a finished run leaves none behind.

An ``flock`` lock belongs to the open file, which a forked child (a DataLoader worker) shares
with its parent: the lock would live on in workers that outlive a killed parent by seconds. A
forked child therefore lets go of every lock file it inherits, at once (``os.register_at_fork``),
and a started program never inherits one (Python opens files non-inheritable).
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
import weakref
from pathlib import Path

from ..errors import UserError
from ..files import open_in_place


class RunLockedError(UserError, RuntimeError):
    """Another process holds the lock."""


_HELD: weakref.WeakSet[DirectoryLock] = weakref.WeakSet()  # this process's locks, for forked children


def _let_go_in_child() -> None:
    """In a forked child: point the inherited lock descriptors at /dev/null, so that the lock is
    held by the parent alone (unlocking here would release it for the parent too)."""
    for lock in list(_HELD):
        if lock._handle is not None:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, lock._handle.fileno(), inheritable=False)
            os.close(null)
            lock._handle = None
    _HELD.clear()


os.register_at_fork(after_in_child=_let_go_in_child)


class DirectoryLock:
    """Exclusive lock of ``folder`` through ``folder/<name>``; a context manager.

    Args:
        folder: the folder to lock (created when missing).
        name: the lock file's name.
        what: how error messages call the folder (e.g. "--output_dir runs/toy").
    """

    def __init__(self, folder: str | os.PathLike, name: str = ".lock", what: str | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what or str(self.folder)
        self._handle = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockedError` naming the process that holds it."""
        while True:
            handle = os.fdopen(open_in_place(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT), "a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip()
                handle.close()
                raise RunLockedError(
                    f"{self.what} is in use by another process ({_describe(holder)}); wait for it to finish, or use "
                    "another folder"
                ) from None
            if _same_file(handle, self.path):
                break
            handle.close()  # its holder removed it while we opened it: lock the new one
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": command_line(),
        }))
        handle.flush()
        self._handle = handle
        _HELD.add(self)

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (a process that opened the file
        meanwhile finds it removed and opens a new one)."""
        _HELD.discard(self)
        if self._handle is not None:
            if _same_file(self._handle, self.path):
                self.path.unlink()
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _same_file(handle: object, path: Path) -> bool:
    """Whether the open ``handle`` is still the file at ``path``."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def command_line(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> str:
    """The command that started this process, as a user would type it again: ``python -m
    fol_plugin ...`` for a module run (whose ``argv[0]`` is the package's ``__main__.py``, which
    cannot run as a script), ``python script.py ...`` for a script, and under torchrun the
    ``torchrun`` command with this run's nodes and processes per node (rendezvous options are the
    user's own)."""
    argv = list(sys.argv if argv is None else argv)
    environ = os.environ if environ is None else environ
    program = Path(argv[0])
    start = ["-m", program.parent.name] if program.name == "__main__.py" else [argv[0]]
    if "TORCHELASTIC_RUN_ID" in environ and "LOCAL_WORLD_SIZE" in environ:
        per_node = int(environ["LOCAL_WORLD_SIZE"])
        nodes = int(environ.get("WORLD_SIZE", per_node)) // per_node
        launcher = ["torchrun", "--standalone" if nodes == 1 else f"--nnodes={nodes}", f"--nproc_per_node={per_node}"]
        return shlex.join([*launcher, *start, *argv[1:]])
    if start[0] == "-m" or program.suffix == ".py":
        start = ["python", *start]
    return shlex.join([*start, *argv[1:]])


def _describe(holder: str) -> str:
    try:
        record = json.loads(holder)
        return f"process {record['pid']} on {record['host']}, started {record['started']}: {record['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"
