"""Fingerprints of a run's inputs (``fol_plugin.cache.fingerprint``)."""
from __future__ import annotations

import json
import os

from fol_plugin.cache import checkpoint_digest, fingerprint as fingerprint_module


def test_checkpoint_digests_are_computed_once_per_file_version(tmp_path, monkeypatch, user_cache):
    path = tmp_path / "w.pth"
    path.write_bytes(b"a" * 1000)
    reads = []
    digest = fingerprint_module.file_digest
    monkeypatch.setattr(fingerprint_module, "file_digest", lambda p: reads.append(p) or digest(p))
    first = checkpoint_digest(path)
    assert checkpoint_digest(path) == first and len(reads) == 1
    assert json.loads((user_cache / "checkpoint_digests.json").read_text())[str(path.resolve())]["digest"] == first
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(1, 1))
    assert checkpoint_digest(path) != first and len(reads) == 2
