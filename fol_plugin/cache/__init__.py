"""What every resumable cache is made of: the run lock, checksums of committed work, disk-full
handling, fingerprints of the inputs, and the run cache that decides between resuming, starting
afresh and refusing.

- :mod:`.lock`: one process per output folder (fcntl), naming the holder when refused.
- :mod:`.integrity`: checksummed append-only commit logs, pre-allocated files, disk-full errors.
- :mod:`.fingerprint`: content hashes of checkpoints (cached by path, size and mtime) and of image
  listings (every path with its size and mtime).
- :mod:`.run_cache`: ``<output_dir>/cache`` of ``fol-vpr eval`` / ``rerank``: lock, fingerprint
  check, and the refusal message that says how much work a mismatch would discard.

The files that hold the work (:class:`fol_plugin.features.ResumableArray`,
:class:`fol_plugin.features.LocalFeatureStore`) verify themselves with :mod:`.integrity`.
"""
from .fingerprint import checkpoint_digest, listing_digest
from .integrity import CommitLog, DiskFullError, checksum, disk_full_guard, preallocate
from .lock import DirectoryLock, RunLockedError
from .run_cache import CacheMismatchError, OutputFolderError, RunCache

__all__ = [
    "CacheMismatchError",
    "CommitLog",
    "DirectoryLock",
    "DiskFullError",
    "OutputFolderError",
    "RunCache",
    "RunLockedError",
    "checkpoint_digest",
    "checksum",
    "disk_full_guard",
    "listing_digest",
    "preallocate",
]
