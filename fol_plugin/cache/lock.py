"""One process at a time in a folder: an exclusive, non-blocking ``fcntl`` lock on a lock file.

The lock file also records who holds it (process id, host, start time, command), so a refused
run can name the other one. The operating system releases the lock when the holder exits, even
after ``kill -9``: a stale lock file never blocks anyone.
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path


class RunLockedError(RuntimeError):
    """Another process holds the lock."""


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
        handle = open(self.path, "a+")
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
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": shlex.join(sys.argv),
        }))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _describe(holder: str) -> str:
    try:
        record = json.loads(holder)
        return f"process {record['pid']} on {record['host']}, started {record['started']}: {record['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"
