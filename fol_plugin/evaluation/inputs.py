"""What a run reads besides images: another method's predictions to re-rank, as a [Q, K] .npy
of database indices or as VPR-methods-evaluation's ``preds/`` folder (one ``NNN.txt`` per
query), the format :func:`~fol_plugin.evaluation.outputs.write_preds_files` writes."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PREDS_HEADERS = ("Query path:", "Predictions paths:", "Positives paths:")
PREDICTIONS_SUFFIX = ".npy"


def load_predictions(
    source: str | os.PathLike, query_paths: Sequence[str], database_paths: Sequence[str], option: str = "--predictions"
) -> np.ndarray:
    """The predictions [Q, K] of ``source``: a ``.npy`` file, or a preds folder read against the
    query and database listings (checked later by
    :func:`~fol_plugin.evaluation.config.check_predictions`).

    Raises:
        FileNotFoundError: neither, naming ``option``.
    """
    source = Path(source)
    if source.is_dir():
        return read_preds_files(source, query_paths, database_paths)
    if source.suffix == PREDICTIONS_SUFFIX and source.is_file():
        return np.load(source)
    raise FileNotFoundError(f"{option} {source}: expected a preds/ folder of .txt files or a .npy file")


def read_preds_files(folder: str | os.PathLike, query_paths: Sequence[str], database_paths: Sequence[str]) -> np.ndarray:
    """Predictions [Q, K] (indices into ``database_paths``) from VPR-methods-evaluation's
    ``preds/{q:03d}.txt`` files, one per query of ``query_paths`` in order."""
    folder = Path(folder)
    database_index = {_path_key(path): i for i, path in enumerate(database_paths)}
    rows = []
    for q, query_path in enumerate(query_paths):
        path = folder / f"{q:03d}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {folder} must hold one file per query ({len(query_paths)})")
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()]
        try:
            start = lines.index(PREDS_HEADERS[1]) + 1
            listed_query = lines[lines.index(PREDS_HEADERS[0]) + 1]
        except ValueError:
            raise ValueError(
                f"{path} is not a VPR-methods-evaluation predictions file (no {PREDS_HEADERS[:2]} sections)"
            ) from None
        # The positives section is there only when the harness had labels.
        end = lines.index(PREDS_HEADERS[2]) if PREDS_HEADERS[2] in lines else len(lines)
        if _path_key(listed_query) != _path_key(query_path):
            raise ValueError(
                f"{path} is for query {listed_query}, but query {q} of --queries_folder is {query_path}: "
                f"the predictions come from another query set"
            )
        row = []
        for line in filter(None, lines[start:end]):
            if _path_key(line) not in database_index:
                raise ValueError(f"{path} predicts {line}, which is not an image of --database_folder")
            row.append(database_index[_path_key(line)])
        rows.append(row)
    lengths = {len(row) for row in rows}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"the files in {folder} list different or zero numbers of predictions: {sorted(lengths)}")
    return np.array(rows, dtype=np.int64)


def _path_key(path: str) -> str:
    """Paths compare by their last three components, so relative and absolute spellings match."""
    return "/".join(Path(path).parts[-3:])
