"""``fol-vpr report``, FoL's confidence and adaptive re-ranking, on a labelled mini set of the
toy photos whose queries are edited copies (so distances and scores differ) and a tiny ViT
(plumbing, not accuracy): the report holds what the run's files say, the APs are scikit-learn's,
and ``--rerank_fraction`` re-ranks exactly the least confident queries."""
from __future__ import annotations

import csv
import html
import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from sklearn.metrics import average_precision_score, precision_recall_curve

from fol_plugin import checkpoint, cli
from fol_plugin.benchmark import BenchmarkConfig, DatasetSpec, QuerySetSpec, run_benchmark
from fol_plugin.evaluation import run_eval, run_rerank
from fol_plugin.evaluation.confidence import CONFIDENCE_FILE, num_reranked, select_queries
from fol_plugin.features import ExtractionConfig
from fol_plugin.models import FoLModel
from fol_plugin.report import REPORT_FILE, ReportOptions, RunFolderError, write_report

from .conftest import (
    DATA,
    IMAGE_SIZE,
    NEAR_QUERIES,
    SPACING,
    TINY_VIT,
    config_for,
    require,
    tiny_cli_args,
    toy_database_on_a_line,
    utm_name,
)

NEAR, FAR = "near", "far"
# (database photo, edit, label): each query is an edited copy of a database photo, labelled 10 m
# from it ("near": its positive) or 1 km past the last place ("far": no positive at all).
QUERIES = (
    (0, "copy", NEAR), (3, "crop", NEAR), (7, "dark", NEAR), (9, "mirror", NEAR), (12, "crop", NEAR),
    (13, "copy", FAR), (5, "crop", FAR), (11, "dark", FAR),
)  # fmt: skip
EDITS = {
    "copy": lambda image: image,
    "crop": lambda image: image.crop((40, 40, 472, 472)).resize(image.size),
    "dark": lambda image: ImageEnhance.Brightness(image).enhance(0.6),
    "mirror": ImageOps.mirror,
}
STATUS_OF = {(False, True): "fixed", (True, False): "broken", (False, False): "wrong", (True, True): "right"}


@pytest.fixture(scope="module")
def varied_set(tmp_path_factory) -> Path:
    """17 database photos 100 m apart and the 8 edited copies of :data:`QUERIES`."""
    root = tmp_path_factory.mktemp("varied")
    sources = toy_database_on_a_line(root)
    for q, (i, edit, label) in enumerate(QUERIES):
        east = SPACING * i + 10 if label == NEAR else SPACING * (len(sources) + 10)
        with Image.open(sources[i]) as image:
            EDITS[edit](image.convert("RGB")).save(root / "queries" / utm_name(east, 0.0, f"q{q}_{edit}{i:02d}"))
    return root


@pytest.fixture(scope="module")
def full_run(varied_set, tiny_weights, tmp_path_factory) -> Path:
    """A finished labelled run re-ranking every query (its cache kept)."""
    output = tmp_path_factory.mktemp("full") / "run"
    run_eval(config_for(varied_set, output, tiny_weights, num_preds_to_save=0))
    return output


def read_csv(run: Path, key: str = "queries") -> dict[int, list[dict]]:
    """predictions.csv: per query, its rows in the final order."""
    with open(run / key / "predictions.csv", newline="") as handle:
        rows: dict[int, list[dict]] = {}
        for row in csv.DictReader(handle):
            rows.setdefault(int(row["query_index"]), []).append(row)
    return rows


def top1s(run: Path) -> dict[str, np.ndarray]:
    """From predictions.csv, per query: whether its global and re-ranked top-1 are right, the
    global top-1's distance and the re-ranked top-1's score."""
    rows = read_csv(run)
    global_top = [next(r for r in rows[q] if r["global_rank"] == "0") for q in sorted(rows)]
    final_top = [rows[q][0] for q in sorted(rows)]
    return {
        "global_correct": np.array([r["is_positive"] == "1" for r in global_top]),
        "reranked_correct": np.array([r["is_positive"] == "1" for r in final_top]),
        "distance": np.array([float(r["global_distance"]) for r in global_top]),
        "score": np.array([float(r["rerank_score"]) if r["rerank_score"] else np.nan for r in final_top]),
    }


