"""The disk-backed local-feature store and resumable arrays."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fol_plugin.cache import RunLockedError
from fol_plugin.evaluation import run_eval
from fol_plugin.features import LocalFeatureStore, ResumableArray, RowFile
from fol_plugin.features.store import ENTRY_BYTES

from .conftest import REPO_ROOT, ModelCalls, config_for, kept_run, same_outputs, store_features


def features(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, 128, generator=generator), dim=-1), torch.rand(n, 2, generator=generator) * 300


def test_ragged_round_trip_in_both_precisions(tmp_path):
    for dtype, tolerance in (("float32", 0.0), ("float16", 1e-3)):
        store = LocalFeatureStore(tmp_path / dtype, num_ids=10, dtype=dtype)
        items = {7: features(0, 30), 2: features(1, 5), 4: features(2, 0)}
        store.add(list(items), [d for d, _ in items.values()], [k for _, k in items.values()])
        reopened = LocalFeatureStore(tmp_path / dtype, num_ids=10, dtype=dtype, mode="r")
        assert len(reopened) == 3 and 7 in reopened and 3 not in reopened
        assert reopened.missing(np.array([1, 2, 3, 4])).tolist() == [1, 3]
        for image_id, (descriptors, keypoints) in items.items():
            assert reopened[image_id].shape == descriptors.shape and reopened[image_id].dtype == torch.float32
            assert torch.allclose(reopened[image_id], descriptors, rtol=0, atol=tolerance)
            assert torch.equal(reopened.keypoints(image_id), keypoints)
    per_image = {
        dtype: LocalFeatureStore(tmp_path / dtype, 10, dtype=dtype, mode="r").bytes_per_image()
        for dtype in ("float32", "float16")
    }
    assert per_image["float32"] == pytest.approx((35 * (128 * 4 + 8) + 3 * ENTRY_BYTES) / 3)
    assert per_image["float16"] == pytest.approx((35 * (128 * 2 + 8) + 3 * ENTRY_BYTES) / 3)


def test_an_interrupted_write_is_cut_back_to_the_last_complete_image(tmp_path):
    store = LocalFeatureStore(tmp_path, num_ids=5, dtype="float32")
    first = features(0, 12)
    store.add([3], [first[0]], [first[1]])
    store.close()
    # An interruption in the middle of the next image: data written, its record half written.
    with open(tmp_path / "descriptors.bin", "ab") as handle:
        handle.write(b"\x01" * 1000)
    with open(tmp_path / "entries.commits", "ab") as handle:
        handle.write(np.array([1, 12], np.int64).tobytes())
    resumed = LocalFeatureStore(tmp_path, num_ids=5, dtype="float32")
    assert len(resumed) == 1 and 1 not in resumed
    assert torch.equal(resumed[3], first[0])
    second = features(1, 4)
    resumed.add([1], [second[0]], [second[1]])
    assert torch.equal(LocalFeatureStore(tmp_path, 5, dtype="float32", mode="r")[1], second[0])


def test_an_empty_batch_changes_nothing(tmp_path):
    """A resumed extraction can hand over a batch whose images are all stored already."""
    store = LocalFeatureStore(tmp_path, num_ids=5, dtype="float32")
    first = features(0, 7)
    store.add([2], [first[0]], [first[1]])
    store.add([], [], [])
    second = features(1, 3)
    store.add([4], [second[0]], [second[1]])
    reopened = LocalFeatureStore(tmp_path, num_ids=5, dtype="float32", mode="r")
    assert len(reopened) == 2 and torch.equal(reopened[2], first[0]) and torch.equal(reopened[4], second[0])


def test_store_errors_name_the_problem(tmp_path):
    store = LocalFeatureStore(tmp_path, num_ids=5)
    with pytest.raises(ValueError, match="was written with"):
        LocalFeatureStore(tmp_path, num_ids=5, dtype="float32", mode="r")
    descriptors, keypoints = features(0, 3)
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        store.add([5], [descriptors], [keypoints])
    with pytest.raises(ValueError, match=r"expected descriptors \[N, 128\]"):
        store.add([0], [descriptors[:, :64]], [keypoints])
    store.add([0], [descriptors], [keypoints])
    with pytest.raises(ValueError, match="already in the store"):
        store.add([0], [descriptors], [keypoints])
    with pytest.raises(KeyError, match="image id 1 is not in the local-feature store"):
        store[1]


def test_resumable_array_keeps_committed_rows_and_refuses_another_shape(tmp_path):
    array = ResumableArray(tmp_path / "a.npy", (6, 3))
    assert array.todo() == [range(0, 6)]
    array.write(0, np.full((4, 3), 1.5))
    reopened = ResumableArray(tmp_path / "a.npy", (6, 3))
    assert reopened.todo() == [range(4, 6)] and not reopened.complete
    assert (reopened.array[:4] == 1.5).all()
    with pytest.raises(ValueError, match="another run"):
        ResumableArray(tmp_path / "a.npy", (7, 3))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_row_files_read_the_rows_of_an_npy_file_without_mapping_it(tmp_path, dtype):
    rows = np.arange(60, dtype=dtype).reshape(12, 5)
    np.save(tmp_path / "a.npy", rows)
    whole, part = RowFile(tmp_path / "a.npy"), RowFile(tmp_path / "a.npy", range(4, 10))
    assert whole.shape == (12, 5) and part.shape == (6, 5) and part.dtype == dtype
    np.testing.assert_array_equal(whole[3:7], rows[3:7])
    np.testing.assert_array_equal(part[1:100], rows[5:10])
    assert part[6:].shape == (0, 5)
    os.truncate(tmp_path / "a.npy", os.path.getsize(tmp_path / "a.npy") - 8)
    with pytest.raises(ValueError, match="a.npy ends at byte .* it is truncated"):
        whole[8:12]


def test_a_truncated_local_store_is_found_and_its_images_recomputed(
    labelled_set, tiny_weights, reference_run, tmp_path, monkeypatch, caplog
):
    cache = kept_run(labelled_set, tiny_weights, tmp_path / "run")
    store = cache / "database_local_float32"
    descriptors = store / "descriptors.bin"
    records = np.fromfile(store / "entries.commits", np.int64).reshape(-1, 4)
    cut = descriptors.stat().st_size // 2
    damaged = set(records[(records[:, 1] + records[:, 2]) * 512 > cut, 0].tolist())
    os.truncate(descriptors, cut)
    for scores in (cache / "queries").glob("rerank_scores_*"):
        scores.unlink()  # else the finished scores are reused and the store is never read
    calls = ModelCalls(monkeypatch)
    caplog.set_level("WARNING")
    run_eval(config_for(labelled_set, tmp_path / "run", tiny_weights, keep_cache=True))
    assert same_outputs(tmp_path / "run", reference_run)
    assert "missing data (truncated files), left out so they are computed again" in caplog.text
    candidates = set(np.load(tmp_path / "run" / "queries" / "predictions_global.npy")[:, :8].ravel().tolist())
    assert damaged & candidates and calls.images == len(damaged & candidates)


def test_store_damage_is_reported_never_read_as_zeros(tmp_path, caplog):
    with LocalFeatureStore(tmp_path, num_ids=10, dtype="float32") as store:
        for image_id in range(6):
            store.add([image_id], *[[part] for part in store_features(image_id)])
    rows = sum(len(store_features(i)[0]) for i in range(6))
    # Bit rot in image 2, and the file cut inside image 5.
    with open(tmp_path / "descriptors.bin", "r+b") as handle:
        handle.seek(sum(len(store_features(i)[0]) for i in range(2)) * 512 + 40)
        handle.write(b"\x7f")
    os.truncate(tmp_path / "descriptors.bin", (rows - 3) * 512)
    caplog.set_level("WARNING")
    reader = LocalFeatureStore(tmp_path, num_ids=10, dtype="float32", mode="r")
    assert reader.missing(np.arange(6)).tolist() == [2, 5]
    assert all(torch.equal(reader[i], store_features(i)[0]) for i in (0, 1, 3, 4))
    assert "checksum mismatch" in caplog.text and "ids 2" in caplog.text and "ids 5" in caplog.text
    assert (tmp_path / "descriptors.bin").stat().st_size == (rows - 3) * 512  # a reader never writes
    # A writer drops the damaged records and stores the images again.
    with LocalFeatureStore(tmp_path, num_ids=10, dtype="float32") as writer:
        assert writer.missing(np.arange(6)).tolist() == [2, 5]
        writer.add([2, 5], *[list(parts) for parts in zip(store_features(2), store_features(5))])
    again = LocalFeatureStore(tmp_path, num_ids=10, dtype="float32", mode="r")
    assert all(torch.equal(again[i], store_features(i)[0]) for i in range(6))


def test_a_second_writer_of_a_store_is_refused(tmp_path):
    with LocalFeatureStore(tmp_path, num_ids=3):
        with pytest.raises(RunLockedError, match="local-feature store"):
            LocalFeatureStore(tmp_path, num_ids=3)
        LocalFeatureStore(tmp_path, num_ids=3, mode="r")  # readers are always welcome


WRITER = """
import sys
import torch, torch.nn.functional as F
from fol_plugin.features import LocalFeatureStore
from tests.conftest import store_features
with LocalFeatureStore(sys.argv[1], num_ids=400, dtype="float32") as store:
    print("open", flush=True)
    for image_id in range(400):
        store.add([image_id], *[[part] for part in store_features(image_id)])
"""


def test_a_reader_beside_a_writer_sees_only_complete_entries(tmp_path):
    folder = tmp_path / "store"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert writer.stdout.readline().strip() == "open"
    seen, checked = 0, 0
    while writer.poll() is None or seen < 400:
        reader = LocalFeatureStore(folder, num_ids=400, dtype="float32", mode="r")
        stored = [i for i in range(400) if i in reader]
        for image_id in stored[-5:]:  # the newest entries, the ones a torn write would hit
            descriptors, keypoints = store_features(image_id)
            assert torch.equal(reader[image_id], descriptors) and torch.equal(reader.keypoints(image_id), keypoints)
            checked += 1
        seen = len(stored)
        if writer.poll() is not None and seen < 400:
            break
    assert writer.wait(timeout=60) == 0
    final = LocalFeatureStore(folder, num_ids=400, dtype="float32", mode="r")
    assert len(final) == 400 and all(torch.equal(final[i], store_features(i)[0]) for i in range(400))
    assert checked > 5
