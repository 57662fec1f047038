"""Resumable arrays (``fol_plugin.features.arrays``): damaged rows are found and computed again."""
from __future__ import annotations

import os

import pytest

from fol_plugin.evaluation import run_eval

from .conftest import ModelCalls, config_for, kept_run, same_outputs


@pytest.mark.parametrize("damage", ["truncate", "zero"])
def test_damaged_global_descriptors_are_found_and_recomputed(
    labelled_set, tiny_weights, reference_run, tmp_path, monkeypatch, caplog, damage
):
    cache = kept_run(labelled_set, tiny_weights, tmp_path / "run")
    array = cache / "database_global.npy"
    header = array.stat().st_size - 17 * 8448 * 4
    if damage == "truncate":  # the file ends inside row 9
        os.truncate(array, header + 9 * 8448 * 4 + 100)
    else:  # rows 12-13 zeroed in place
        with open(array, "r+b") as handle:
            handle.seek(header + 12 * 8448 * 4)
            handle.write(bytes(2 * 8448 * 4))
    calls = ModelCalls(monkeypatch)
    caplog.set_level("WARNING")
    run_eval(config_for(labelled_set, tmp_path / "run", tiny_weights, keep_cache=True))
    assert same_outputs(tmp_path / "run", reference_run)
    assert "database_global.npy: rows" in caplog.text and "are damaged" in caplog.text
    # Only the damaged batches (of 4) go through the model again: rows 8-16 of the truncated
    # file, the batch of rows 12-15 of the zeroed one.
    assert calls.images == (17 - 8 if damage == "truncate" else 4)