def statuses(run: Path) -> list[str]:
    found = top1s(run)
    return [STATUS_OF[(bool(g), bool(r))] for g, r in zip(found["global_correct"], found["reranked_correct"])]


def filter_counts(page: str) -> dict[str, int]:
    return {name: int(count) for name, count in re.findall(r'data-f="(\w+)" data-count="(\d+)"', page)}


def shown_queries(page: str) -> list[tuple[int, str]]:
    """(index, status) of each query block, in page order."""
    return [(int(q), status) for status, q in re.findall(r'<div class="q (\w+)" id="[^"]*-q(\d+)"', page)]


def test_confidence_is_sklearns_average_precision_recomputed_from_predictions_csv(full_run):
    summary = json.loads((full_run / "recalls.json").read_text())
    confidence = summary["query_sets"]["queries"]["confidence"]
    found = top1s(full_run)
    # The mini set has right and wrong top-1s in both stages, and distances and scores that differ.
    assert 0 < found["global_correct"].sum() < len(QUERIES) and 0 < found["reranked_correct"].sum() < len(QUERIES)
    assert len(set(found["distance"])) > 2 and len(set(found["score"])) > 2
    expected_global = average_precision_score(found["global_correct"], -found["distance"])
    expected_reranked = average_precision_score(found["reranked_correct"], found["score"])
    assert confidence == {
        "global_ap": pytest.approx(expected_global, abs=1e-6), "reranked_ap": pytest.approx(expected_reranked, abs=1e-6)
    }
    points = json.loads((full_run / "queries" / CONFIDENCE_FILE).read_text())
    precision, recall, _ = precision_recall_curve(found["reranked_correct"], found["score"])
    assert points["reranked"]["precision"] == pytest.approx(precision, abs=1e-6)
    assert points["reranked"]["recall"] == pytest.approx(recall, abs=1e-6)
    # The adaptive curve runs from the global R@1 (nothing re-ranked) to the re-ranked R@1 (all).
    recalls = summary["query_sets"]["queries"]
    assert points["adaptive"]["fraction"] == pytest.approx(np.arange(len(QUERIES) + 1) / len(QUERIES))
    assert points["adaptive"]["R@1"][0] == recalls["global"]["R@1"]
    assert points["adaptive"]["R@1"][-1] == recalls["reranked"]["R@1"]


def test_a_set_where_every_top1_is_right_says_so_instead_of_an_ap(labelled_set, tiny_weights, tmp_path):
    # The three labelled exact copies only: every top-1 is right, before and after re-ranking.
    root = tmp_path / "right"
    shutil.copytree(labelled_set / "database", root / "database")
    (root / "queries").mkdir()
    for i in NEAR_QUERIES:
        path = next((labelled_set / "queries").glob(f"*copy{i:02d}@.jpg"))
        shutil.copyfile(path, root / "queries" / path.name)
    summary = run_eval(config_for(root, tmp_path / "run", tiny_weights, num_preds_to_save=0, rerank_topk=2))
    assert summary["query_sets"]["queries"]["confidence"] == {
        "global_ap": None, "reranked_ap": None,
        "undefined": {"global_ap": "every top-1 is right", "reranked_ap": "every top-1 is right"},
    }  # fmt: skip
    page = write_report(tmp_path / "run").read_text()
    assert "global: <b>every top-1 is right</b>" in page


def test_the_report_is_self_contained_names_every_query_and_counts_as_predictions_csv(full_run):
    path = write_report(full_run)
    assert path == full_run / REPORT_FILE
    page = path.read_text()
    assert not re.search(r"https?://", page)
    assert set(re.findall(r'src="([a-z]+):', page)) <= {"data"} and "<link" not in page
    for rows in read_csv(full_run).values():
        assert f'title="{html.escape(rows[0]["query_path"])}"' in page
    expected = statuses(full_run)
    counts = filter_counts(page)
    assert counts == {"all": len(QUERIES), **{s: expected.count(s) for s in ("fixed", "broken", "wrong", "right")}}
    assert sorted(shown_queries(page)) == list(enumerate(expected))
    # Thumbnails framed by their labels, with FoL scores and distances; the curves inline.
    assert page.count('<figure class="ok"') + page.count('<figure class="no"') == 2 * 10 * len(QUERIES)
    assert page.count("<svg") == 2 and "FoL " in page and " d 0" in page


