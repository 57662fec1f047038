"""``fol-vpr eval`` against the original evaluation protocol, with a real-size checkpoint (ViT-B at
322x322, the shared reference weights) on labelled toy photos. Slow: deselected by default."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fol_plugin.data import load_image, preprocess
from fol_plugin.data.datasets import load_image_set
from fol_plugin import cli
from fol_plugin.models import FoLModel

from .conftest import DATA, require, save_upstream_checkpoint, utm_name
from .original_protocol import original_rerank, original_search

pytestmark = pytest.mark.slow

ORIGINAL_BATCH = 16  # the original's --infer_batch_size
TOP_K = 10


@pytest.fixture(scope="module")
def labelled_toy(tmp_path_factory):
    toy = require(DATA / "toy_dataset")
    root = tmp_path_factory.mktemp("toy")
    for kind, east in (("database", lambda i: 30.0 * i), ("queries", lambda i: 30.0 * (3 * i + 1) + 5)):
        (root / kind).mkdir()
        for i, source in enumerate(sorted((toy / kind).glob("*.jpg"))):
            shutil.copyfile(source, root / kind / utm_name(east(i), 0.0, source.stem))
    return root


def test_eval_gives_the_original_protocols_predictions(labelled_toy, parity_fixture, tmp_path):
    weights = save_upstream_checkpoint(parity_fixture["state_dict"], tmp_path / "FoL_base.pth")
    exit_code = cli.main([
        "eval", "--backbone", "vitb", "--weights", str(weights), "--image_size", "322", "322",
        "--database_folder", str(labelled_toy / "database"), "--queries_folder", str(labelled_toy / "queries"),
        "--recall_values", "1", "5", "10", "--rerank_topk", str(TOP_K), "--num_workers", "0",
        "--output_dir", str(tmp_path / "run"),
    ])
    assert exit_code == 0
    summary = json.loads((tmp_path / "run" / "recalls.json").read_text())
    ours_global = np.load(tmp_path / "run" / "queries" / "predictions_global.npy")
    ours_reranked = np.load(tmp_path / "run" / "queries" / "predictions_reranked.npy")

    # The original: every image through the model in batches of 16, one faiss index, padded
    # re-ranking, argsort()[::-1].
    database, queries = load_image_set(labelled_toy / "database"), load_image_set(labelled_toy / "queries")
    model = FoLModel("vitb").eval()
    model.load_state_dict(parity_fixture["state_dict"])
    paths = database.paths + queries.paths
    global_descriptors, local_descriptors = [], []
    with torch.inference_mode():
        for start in range(0, len(paths), ORIGINAL_BATCH):
            batch = torch.cat([preprocess(load_image(p), (322, 322)) for p in paths[start : start + ORIGINAL_BATCH]])
            features = model.extract(batch)
            global_descriptors.append(features.global_descriptors.numpy())
            local_descriptors += features.local_descriptors
    global_descriptors = np.concatenate(global_descriptors)
    n = len(database)
    _, original_global = original_search(global_descriptors[:n], global_descriptors[n:], TOP_K)
    original_reranked, original_scores = original_rerank(original_global, local_descriptors[n:], local_descriptors[:n])

    assert (ours_global == original_global).all()
    ours_scores = np.load(tmp_path / "run" / "queries" / "rerank_scores.npy")
    bad = np.argwhere(ours_scores != original_scores)
    assert len(bad) == 0, [(q, j, ours_scores[q, j], original_scores[q, j], ours_global[q, j]) for q, j in bad]
    # Same order wherever the scores differ; equal scores keep the global order in ours.
    for q in range(len(queries)):
        score_of = dict(zip(original_global[q].tolist(), original_scores[q].tolist()))
        assert [score_of[i] for i in ours_reranked[q]] == [score_of[i] for i in original_reranked[q]]
    assert set(summary["query_sets"]["queries"]["reranked"]) == {"R@1", "R@5", "R@10"}
