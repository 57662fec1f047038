"""Integrity of cached work (``fol_plugin.cache.integrity``): a full disk is an error naming the fix,
never a SIGBUS, and the rerun resumes."""
from __future__ import annotations

import errno
import os
import re
import subprocess

import pytest

import fol_plugin
from fol_plugin.cache import DiskFullError
from fol_plugin.features import LocalFeatureStore, ResumableArray, store as store_module

from .conftest import cli_run, same_outputs, store_features, tiny_eval_args, user_error


def fail_when_full(limit_calls: int):
    """A write wrapper: the disk is full from the ``limit_calls``-th append on."""
    calls = {"n": 0}
    append = store_module.fsync_append

    def append_until_full(path, chunks):
        calls["n"] += 1
        if calls["n"] >= limit_calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        append(path, chunks)

    return append_until_full


def test_disk_full_mid_run_stops_with_the_fix_and_resumes(
    labelled_set, tiny_weights, reference_run, tmp_path, tiny_cli, monkeypatch, caplog
):
    output = tmp_path / "run"
    with monkeypatch.context() as full:
        full.setattr(store_module, "fsync_append", fail_when_full(9))
        message = user_error(caplog, *tiny_eval_args(labelled_set, output, tiny_weights, "--keep_cache"))
    assert re.search(r"disk full at .*database_local_float32/(descriptors|keypoints)\.bin; free \d+\.\d GB and rerun "
                     r"the same command to resume", message)
    assert cli_run(*tiny_eval_args(labelled_set, output, tiny_weights)) == 0
    assert same_outputs(output, reference_run)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MB tmpfs, where the test may mount one (root); skipped otherwise."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def test_a_memory_mapped_array_the_disk_cannot_hold_fails_at_creation_not_with_sigbus(small_tmpfs):
    with pytest.raises(OSError) as error:
        ResumableArray(small_tmpfs / "big.npy", (64, 8448))  # 2.2 MB on a 1 MB disk
    assert error.value.errno == errno.ENOSPC
    with LocalFeatureStore(small_tmpfs / "store", num_ids=4000, dtype="float32") as store, pytest.raises(OSError):
        for image_id in range(4000):
            store.add([image_id], *[[part] for part in store_features(image_id)])
    with pytest.raises(DiskFullError, match="disk full at .*; free"):
        with fol_plugin.cache.disk_full_guard(small_tmpfs, lambda: 2e9):
            ResumableArray(small_tmpfs / "again.npy", (64, 8448))
