"""The file mechanics every command shares: durable atomic writes, the JSON form of a config, JSON
records read with messages that name the file, and the size units.

An atomic write goes to a temporary file created fresh beside the target (same file system; a
random name opened with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so a planted file or link there is
never written through), is flushed and fsynced, then renamed over the target and the folder
fsynced: a reader sees the old file or the new one, never a part, and an interruption or a full
disk leaves no temporary file behind. A target that is a symbolic link, or anything but a regular
file, is refused: a folder someone sent you cannot make a run write elsewhere.
"""
from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import UserError

GB = 1e9  # decimal units everywhere: GB = 1e9 bytes, MB = 1e6 bytes
MB = 1e6
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
TEMPORARY_SUFFIX = ".tmp"


class DiskFullError(UserError, RuntimeError):
    """The disk filled up while a run was writing."""


class DamagedFileError(UserError, ValueError):
    """A record file of a run (JSON) cannot be read."""


class UnsafeTargetError(UserError, ValueError):
    """An output's path is a symbolic link or not a regular file: never written through."""


# Flags of every file fol-plugin writes: never through a link, never inherited by a child process.
NO_FOLLOW_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
# Flags of a fresh temporary file: created here and now, never an existing file or a link.
FRESH_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW_FLAGS


def disk_full_message(where: os.PathLike | str, needed_bytes: float, advice: str) -> str:
    """``disk full at <where>; free N GB and <advice>`` (at least 0.1 GB)."""
    return f"disk full at {where}; free {max(needed_bytes, 0.1 * GB) / GB:.1f} GB and {advice}"


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system of ``folder`` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def ensure_room(folder: Path, writes: Sequence[tuple[Path, float]], advice: str) -> None:
    """Check, before anything is written, that the file system of ``folder`` has room for
    ``writes`` (each a path and its estimated bytes), written one after another by
    :func:`atomic_write`: each new file sits beside the one it replaces until the rename.

    Raises:
        DiskFullError: not enough free space, with how much to free and ``advice``.
    """
    peak = growth = 0.0
    for path, size in writes:
        peak = max(peak, growth + size)
        growth += size - (path.stat().st_size if path.exists() else 0)
    free = free_bytes(folder)
    if peak > free:
        raise DiskFullError(disk_full_message(folder, peak - free, advice))


def atomic_write(
    path: os.PathLike | str, write: Callable[[IO[bytes]], None], advice: str = "rerun the same command"
) -> None:
    """Write ``path`` through ``write(handle)`` atomically and durably.

    Raises:
        DiskFullError: the disk filled up (``advice`` says what to do then); the target is
            unchanged and no temporary file is left.
    """
    path = Path(path)
    check_target(path)
    handle, temporary = _fresh_temporary(path)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        written = temporary.stat().st_size if temporary.exists() else 0
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(disk_full_message(path, written - free_bytes(path.parent), advice)) from error
        raise
    _fsync_folder(path.parent)


def check_target(path: Path) -> None:
    """Refuse an output path that is a symbolic link or exists as anything but a regular file.

    Raises:
        UnsafeTargetError: naming the path, what it is and the fix.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise UnsafeTargetError(
            f"{path} is a symbolic link (to {os.readlink(path)}); fol-plugin never writes an output through a link: "
            "remove the link, or choose another output folder"
        )
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise UnsafeTargetError(f"{path} is {kind}, where an output file goes: remove or rename it, or choose another output folder")


def open_in_place(path: os.PathLike | str, flags: int) -> int:
    """``os.open(path, flags)`` for a file written where it lies (appended, updated, locked,
    memory-mapped), never through a link: -> the descriptor.

    Raises:
        UnsafeTargetError: ``path`` is a symbolic link or not a regular file (:func:`check_target`).
    """
    check_target(Path(path))
    try:
        return os.open(path, flags | NO_FOLLOW_FLAGS, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:  # a link planted since the check
            check_target(Path(path))
        raise


def _fresh_temporary(path: Path) -> tuple[IO[bytes], Path]:
    """A new file beside ``path`` under a random name (``.<name>.<random>.tmp``), created with
    :data:`FRESH_FILE_FLAGS` -> (the file, open for writing in binary, and its path)."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}{TEMPORARY_SUFFIX}")
        try:
            return open(temporary, "wb", opener=lambda name, _: os.open(name, FRESH_FILE_FLAGS, 0o666)), temporary
        except FileExistsError:  # a planted file of that name, or a collision: draw another
            continue


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_text(path: os.PathLike | str, text: str, advice: str = "rerun the same command") -> None:
    """UTF-8 ``text`` to ``path``, atomically (see :func:`atomic_write`); file names that are not
    UTF-8 (held as ``surrogateescape`` characters) are written as their own bytes."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8", errors="surrogateescape")), advice)


def write_csv(
    path: os.PathLike | str, header: Sequence[str], rows: Iterable[Sequence[Any]], advice: str = "rerun the same command"
) -> None:
    """``header`` then ``rows`` as CSV (Python's ``csv`` dialect), atomically, the rows streamed
    to the file as they come (a long table is never held whole in memory); file names that are
    not UTF-8 are written as their own bytes."""

    def write(handle: IO[bytes]) -> None:
        text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline="")
        writer = csv.writer(text)
        writer.writerow(header)
        writer.writerows(rows)
        text.flush()
        text.detach()  # the handle stays open for atomic_write's fsync

    atomic_write(path, write, advice)


def write_json(path: os.PathLike | str, record: Any, advice: str = "rerun the same command") -> None:
    """``record`` as indented JSON, atomically: strict JSON that every reader takes (a NaN or an
    infinity is a bug here, never written as the bare ``NaN`` most readers refuse)."""
    write_text(path, json.dumps(record, indent=2, allow_nan=False), advice)


def save_torch(path: os.PathLike | str, obj: Any, advice: str = "rerun the same command") -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle), advice)


def write_figure(path: os.PathLike | str, figure: Any, dpi: int, advice: str = "rerun the same command") -> None:
    """A matplotlib ``figure`` to ``path`` in the format its suffix names, atomically."""
    atomic_write(path, lambda handle: figure.savefig(handle, format=Path(path).suffix[1:], dpi=dpi), advice)


def save_npy(path: os.PathLike | str, array: Any, advice: str = "rerun the same command") -> None:
    """``numpy.save(array)`` to ``path``, atomically."""
    import numpy as np

    atomic_write(path, lambda handle: np.save(handle, array), advice)


def read_json(path: os.PathLike | str, fix: str) -> Any:
    """The JSON record at ``path``.

    Args:
        fix: what the user should do when the file is damaged.

    Raises:
        DamagedFileError: not valid JSON (truncated, edited, another tool's file), naming the file,
            where it breaks, and ``fix``.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedFileError(f"{path} is damaged ({error}): {fix}") from None


def json_safe(config: Any) -> Any:
    """A configuration (a dataclass, or a dict holding some) as plain JSON data: dataclasses as
    dicts, paths and other objects as strings."""
    return json.loads(json.dumps(config, default=_plain))


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else str(value)
