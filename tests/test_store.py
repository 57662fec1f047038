"""The disk-backed local-feature store and resumable arrays."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fol_plugin.features import LocalFeatureStore, ResumableArray, RowFile
from fol_plugin.features.store import ENTRY_BYTES


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