def test_large_query_sets_are_capped_changed_queries_first(full_run):
    expected = statuses(full_run)
    rows = read_csv(full_run)
    changed = [rows[q][0]["database_index"] != next(r for r in rows[q] if r["global_rank"] == "0")["database_index"]
               for q in sorted(rows)]  # fmt: skip
    priority = sorted(range(len(QUERIES)), key=lambda q: (
        0 if expected[q] in ("fixed", "broken") else 1 if changed[q] else 2, q))  # fmt: skip
    page = write_report(full_run, ReportOptions(max_queries=3)).read_text()
    assert [q for q, _ in shown_queries(page)] == priority[:3]
    assert "Showing 3 of 8 queries" in page and filter_counts(page)["all"] == 8
    # A size budget smaller than the whole page: fewer queries, and the file stays within it.
    budget_mb = 0.06
    path = write_report(full_run, ReportOptions(max_size_mb=budget_mb))
    assert 0 < len(shown_queries(path.read_text())) < len(QUERIES) and path.stat().st_size <= budget_mb * 1e6


def test_a_size_budget_too_small_for_any_query_says_so(full_run, caplog):
    caplog.set_level("WARNING")
    page = write_report(full_run, ReportOptions(max_size_mb=0.001)).read_text()
    assert not shown_queries(page)
    assert "Showing 0 of 8 queries (--max_size_mb 0.001 cannot fit even one query: raise it to see them)" in page
    assert "report.html is " in caplog.text and "KB, over --max_size_mb 0.001" in caplog.text


def test_match_figures_use_the_runs_recorded_model(full_run):
    page = write_report(full_run, ReportOptions(matches=2)).read_text()
    figures = re.findall(r'<img class="m" alt="FoL matches of query (\d+)" src="data:image/jpeg;base64,', page)
    assert len(figures) == 2
    assert [int(q) for q in figures] == [q for q, _ in shown_queries(page)][:2]


def test_an_unlabelled_run_gives_a_report_without_curves(tiny_weights, tmp_path):
    toy = require(DATA / "toy_dataset")
    output = tmp_path / "unlabelled"
    summary = run_eval(config_for(toy, output, tiny_weights, labelled=False, num_preds_to_save=0, rerank_topk=4))
    assert summary["query_sets"]["queries"]["confidence"] is None
    assert not (output / "queries" / CONFIDENCE_FILE).exists()
    page = write_report(output).read_text()
    assert "<svg" not in page and "No labels" in page
    assert filter_counts(page) == {"all": 5, "unlabelled": 5}
    assert [status for _, status in shown_queries(page)] == ["unlabelled"] * 5
    assert '<figure class="na"' in page and '<figure class="ok"' not in page


def test_a_benchmark_report_has_one_section_per_dataset(varied_set, tiny_weights, tmp_path):
    datasets = tmp_path / "datasets"
    shutil.copytree(varied_set, datasets / "pitts30k" / "images" / "test")
    shutil.copytree(varied_set, datasets / "sped" / "images" / "test")
    (datasets / "sped" / "images" / "test" / "database" / utm_name(0, 0, "zz_broken")).write_bytes(b"\xff\xd8 no jpeg")
    registry = {
        "pitts30k": DatasetSpec("pitts30k", ("pitts30k/images/test",), "database", 17, (QuerySetSpec("pitts30k", "queries", 8, "Pitts30k"),)),
        "sped": DatasetSpec("sped", ("sped/images/test",), "database", 18, (QuerySetSpec("sped", "queries", 8, "SPED"),)),
    }  # fmt: skip
    options = dict(
        backbone=TINY_VIT, weights=str(tiny_weights), rerank_topk=8,
        extraction=ExtractionConfig(image_size=IMAGE_SIZE, batch_size=4, num_workers=0),
    )  # fmt: skip
    output = tmp_path / "bench"
    rows = run_benchmark(BenchmarkConfig(datasets, ["pitts30k", "sped"], output, options, registry=registry))
    recalls = json.loads((output / "pitts30k" / "recalls.json").read_text())
    confidence = recalls["query_sets"]["queries"]["confidence"]
    assert (rows[0]["global_ap"], rows[0]["reranked_ap"]) == (confidence["global_ap"], confidence["reranked_ap"])
    assert f"{confidence['global_ap']:.3f} / {confidence['reranked_ap']:.3f}" in (output / "results.md").read_text()
    page = write_report(output).read_text()
    assert re.findall(r'<h2 id="dataset-(\w+)">', page) == ["pitts30k", "sped"]
    assert "Not finished: cannot decode" in page
    assert not re.search(r"https?://", page)
    assert filter_counts(page)["all"] == 8 and len(shown_queries(page)) == 8
    assert re.search(r"<td>pitts30k</td><td>pitts30k</td><td>8</td>", page)


