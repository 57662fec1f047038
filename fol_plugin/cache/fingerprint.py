"""Fingerprints of a run's inputs: checkpoint contents and image listings.

A checkpoint's content hash (xxh3-128 over the file) is computed once and remembered in
``<user cache>/checkpoint_digests.json`` by resolved path, size and modification time, so a
1.2 GB checkpoint is read once, not at every run. The user cache is ``$FOL_PLUGIN_CACHE``, else
``$XDG_CACHE_HOME/fol-plugin``, else ``~/.cache/fol-plugin``.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import xxhash

from ..files import DiskFullError, write_json

logger = logging.getLogger(__name__)

DIGESTS_FILE = "checkpoint_digests.json"
READ_CHUNK = 16 * 2**20


def user_cache_dir() -> Path:
    """Where fol-plugin keeps small per-user state (never inside the installed package)."""
    if os.environ.get("FOL_PLUGIN_CACHE"):
        return Path(os.environ["FOL_PLUGIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fol-plugin"


def file_digest(path: Path) -> str:
    """xxh3-128 of a file's content, hex."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_digest(path: str | os.PathLike) -> str:
    """Content hash of a checkpoint file, from the remembered digests when the file's path, size
    and modification time are unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    key = str(path)
    identity = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    digests_path = user_cache_dir() / DIGESTS_FILE
    try:
        digests = json.loads(digests_path.read_text())
    except (OSError, ValueError):
        digests = {}
    remembered = digests.get(key) if isinstance(digests, dict) else None
    if isinstance(remembered, dict) and {k: remembered.get(k) for k in identity} == identity:
        return str(remembered["digest"])
    logger.info("Hashing %s (once; remembered in %s)", path, digests_path)
    digest = file_digest(path)
    digests = digests if isinstance(digests, dict) else {}
    digests[key] = {**identity, "digest": digest}
    try:
        digests_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(digests_path, digests)
    except (OSError, DiskFullError) as error:  # a read-only home only costs re-hashing next time
        logger.warning("could not remember the digest of %s in %s: %s", path, digests_path, error)
    return digest


def listing_digest(folder: str | os.PathLike, paths: Sequence[str]) -> str:
    """Hash of an image listing: every path (relative to ``folder``, so the same dataset seen from
    another working directory matches), in order, with its size and modification time.

    Raises:
        FileNotFoundError: an image of the listing is missing.
    """
    digest = xxhash.xxh3_128()
    for path in paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image {path} is listed but does not exist") from None
        digest.update(os.fsencode(os.path.relpath(path, folder)) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
