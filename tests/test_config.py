"""What a run is (``fol_plugin.evaluation.config``): checks of the predictions a user gives."""
from __future__ import annotations

import numpy as np
import pytest

from fol_plugin.evaluation.config import check_predictions


def test_given_predictions_pass_as_int64():
    given = check_predictions(np.array([[2, 0, 1], [1, 2, 0]], dtype=np.int32), 2, 3, "the predictions for q")
    assert given.dtype == np.int64 and given.tolist() == [[2, 0, 1], [1, 2, 0]]


def test_a_database_index_listed_twice_for_one_query_is_refused():
    given = np.array([[0, 1, 2], [3, 1, 3]])
    with pytest.raises(ValueError, match=r"the predictions for q list database index 3 2 times for query 1 \(ranks \[0, 2\]\)"):
        check_predictions(given, 2, 4, "the predictions for q")