def test_rerank_fraction_reranks_exactly_the_least_confident_and_resumes_into_the_full_run(
    full_run, varied_set, tiny_weights, tmp_path, monkeypatch
):
    output = tmp_path / "half"
    summary = run_eval(config_for(varied_set, output, tiny_weights, num_preds_to_save=0, rerank_fraction=0.5))
    distance = top1s(output)["distance"]
    least_confident = sorted(np.lexsort((np.arange(len(distance)), -distance))[:4].tolist())
    selection = summary["query_sets"]["queries"]["rerank_selection"]
    assert selection == {
        "fraction": 0.5, "num_reranked": 4, "queries": least_confident,
        "confidence_threshold": pytest.approx(-distance[least_confident].min(), abs=1e-5),
    }  # fmt: skip
    assert summary["config"]["rerank_fraction"] == 0.5
    half, full = output / "queries", full_run / "queries"
    scores, global_predictions = np.load(half / "rerank_scores.npy"), np.load(half / "predictions_global.npy")
    reranked = np.load(half / "predictions_reranked.npy")
    others = sorted(set(range(len(QUERIES))) - set(least_confident))
    assert np.isnan(scores[others]).all() and not np.isnan(scores[least_confident]).any()
    assert (reranked[others] == global_predictions[others]).all()
    assert (reranked[least_confident] == np.load(full / "predictions_reranked.npy")[least_confident]).all()
    assert all(not row["rerank_score"] for q in others for row in read_csv(output)[q])
    # The full run's adaptive curve, from its own outputs, predicts the half run's R@1.
    curve = json.loads((full / CONFIDENCE_FILE).read_text())["adaptive"]
    assert curve["R@1"][4] == summary["query_sets"]["queries"]["reranked"]["R@1"]
    # Going on with --rerank_fraction 1 in the same folder scores only the other half, then gives
    # the full run's outputs byte for byte.
    engine = importlib.import_module("fol_plugin.rerank.rerank")  # the module, not the function it exports
    scored, score = [], engine.mutual_match_scores

    def counting(query, candidates, threshold):
        scored.append(len(candidates))
        return score(query, candidates, threshold)

    monkeypatch.setattr(engine, "mutual_match_scores", counting)
    run_eval(config_for(varied_set, output, tiny_weights, num_preds_to_save=0, rerank_fraction=1.0))
    assert scored == [8] * len(others)
    for name in ("predictions_global.npy", "predictions_reranked.npy", "rerank_scores.npy", "predictions.csv"):
        assert (half / name).read_bytes() == (full / name).read_bytes(), name
    assert "rerank_selection" not in json.loads((output / "recalls.json").read_text())["query_sets"]["queries"]


def test_rerank_fraction_zero_keeps_the_global_predictions(varied_set, tiny_weights, tmp_path, monkeypatch):
    extracted, extract = [], FoLModel.extract

    def counting(self, images):
        extracted.append(len(images))
        return extract(self, images)

    monkeypatch.setattr(FoLModel, "extract", counting)
    output = tmp_path / "zero"
    summary = run_eval(config_for(varied_set, output, tiny_weights, num_preds_to_save=0, rerank_fraction=0.0))
    results = summary["query_sets"]["queries"]
    assert (np.load(output / "queries" / "predictions_reranked.npy") == np.load(output / "queries" / "predictions_global.npy")).all()
    assert np.isnan(np.load(output / "queries" / "rerank_scores.npy")).all()
    assert results["reranked"] == results["global"]
    assert results["rerank_selection"] == {"fraction": 0.0, "num_reranked": 0, "confidence_threshold": None, "queries": []}
    assert results["confidence"]["undefined"]["reranked_ap"] == "no query was re-ranked"
    assert sum(extracted) == len(QUERIES)  # local features of the queries only: no candidate needed them


