"""A run's outputs (``fol_plugin.evaluation.outputs``): any file name the file system allows is
listed, fingerprinted and written, and the run's own preds files read back."""
from __future__ import annotations

import csv
import errno
import os
import shutil

import numpy as np
import pytest

from fol_plugin.data.datasets import list_images
from fol_plugin.evaluation import run_eval
from fol_plugin.evaluation.inputs import read_preds_files

from .conftest import config_for

NOT_UTF8 = os.fsdecode(b"caf\xe9")  # Latin-1 'café': one byte that is not UTF-8


@pytest.fixture
def odd_names(labelled_set, tmp_path):
    """The labelled set with a database image and a query whose names are not UTF-8."""
    root = tmp_path / "odd"
    shutil.copytree(labelled_set, root)
    for folder, index in (("database", 4), ("queries", 1)):
        path = sorted((root / folder).iterdir())[index]
        path.rename(path.with_name(path.name.replace("@.jpg", f"{NOT_UTF8}@.jpg")))
    return root


def test_names_that_are_not_utf8_run_and_are_written_as_their_bytes(odd_names, tiny_weights, tmp_path):
    config = config_for(odd_names, tmp_path / "run", tiny_weights, num_preds_to_save=3)
    summary = run_eval(config)
    assert summary["query_sets"]["queries"]["reranked"]
    database = list_images(odd_names / "database")
    queries = list_images(odd_names / "queries")
    odd = b"caf\xe9@.jpg"
    assert odd in (tmp_path / "run" / "queries" / "predictions.csv").read_bytes()
    assert any(odd in path.read_bytes() for path in (tmp_path / "run" / "queries" / "preds_reranked").glob("*.txt"))
    with open(tmp_path / "run" / "queries" / "predictions.csv", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = list(csv.DictReader(handle))
    assert next(path for path in queries if NOT_UTF8 in path) in {row["query_path"] for row in rows}
    assert next(path for path in database if NOT_UTF8 in path) in {row["database_path"] for row in rows}
    # The run's own preds files re-rank with fol-vpr rerank's reader.
    predictions = read_preds_files(tmp_path / "run" / "queries" / "preds_global", queries, database)
    np.testing.assert_array_equal(predictions, np.load(tmp_path / "run" / "queries" / "predictions_global.npy")[:, :3])


def test_a_line_break_in_a_name_is_refused_before_any_work_when_preds_files_are_asked(labelled_set, tiny_weights, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(labelled_set, root)
    path = sorted((root / "database").iterdir())[2]
    path.rename(path.with_name(path.name.replace("@.jpg", "two\nlines@.jpg")))
    with pytest.raises(ValueError, match=r"holds a line break, .* rename the file, or run without --num_preds_to_save"):
        run_eval(config_for(root, tmp_path / "run", tiny_weights, num_preds_to_save=2))
    assert not (tmp_path / "run" / "cache").exists()
    run_eval(config_for(root, tmp_path / "run2", tiny_weights, num_preds_to_save=0))
    with open(tmp_path / "run2" / "queries" / "predictions.csv", newline="") as handle:
        assert any("two\nlines" in row["database_path"] for row in csv.DictReader(handle))


def test_a_full_disk_leaves_no_partial_prediction_file(labelled_set, tiny_weights, tmp_path, monkeypatch):
    """The disk fills up while the outputs are written: no 0-byte .npy is left, and the rerun
    writes them all."""
    output = tmp_path / "run"
    config = config_for(labelled_set, output, tiny_weights)
    real_save = np.save

    def full_disk(file, array, *args, **kwargs):
        if "predictions_reranked" in str(getattr(file, "name", file)):
            file.write(b"\x93NUMPY")  # a part was written when the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(Exception, match="disk full at .*predictions_reranked.npy"):
        run_eval(config)
    assert not (output / "queries" / "predictions_reranked.npy").exists()
    assert not list(output.rglob("*.tmp"))
    monkeypatch.setattr(np, "save", real_save)
    run_eval(config)
    assert np.load(output / "queries" / "predictions_reranked.npy").shape[0] == 5
