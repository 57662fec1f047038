"""What a run is (``fol_plugin.evaluation.config``): the output folder names of its query sets and
the checks of the predictions a user gives."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fol_plugin.evaluation import config as config_module, run_eval
from fol_plugin.evaluation.config import check_predictions

from .conftest import config_for


def test_given_predictions_pass_as_int64():
    given = check_predictions(np.array([[2, 0, 1], [1, 2, 0]], dtype=np.int32), 2, 3, "the predictions for q")
    assert given.dtype == np.int64 and given.tolist() == [[2, 0, 1], [1, 2, 0]]


def test_a_database_index_listed_twice_for_one_query_is_refused():
    given = np.array([[0, 1, 2], [3, 1, 3]])
    with pytest.raises(ValueError, match=r"the predictions for q list database index 3 2 times for query 1 \(ranks \[0, 2\]\)"):
        check_predictions(given, 2, 4, "the predictions for q")


def test_query_folder_names_cannot_write_into_the_cache_or_outside(labelled_set, tiny_weights, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(labelled_set, root)
    shutil.copytree(root / "queries", root / "cache")
    output = tmp_path / "out"
    outside = lambda: {p for p in tmp_path.rglob("*") if p != output and output not in p.parents}  # noqa: E731
    before = outside()
    summary = run_eval(config_for(
        root, output, tiny_weights, queries_folders=[root / "cache", root / "queries" / "..", root / "queries"],
        recall_values=(1,), keep_cache=False, labelled=False, num_preds_to_save=0,
    ))
    assert list(summary["query_sets"]) == ["queries_cache", "data", "queries"]
    assert sorted(p.name for p in output.iterdir()) == ["data", "queries", "queries_cache", "recalls.json"]  # the lock went
    assert (output / "queries_cache" / "predictions_global.npy").exists()
    assert outside() == before  # nothing written outside
    assert config_module.output_key(Path("a/b c:*"), set()) == "b_c"
    assert config_module.output_key(Path("/"), set()) == "queries"
