"""The two-stage evaluation end to end on a small labelled set built from the shared toy photos,
with a tiny ViT (plumbing, not accuracy), plus its building blocks and its errors."""
from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from fol_plugin import checkpoint, cli
from fol_plugin.data.datasets import find_positives, list_images, load_image_set
from fol_plugin.evaluation import InsufficientDiskError, compute_recalls, pipeline, run_eval, run_rerank
from fol_plugin.evaluation.inputs import read_preds_files
from fol_plugin.evaluation.outputs import write_preds_files
from fol_plugin.evaluation.timings import TIMINGS_FILE
from fol_plugin.matching import ScorerConfig
from fol_plugin.models import FoLModel
from fol_plugin.rerank import order_by_scores
from fol_plugin.retrieval import exact_search

from .conftest import DATA, TINY_VIT, config_for, copy_indices, require, utm_name

def hand_recalls(predictions: np.ndarray, database_east: np.ndarray, query_east: np.ndarray, n: int) -> float:
    """Recall@n straight from the definition: a query is found when one of its first n
    predictions lies within 25 m."""
    found = 0
    for q, row in enumerate(predictions):
        found += any(abs(database_east[i] - query_east[q]) <= 25 for i in row[:n])
    return 100 * found / len(predictions)


def test_end_to_end_recalls_match_a_hand_computation(labelled_set, tiny_weights, tmp_path):
    summary = run_eval(config_for(labelled_set, tmp_path / "run", tiny_weights))
    out = tmp_path / "run" / "queries"
    global_predictions = np.load(out / "predictions_global.npy")
    reranked = np.load(out / "predictions_reranked.npy")
    # max(recall_values) = 20 predictions asked, but the database has only 17 images.
    assert global_predictions.shape == reranked.shape == (5, 17)
    database = load_image_set(labelled_set / "database")
    queries = load_image_set(labelled_set / "queries")
    # Each query is an exact copy of a database photo: global retrieval ranks it first.
    assert global_predictions[:, 0].tolist() == copy_indices(database.paths, queries.paths)
    for predictions, stage in ((global_predictions, "global"), (reranked, "reranked")):
        # R@20 with 17 database images counts all 17 predictions, as VPR-methods-evaluation reports it.
        for n in (1, 5, 10, 20):
            expected = hand_recalls(predictions, database.utms[:, 0], queries.utms[:, 0], n)
            assert summary["query_sets"]["queries"][stage][f"R@{n}"] == pytest.approx(expected)
    # Three of five queries have a positive, and it is their exact copy, first in both stages.
    assert summary["query_sets"]["queries"]["reranked"]["R@1"] == pytest.approx(60.0)
    # Re-ranking only reorders each query's first 8 candidates.
    assert (np.sort(reranked[:, :8], axis=1) == np.sort(global_predictions[:, :8], axis=1)).all()
    assert (reranked[:, 8:] == global_predictions[:, 8:]).all()
    # What the run writes.
    assert json.loads((tmp_path / "run" / "recalls.json").read_text())["query_sets"]["queries"]["global"]
    csv_lines = (out / "predictions.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 5 * 17
    assert sorted(p.name for p in (out / "preds_reranked").iterdir())[:2] == ["000.png", "000.txt"]
    assert (read_preds_files(out / "preds_reranked", queries.paths, database.paths) == reranked[:, :2]).all()


@pytest.mark.parametrize("rerank_topk", [8, 2], ids=["one-pass", "two-pass"])
def test_low_memory_and_in_memory_runs_agree(labelled_set, tiny_weights, tmp_path, rerank_topk):
    low = run_eval(config_for(labelled_set, tmp_path / "low", tiny_weights, store_dtype="float32", rerank_topk=rerank_topk))
    high = run_eval(config_for(labelled_set, tmp_path / "high", tiny_weights, in_memory=True, rerank_topk=rerank_topk))
    for name in ("predictions_global.npy", "predictions_reranked.npy", "rerank_scores.npy"):
        assert (np.load(tmp_path / "low" / "queries" / name) == np.load(tmp_path / "high" / "queries" / name)).all()
    assert low["query_sets"] == high["query_sets"]
    assert 0 < low["store_bytes_per_image"] < 3600 * 128 * 4


@pytest.mark.parametrize("rerank_topk", [8, 2], ids=["one-pass", "two-pass"])
def test_an_interrupted_run_resumes_without_recomputing(labelled_set, tiny_weights, tmp_path, monkeypatch, rerank_topk):
    """5 queries x top-8 cover the 17 database images: their local features come with the global
    pass. With top-2, a second pass extracts only the candidates' local features."""
    reference = run_eval(config_for(labelled_set, tmp_path / "reference", tiny_weights, rerank_topk=rerank_topk))
    calls = {"forward": 0, "extract": 0, "interrupt_after": 5 + 8}  # the queries, then 2 database batches
    forward, extract = FoLModel.forward, FoLModel.extract

    def counting(method, name):
        def run(self, images):
            if calls["forward"] + calls["extract"] + len(images) > calls["interrupt_after"]:
                raise KeyboardInterrupt
            calls[name] += len(images)
            return method(self, images)

        return run

    monkeypatch.setattr(FoLModel, "forward", counting(forward, "forward"))
    monkeypatch.setattr(FoLModel, "extract", counting(extract, "extract"))
    config = config_for(labelled_set, tmp_path / "resumed", tiny_weights, rerank_topk=rerank_topk)
    with pytest.raises(KeyboardInterrupt):
        run_eval(config)
    interrupted = json.loads((tmp_path / "resumed" / "cache" / TIMINGS_FILE).read_text())
    calls.update(forward=0, extract=0, interrupt_after=1000)
    resumed = run_eval(config)
    assert resumed["query_sets"] == reference["query_sets"]
    # Timings survive the resume: each stage's seconds are the two processes' sum, and say so.
    assert reference["timings_runs"] == 1 and resumed["timings_runs"] == 2 == interrupted["runs"] + 1
    for stage, seconds in interrupted["seconds"].items():
        assert resumed["timings_s"][stage] > seconds
    for name in ("predictions_global.npy", "predictions_reranked.npy", "rerank_scores.npy"):
        assert (np.load(tmp_path / "resumed" / "queries" / name) == np.load(tmp_path / "reference" / "queries" / name)).all()
    # Only the 9 database images not done before go through the model again, and, with two
    # passes, the candidates' local features (the queries' were stored).
    candidates = np.unique(np.load(tmp_path / "resumed" / "queries" / "predictions_global.npy")[:, :rerank_topk])
    if rerank_topk == 8:
        assert calls == {"forward": 0, "extract": 17 - 8, "interrupt_after": 1000}
    else:
        assert calls == {"forward": 17 - 8, "extract": len(candidates), "interrupt_after": 1000}


def test_rerank_command_reads_harness_predictions(labelled_set, tiny_weights, tmp_path):
    database = load_image_set(labelled_set / "database")
    queries = load_image_set(labelled_set / "queries")
    rng = np.random.default_rng(0)
    given = np.stack([rng.permutation(len(database))[:10] for _ in range(len(queries))])
    write_preds_files(tmp_path / "preds", queries.paths, database.paths, given, None)
    config = config_for(labelled_set, tmp_path / "rerank", tiny_weights, num_preds_to_save=0)
    from_txt = run_rerank(config, [read_preds_files(tmp_path / "preds", queries.paths, database.paths)])
    before = compute_recalls(given, find_positives(database.utms, queries.utms), (1, 5, 10, 20))
    assert from_txt["query_sets"]["queries"]["global"] == {f"R@{n}": pytest.approx(v) for n, v in before.items()}
    reranked = np.load(tmp_path / "rerank" / "queries" / "predictions_reranked.npy")
    assert (np.sort(reranked, axis=1) == np.sort(given, axis=1)).all()
    # A query whose copy was among the candidates gets it first after re-ranking.
    for q, copy in enumerate(copy_indices(database.paths, queries.paths)):
        if copy in given[q]:
            assert reranked[q, 0] == copy
    # Other predictions in the same output folder: the cached scores of the first run are not reused.
    other = np.stack([rng.permutation(len(database))[:10] for _ in range(len(queries))])
    run_rerank(config, [other])
    run_rerank(config_for(labelled_set, tmp_path / "fresh", tiny_weights, num_preds_to_save=0), [other])
    for name in ("rerank_scores.npy", "predictions_reranked.npy"):
        assert (np.load(tmp_path / "rerank" / "queries" / name) == np.load(tmp_path / "fresh" / "queries" / name)).all()


def test_recalls_and_stable_reordering():
    predictions = np.array([[3, 1, 2], [0, 2, 1], [2, 0, 1]])
    positives = [np.array([2]), np.array([0, 1]), np.array([], dtype=np.int64)]
    assert compute_recalls(predictions, positives, (1, 2, 3)) == {1: pytest.approx(100 / 3), 2: pytest.approx(100 / 3),
                                                                   3: pytest.approx(200 / 3)}
    scores = np.array([[5.0, 7.0], [2.0, 2.0], [0.0, 1.0]])
    assert order_by_scores(predictions, scores).tolist() == [[1, 3, 2], [0, 2, 1], [0, 2, 1]]


def test_chunked_search_equals_one_index():
    rng = np.random.default_rng(1)
    database = rng.standard_normal((300, 16)).astype(np.float32)
    database[150] = database[20]  # an exact tie: the lower index comes first
    queries = np.concatenate([rng.standard_normal((6, 16)).astype(np.float32), database[20:21]])
    whole = exact_search(database, queries, 10, chunk_size=1000)
    chunked = exact_search(database, queries, 10, chunk_size=64)
    assert (whole[1] == chunked[1]).all() and np.allclose(whole[0], chunked[0])
    assert whole[1][-1, :2].tolist() == [20, 150]


def test_paths_file_is_used_and_checked(tmp_path):
    folder = tmp_path / "database"
    folder.mkdir()
    for name in ("b.jpg", "a.jpg"):
        (folder / name).write_bytes(b"x")
    assert [Path(p).name for p in list_images(folder)] == ["a.jpg", "b.jpg"]
    (tmp_path / "database_images_paths.txt").write_text("b.jpg\na.jpg\n")
    assert [Path(p).name for p in list_images(folder)] == ["b.jpg", "a.jpg"]
    (tmp_path / "database_images_paths.txt").write_text("missing.jpg\n")
    with pytest.raises(FileNotFoundError, match="database_images_paths.txt"):
        list_images(folder)


def run_cli(*args: str) -> int:
    return cli.main(list(args))


def test_bad_inputs_give_clear_errors(labelled_set, tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["--output_dir", str(tmp_path / "out"), "--image_size", "126", "126"]
    assert run_cli("eval", "--database_folder", str(empty), "--queries_folder", str(labelled_set / "queries"), *base) == 2
    assert f"no images (.jpg, .jpeg, .png) found in {empty}" in caplog.text

    unlabelled = require(DATA / "toy_dataset")
    caplog.clear()
    assert run_cli("eval", "--database_folder", str(unlabelled / "database"),
                   "--queries_folder", str(unlabelled / "queries"), *base) == 2
    assert "db1.jpg" in caplog.text and "--no_labels" in caplog.text

    caplog.clear()
    assert run_cli("eval", "--database_folder", str(labelled_set / "database"), "--queries_folder",
                   str(labelled_set / "queries"), "--output_dir", str(tmp_path / "o"), "--image_size", "320", "320") == 2
    assert "320 is not a multiple of the patch size 14; resize to 308 or 322" in caplog.text

    caplog.clear()
    np.save(tmp_path / "db.npy", np.zeros((17, 64), np.float32))
    np.save(tmp_path / "q.npy", np.zeros((5, 32), np.float32))
    assert run_cli("rerank", "--database_folder", str(labelled_set / "database"), "--queries_folder",
                   str(labelled_set / "queries"), "--database_descriptors", str(tmp_path / "db.npy"),
                   "--queries_descriptors", str(tmp_path / "q.npy"), *base) == 2
    assert "q.npy is (5, 32), expected [5, 64]" in caplog.text


def test_an_unreadable_image_is_named(labelled_set, tiny_weights, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(labelled_set, root)
    bad = root / "database" / utm_name(0, 0, "zz_broken")
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*zz_broken"):
        run_eval(config_for(root, tmp_path / "out", tiny_weights))


def test_a_run_the_disk_cannot_hold_is_refused_before_any_work(labelled_set, tiny_weights, tmp_path, monkeypatch, caplog):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(pipeline, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    caplog.set_level("INFO")
    with pytest.raises(InsufficientDiskError, match=r"this run needs .* GB .* only 0.00 GB are free.*--store_dtype float16"):
        run_eval(config_for(labelled_set, tmp_path / "out", tiny_weights))
    assert "Projected:" in caplog.text and "GB on disk" in caplog.text


def test_a_matcher_plus_ransac_scorer_reranks(labelled_set, tiny_weights, tmp_path):
    summary = run_eval(config_for(labelled_set, tmp_path / "ransac", tiny_weights, scorer=ScorerConfig("mnn+ransac")))
    out = tmp_path / "ransac" / "queries"
    scores, reranked = np.load(out / "rerank_scores.npy"), np.load(out / "predictions_reranked.npy")
    database, queries = load_image_set(labelled_set / "database"), load_image_set(labelled_set / "queries")
    # An exact copy matches every keypoint onto itself: the most inliers, first after re-ranking.
    assert reranked[:, 0].tolist() == copy_indices(database.paths, queries.paths)
    assert (scores[:, 0] == scores.max(axis=1)).all() and (scores[:, 0] > scores[:, 1]).all()
    assert summary["config"]["scorer"]["name"] == "mnn+ransac"


def test_rerank_command_line_matches_the_python_api(labelled_set, tiny_weights, tmp_path, monkeypatch):
    database, queries = load_image_set(labelled_set / "database"), load_image_set(labelled_set / "queries")
    given = np.stack([np.random.default_rng(q).permutation(len(database))[:10] for q in range(len(queries))])
    write_preds_files(tmp_path / "preds", queries.paths, database.paths, given, None)
    np.save(tmp_path / "given.npy", given)
    run_rerank(config_for(labelled_set, tmp_path / "api", tiny_weights, num_preds_to_save=0, rerank_topk=10), [given])
    monkeypatch.setattr(checkpoint, "FoLModel", lambda backbone, **kwargs: FoLModel(TINY_VIT, **kwargs))
    for source in ("preds", "given.npy"):
        code = cli.main([
            "rerank", "--database_folder", str(labelled_set / "database"), "--queries_folder", str(labelled_set / "queries"),
            "--predictions", str(tmp_path / source), "--backbone", "vitb", "--weights", str(tiny_weights),
            "--image_size", "126", "126", "--rerank_topk", "10", "--num_workers", "0", "--recall_values", "1", "5",
            "--output_dir", str(tmp_path / source.replace(".", "_")),
        ])
        assert code == 0
        for name in ("predictions_reranked.npy", "rerank_scores.npy"):
            ours = np.load(tmp_path / source.replace(".", "_") / "queries" / name)
            assert (ours == np.load(tmp_path / "api" / "queries" / name)).all()


def test_fewer_given_predictions_than_the_depth_and_the_recalls_say_so(labelled_set, tiny_weights, tmp_path, caplog):
    """``fol-vpr rerank`` of 3 predictions per query (another method saved with
    ``--num_preds_to_save 3``): one warning line; ``recalls.json`` says the depth used."""
    given = np.tile(np.arange(3), (5, 1))
    config = config_for(labelled_set, tmp_path / "run", tiny_weights, rerank_topk=8)
    summary = run_rerank(config, [given])
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "predictions per query" in r.getMessage()]
    assert "hold 3 predictions per query: re-ranking the top 3, not --rerank_topk 8" in line
    assert "R@5, R@10, R@20 count only those 3 (lower bounds: the database has 17 images)" in line
    assert summary["query_sets"]["queries"]["rerank_topk_used"] == 3
