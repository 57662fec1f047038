"""``<output_dir>/cache`` of ``fol-vpr eval`` / ``rerank``: who may use it, and whether its
contents belong to this run.

- One run per output folder: :class:`RunCache` holds an fcntl lock on ``<output_dir>/.fol-vpr.lock``
  for the whole run (see :mod:`.lock`).
- ``cache/run.json`` records the fingerprint of what every cached file depends on (cache
  format, checkpoint content hash, backbone, image size, resize mode, every image with its size
  and mtime) and the command that made it. Files that depend on more carry it in their names
  (store precision; scorer, candidates and top-k of re-ranking scores).
- Same fingerprint: resume. Another fingerprint and no computed work (say, a run that failed
  before extracting anything): start afresh, silently. The same command on changed image folders
  (an undecodable image fixed or removed after a failed run, images added): the cached rows are of
  other images, so start afresh with a warning saying how much is discarded and why. Another
  fingerprint with computed work otherwise: refuse, saying what differs, how much work it holds,
  and the commands to reuse or discard it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from ..errors import UserError
from ..files import MB, write_json
from .integrity import folder_bytes, holds_commits
from .lock import DirectoryLock, command_line

logger = logging.getLogger(__name__)

CACHE_FOLDER = "cache"
RUN_FILE = "run.json"
LOCK_FILE = ".fol-vpr.lock"
CACHE_FORMAT = 3  # bump when cached files change layout
SHOWN_VALUE_CHARS = 40
LISTING_KEYS = {"database", "queries"}  # fingerprint entries of the image folders' listings


class CacheMismatchError(UserError, RuntimeError):
    """The cache holds computed work of another configuration."""


class OutputFolderError(UserError, RuntimeError):
    """The output folder cannot be used."""


class RunCache:
    """The cache folder of one run; a context manager holding the output folder's lock.

    Args:
        output_dir: the run's output folder (created when missing).
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.folder = self.output_dir / CACHE_FOLDER
        self.run_file = self.folder / RUN_FILE
        self._lock = DirectoryLock(self.output_dir, LOCK_FILE, f"--output_dir {self.output_dir}")

    def __enter__(self) -> RunCache:
        _make_output_dir(self.output_dir)
        try:
            self._lock.acquire()
        except PermissionError as error:
            raise OutputFolderError(
                f"--output_dir {self.output_dir} is not writable ({error.strerror}); choose another folder or fix its "
                "permissions"
            ) from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()

    def work_bytes(self) -> int:
        """Bytes of the cache when it records finished work (a non-empty commit log), else 0."""
        return folder_bytes(self.folder) if holds_commits(self.folder) else 0

    def check(self, fingerprint: dict) -> None:
        """Resume, start afresh or refuse (see the module docstring); records ``fingerprint``."""
        fingerprint = {"cache_format": CACHE_FORMAT, **fingerprint}
        record, problem = self._stored_record()
        stored = record["fingerprint"] if record else None
        work = self.work_bytes()
        if stored == fingerprint:
            if work:
                logger.info("Resuming from %s (%.1f MB of finished work)", self.folder, work / MB)
            return
        same_command_new_images = (
            stored is not None
            and record.get("command") == command_line()
            and {key for key in set(stored) | set(fingerprint) if stored.get(key) != fingerprint.get(key)} <= LISTING_KEYS
        )
        if work and not same_command_new_images:
            if stored is None:
                problem = problem or "is missing"
                raise CacheMismatchError(
                    f"{self.run_file} {problem}, so the {work / MB:.1f} MB of results beside it cannot be trusted: "
                    f"discard them with `rm -rf {self.folder}` and rerun this command"
                )
            raise CacheMismatchError(
                f"{self.folder} holds {work / MB:.1f} MB of results of another configuration (differs in "
                f"{'; '.join(_differences(stored, fingerprint))}). To reuse them, rerun the command that made them: "
                f"`{record.get('command', '?')}`; to discard them, `rm -rf {self.folder}` and rerun this command"
            )
        if work:
            logger.warning(
                "The images changed since this command last ran in %s (%s): its %.1f MB of cached results are of the "
                "earlier images, so they are discarded and the run starts afresh",
                self.output_dir, "; ".join(_differences(stored, fingerprint)), work / MB,
            )
        elif stored is not None or problem:
            logger.info("Starting %s afresh: it held no finished work", self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        record = {"fingerprint": fingerprint, "command": command_line(), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json(self.run_file, record)

    def _stored_record(self) -> tuple[dict | None, str | None]:
        """(run.json's record, None), (None, None) when there is none, or (None, what is wrong with it)."""
        if not self.run_file.exists():
            return None, None
        try:
            record = json.loads(self.run_file.read_text())
            if not isinstance(record.get("fingerprint"), dict):
                raise TypeError("no fingerprint mapping")
            return record, None
        except (OSError, ValueError, AttributeError, TypeError) as error:
            return None, f"is damaged or from another fol-plugin version ({type(error).__name__}: {error})"

    def discard(self) -> None:
        """Remove the cache (after a successful run)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _make_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputFolderError(f"--output_dir {output_dir} is a file, not a folder; give a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputFolderError(
            f"cannot create --output_dir {output_dir} ({error.strerror}); choose another folder or fix its permissions"
        ) from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise OutputFolderError(
            f"--output_dir {output_dir} is not writable; choose another folder or fix its permissions"
        )


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 3] + "..."


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every differing leaf of two fingerprints."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return changes