def test_the_rounding_of_the_fraction_and_the_order_of_ties():
    assert [num_reranked(5, f) for f in (0.0, 0.1, 0.3, 0.5, 0.9, 1.0)] == [0, 1, 2, 3, 5, 5]
    assert num_reranked(4, 0.5) == 2 and num_reranked(10, 0.3) == 3
    confidence = np.array([-0.5, -0.1, -0.5, -0.9, 0.0])
    assert select_queries(confidence, 0.6).tolist() == [0, 2, 3]  # -0.9, then the tie at -0.5 in query order
    assert select_queries(confidence, 0.4).tolist() == [0, 3]


def test_rerank_without_distances_refuses_a_fraction_below_one_and_uses_given_distances(
    varied_set, tiny_weights, tmp_path, monkeypatch
):
    rng = np.random.default_rng(0)
    given = np.stack([rng.permutation(17)[:10] for _ in QUERIES])
    for q in (0, 1):  # two right top-1s (their source photo), the far queries wrong: the AP is defined
        source = QUERIES[q][0]
        given[q] = [source, *[i for i in given[q] if i != source][:9]]
    config = config_for(varied_set, tmp_path / "rerank", tiny_weights, num_preds_to_save=0, rerank_fraction=0.5)
    monkeypatch.setattr("fol_plugin.evaluation.pipeline.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="needs the global distances: give --database_descriptors"):
        run_rerank(config, [given])
    assert not (tmp_path / "rerank").exists()
    monkeypatch.undo()
    distances = np.sort(rng.random(given.shape).astype(np.float32), axis=1)
    summary = run_rerank(config, [given], distances=[distances])
    expected = sorted(np.argsort(-distances[:, 0], kind="stable")[:4].tolist())
    results = summary["query_sets"]["queries"]
    assert results["rerank_selection"]["queries"] == expected
    found = top1s(tmp_path / "rerank")
    assert found["distance"] == pytest.approx(distances[:, 0], rel=1e-5)
    assert results["confidence"]["global_ap"] == pytest.approx(
        average_precision_score(found["global_correct"], -distances[:, 0]), abs=1e-6
    )


def test_the_command_line_flags_and_the_report_command(varied_set, tiny_weights, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setattr(checkpoint, "FoLModel", lambda backbone, **kwargs: FoLModel(TINY_VIT, **kwargs))
    args = tiny_cli_args(varied_set, tmp_path / "run", tiny_weights, "--rerank_fraction", "0.25", "--report")[1:]
    with pytest.raises(SystemExit) as refused:
        cli.main([*args, "--rerank_fraction", "1.5"])
    assert refused.value.code == 2 and "--rerank_fraction: 1.5 must be between 0 and 1" in capsys.readouterr().err
    assert cli.main(args) == 0
    assert f"Report: {tmp_path / 'run' / REPORT_FILE} (0.1 MB)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "recalls.json").read_text())
    assert summary["query_sets"]["queries"]["rerank_selection"]["num_reranked"] == 2
    assert 'class="kept">not re-ranked' in (tmp_path / "run" / REPORT_FILE).read_text()
    # fol-vpr rerank with another method's descriptors: their distances are its global confidence.
    rng = np.random.default_rng(1)
    np.save(tmp_path / "db.npy", rng.standard_normal((17, 16)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.standard_normal((len(QUERIES), 16)).astype(np.float32))
    rerank = ["rerank", "--database_descriptors", str(tmp_path / "db.npy"), "--queries_descriptors", str(tmp_path / "q.npy")]
    args = tiny_cli_args(varied_set, tmp_path / "other", tiny_weights, "--rerank_fraction", "0.5")[2:]
    assert cli.main(rerank + [arg for arg in args if arg != "--save_descriptors"]) == 0
    other = json.loads((tmp_path / "other" / "recalls.json").read_text())["query_sets"]["queries"]
    assert other["rerank_selection"]["num_reranked"] == 4
    assert all(row["global_distance"] for rows in read_csv(tmp_path / "other").values() for row in rows)
    assert cli.main(["report", str(tmp_path / "other")]) == 0 and (tmp_path / "other" / REPORT_FILE).is_file()
    # A folder that is no run: one line naming what RUN_DIR must be.
    caplog.clear()
    assert cli.main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path} holds no recalls.json nor benchmark.json: RUN_DIR must be the --output_dir of a finished" in caplog.text
    with pytest.raises(RunFolderError, match="does not exist"):
        write_report(tmp_path / "missing")


CHROMIUM = shutil.which("chromium")


def screenshot(page: Path, target: Path, fragment: str = "") -> np.ndarray:
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={target}",
         "--window-size=1240,2600", f"{page.as_uri()}{fragment}"],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    return np.asarray(Image.open(target).convert("RGB"))


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is absent: apt-get install chromium to run this test")
def test_chromium_renders_the_report_and_its_filter_changes_what_is_shown(full_run, tmp_path):
    page = write_report(full_run)
    whole = screenshot(page, tmp_path / "all.png")
    assert whole.std() > 30 and len(np.unique(whole.reshape(-1, 3), axis=0)) > 1000  # text, charts, photos
    shown = {status for _, status in shown_queries(page.read_text())}
    chosen = next(status for status in ("fixed", "broken", "wrong", "right") if status in shown)
    filtered = screenshot(page, tmp_path / "filtered.png", f"#filter={chosen}")
    assert filtered.shape == whole.shape and (filtered != whole).any(axis=2).mean() > 0.05
    # After the script ran: the filter is the address's, and its button is the one lit.
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", f"{page.as_uri()}#filter={chosen}"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert f'<body data-filter="{chosen}">' in dom
    assert re.findall(r'<a [^>]*data-f="(\w+)"[^>]*class="on"', dom) == [chosen]


def test_bad_report_inputs_are_named_with_the_fix(full_run, varied_set, tiny_weights, tmp_path, caplog):
    broken = tmp_path / "run"
    shutil.copytree(full_run, broken)
    (broken / "queries" / CONFIDENCE_FILE).write_text('{"global": [')
    with pytest.raises(ValueError, match=rf"{re.escape(str(broken / 'queries' / CONFIDENCE_FILE))} is damaged .*: rerun"):
        write_report(broken)
    (broken / "queries" / CONFIDENCE_FILE).unlink()
    recalls = (broken / "recalls.json").read_text()
    (broken / "recalls.json").write_text(recalls[:100])
    with pytest.raises(ValueError, match=rf"{re.escape(str(broken / 'recalls.json'))} is damaged .*: rerun the command"):
        write_report(broken)
    (broken / "recalls.json").write_text(recalls)
    (broken / "queries" / "predictions.csv").unlink()
    with pytest.raises(RunFolderError, match=r"predictions.csv is missing: the report reads every query set's"):
        write_report(broken)
    # Images that moved since the run: grey boxes and one warning naming the first.
    moved = tmp_path / "moved"
    shutil.copytree(full_run, moved)
    csv_path = moved / "queries" / "predictions.csv"
    csv_path.write_text(csv_path.read_text().replace(str(varied_set), str(tmp_path / "gone")))
    page = write_report(moved).read_text()
    assert 'class="tx"' in page and "background-image" not in page
    assert f"image(s) could not be read (first: {tmp_path / 'gone'}" in caplog.text
    page = write_report(full_run, ReportOptions(max_image_pixels=1000)).read_text()  # every image is 512 x 512
    assert 'class="tx"' in page and "background-image" not in page
    # Settings that cannot go together are refused before any work.
    with pytest.raises(ValueError, match="--rerank_topk 0 re-ranks none"):
        run_eval(config_for(varied_set, tmp_path / "none", tiny_weights, rerank_topk=0, rerank_fraction=0.5))
    config = BenchmarkConfig(tmp_path, ["pitts30k"], tmp_path / "bench", {"rerank_fraction": 0.5}, tmp_path)
    with pytest.raises(ValueError, match="--predictions_dir gives predictions without them"):
        run_benchmark(config)
    assert not (tmp_path / "none").exists() and not (tmp_path / "bench").exists()


def _rewrite_csv(path: Path, change) -> None:
    """``change(header, rows)`` -> (header, rows), written back to ``path``."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = change(rows[0], rows[1:])
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *body])


def _drop_column(name):
    def change(header, rows):
        keep = [i for i, column in enumerate(header) if column != name]
        return [header[i] for i in keep], [[row[i] for i in keep] for row in rows]

    return change


def _set_value(column, value):
    def change(header, rows):
        rows[3][header.index(column)] = value
        return header, rows

    return change


def _json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


def _num_queries(record: dict, value) -> dict:
    record["query_sets"]["queries"]["num_queries"] = value
    return record


DAMAGE = {
    "csv cut short": ("queries/predictions.csv", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2 + 7]),
                      "predictions.csv: row "),
    "csv column removed": ("queries/predictions.csv", lambda p: _rewrite_csv(p, _drop_column("global_distance")),
                           "predictions.csv: lacks the column(s) global_distance"),
    "csv random bytes": ("queries/predictions.csv", lambda p: p.write_bytes(np.random.default_rng(0).bytes(3000)),
                         "predictions.csv: "),
    "csv empty": ("queries/predictions.csv", lambda p: p.write_text(""), "predictions.csv: lacks the column(s) query_index"),
    "csv header only": ("queries/predictions.csv", lambda p: _rewrite_csv(p, lambda h, r: (h, [])),
                        "predictions.csv: holds 0 queries, but recalls.json records 8"),
    "csv rows repeated": ("queries/predictions.csv", lambda p: _rewrite_csv(p, lambda h, r: (h, r + r[:5])),
                          "values are not 0 to "),
    "csv one query lost": ("queries/predictions.csv", lambda p: _rewrite_csv(p, lambda h, r: (h, [x for x in r if x[0] != "7"])),
                           "predictions.csv: holds 7 queries, but recalls.json records 8"),
    "csv not a number": ("queries/predictions.csv", lambda p: _rewrite_csv(p, _set_value("database_index", "abc")),
                         "predictions.csv: row 5: database_index 'abc' is not a whole number"),
    "json query_sets removed": ("recalls.json", lambda p: _json(p, lambda r: _without(r, "query_sets")),
                                "recalls.json: has no query_sets record"),
    "json a list": ("recalls.json", lambda p: p.write_text("[]"), "recalls.json: holds a list, not the run's record"),
    "json a string for a number": ("recalls.json", lambda p: _json(p, lambda r: _num_queries(r, "8")),
                                   "recalls.json: query_sets.queries.num_queries is '8', not a count"),
    "confidence empty arrays": (f"queries/{CONFIDENCE_FILE}",
                                lambda p: _json(p, lambda r: {**r, "global": {"recall": [], "precision": []}}),
                                "global needs two equally long, non-empty lists of numbers"),
    "confidence a list": (f"queries/{CONFIDENCE_FILE}", lambda p: p.write_text("[]"), "holds a list, not the curves' points"),
    "report.html a folder": (REPORT_FILE, lambda p: p.mkdir(), "report.html is a folder, where an output file goes"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_every_damaged_run_file_is_one_line_and_exit_code_2(full_run, tmp_path, caplog, case):
    """Issue 29, 5: what the report reads is checked on read; no traceback for any damage."""
    name, damage, message = DAMAGE[case]
    run = tmp_path / "run"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns(REPORT_FILE))
    damage(run / name)
    caplog.clear()
    assert cli.main(["report", str(run)]) == 2
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None and "Traceback" not in caplog.text
    assert message in errors[0].getMessage()
    if name != REPORT_FILE:
        assert "rerun the command that made" in errors[0].getMessage()


def test_a_file_given_as_the_run_folder_is_named_as_such(tmp_path):
    weights = tmp_path / "FoL_base.pth"
    weights.write_bytes(b"x")
    with pytest.raises(RunFolderError, match="FoL_base.pth is a file, not a run folder"):
        write_report(weights)
