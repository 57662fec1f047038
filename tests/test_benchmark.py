"""``fol-vpr benchmark`` on mini datasets in two registry layouts (a plain ``images/test`` one and
an SF_XL-like one with two query sets on one database), labelled toy images and a tiny ViT: its
tables hold what ``fol-vpr eval`` computes, problems are found before extraction, a failing
dataset does not stop the others, and ``--table_only`` rebuilds the same tables."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fol_plugin import checkpoint, cli
from fol_plugin.benchmark import PUBLISHED, BenchmarkConfig, DatasetSpec, QuerySetSpec, run_benchmark, select
from fol_plugin.benchmark import runner as benchmark_runner
from fol_plugin.benchmark.runner import find_predictions
from fol_plugin.benchmark.registry import REGISTRY, locate
from fol_plugin.benchmark.tables import build_rows, latex, markdown
from fol_plugin.cache import RunLockedError
from fol_plugin.data.datasets import find_positives, load_image_set
from fol_plugin.evaluation import compute_recalls, run_eval, run_rerank
from fol_plugin.evaluation.outputs import write_preds_files
from fol_plugin.features import ExtractionConfig
from fol_plugin.files import DamagedFileError
from fol_plugin.models import FoLModel

from .conftest import IMAGE_SIZE, TINY_VIT, config_for, utm_name

RESULTS = ("results.md", "results.tex", "results.csv", "results.json")
NIGHT_QUERIES = 3  # the SF_XL-like night set: the first three queries


@pytest.fixture(scope="module")
def datasets_folder(labelled_set, tmp_path_factory) -> Path:
    """``pitts30k/images/test/{database,queries}``, ``SF_XL/test/{database,queries_v1,queries_night}``
    and a ``sped`` whose database holds an undecodable image."""
    root = tmp_path_factory.mktemp("datasets")
    shutil.copytree(labelled_set, root / "pitts30k" / "images" / "test")
    sf_xl = root / "SF_XL" / "test"
    shutil.copytree(labelled_set / "database", sf_xl / "database")
    shutil.copytree(labelled_set / "queries", sf_xl / "queries_v1")
    (sf_xl / "queries_night").mkdir()
    for path in sorted((labelled_set / "queries").iterdir())[:NIGHT_QUERIES]:
        shutil.copyfile(path, sf_xl / "queries_night" / path.name)
    shutil.copytree(labelled_set, root / "sped" / "images" / "test")
    (root / "sped" / "images" / "test" / "database" / utm_name(0, 0, "zz_broken")).write_bytes(b"\xff\xd8 no jpeg")
    return root


MINI_REGISTRY = {
    "pitts30k": DatasetSpec("pitts30k", ("pitts30k/images/test",), "database", 17, (QuerySetSpec("pitts30k", "queries", 5, "Pitts30k"),)),
    "SF_XL": DatasetSpec(
        "SF_XL", ("SF_XL/test",), "database", 17,
        (QuerySetSpec("SF_XL_v1", "queries_v1", 5, "SF-XL-testv1"), QuerySetSpec("SF_XL_night", "queries_night", 3, "SF-XL-night")),
    ),
    "sped": DatasetSpec("sped", ("sped/images/test",), "database", 18, (QuerySetSpec("sped", "queries", 5, "SPED"),)),
}  # fmt: skip


def tiny_options(weights: Path) -> dict:
    return dict(
        backbone=TINY_VIT, weights=str(weights), rerank_topk=8,
        extraction=ExtractionConfig(image_size=IMAGE_SIZE, batch_size=4, num_workers=0),
    )  # fmt: skip


@pytest.fixture(scope="module")
def finished(datasets_folder, tiny_weights, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A benchmark of the three mini datasets (sped fails) and its rows."""
    output = tmp_path_factory.mktemp("bench")
    config = BenchmarkConfig(
        datasets_folder, ["pitts30k", "sf-xl", "sped"], output, tiny_options(tiny_weights), registry=MINI_REGISTRY
    )
    return output, run_benchmark(config)


def row_of(rows: list[dict], query_set: str) -> dict:
    return next(row for row in rows if row["query_set"] == query_set)


def test_the_tables_hold_the_recalls_fol_vpr_eval_computes(finished, datasets_folder, tiny_weights, tmp_path):
    output, rows = finished
    assert [(row["dataset"], row["query_set"]) for row in rows] == [
        ("pitts30k", "pitts30k"), ("SF_XL", "SF_XL_v1"), ("SF_XL", "SF_XL_night"), ("sped", "sped")
    ]
    pitts = run_eval(config_for(datasets_folder / "pitts30k" / "images" / "test", tmp_path / "pitts", tiny_weights, num_preds_to_save=0))
    sf_xl_root = datasets_folder / "SF_XL" / "test"
    sf_xl = run_eval(config_for(
        sf_xl_root, tmp_path / "sf_xl", tiny_weights, num_preds_to_save=0,
        queries_folders=[sf_xl_root / "queries_v1", sf_xl_root / "queries_night"],
    ))  # fmt: skip
    expected = {
        "pitts30k": pitts["query_sets"]["queries"],
        "SF_XL_v1": sf_xl["query_sets"]["queries_v1"],
        "SF_XL_night": sf_xl["query_sets"]["queries_night"],
    }
    for query_set, results in expected.items():
        row = row_of(rows, query_set)
        assert row["status"] == "ok"
        for stage in ("global", "reranked"):
            for n in (1, 5, 10):
                assert row[f"{stage}_R@{n}"] == results[stage][f"R@{n}"]
        assert row["num_database"] == 17 and row["num_queries"] == results["num_queries"]
        assert row["ms_per_query_features"] > 0 and row["ms_per_query_rerank"] > 0 and row["peak_memory_mb"] > 0
    # The SF_XL-like dataset is one run: one database extraction for both query sets.
    summary = json.loads((output / "SF_XL" / "recalls.json").read_text())
    assert sorted(summary["query_sets"]) == ["queries_night", "queries_v1"]
    assert summary["config"]["positive_dist_threshold"] == 25.0
    # The tiny ViT at 126x126 has no published numbers.
    assert row_of(rows, "pitts30k")["published_global_R@1"] is None
    # What the files say.
    table = json.loads((output / "results.json").read_text())
    assert table["rows"] == rows
    with open(output / "results.csv") as handle:
        assert [r["query_set"] for r in csv.DictReader(handle)] == [row["query_set"] for row in rows]
    markdown = (output / "results.md").read_text()
    pitts_row = row_of(rows, "pitts30k")
    triple = " ".join(f"{pitts_row[f'reranked_R@{n}']:.1f}" for n in (1, 5, 10))
    assert re.search(rf"\| pitts30k \| pitts30k \| 17 \| 5 \| .* \| {triple} \|", markdown)


def test_a_failing_dataset_does_not_stop_the_others(finished):
    output, rows = finished
    broken = row_of(rows, "sped")
    assert broken["status"].startswith("failed: cannot decode image") and "zz_broken" in broken["status"]
    assert broken["global_R@1"] is None
    record = json.loads((output / "benchmark.json").read_text())
    assert [record["datasets"][name]["status"] for name in record["order"]] == ["done", "done", "failed"]
    assert "| sped | sped |" in (output / "results.md").read_text() and "failed: cannot decode" in (output / "results.md").read_text()


def test_table_only_rebuilds_identical_tables(finished, tmp_path):
    output, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    before = {name: (copy / name).read_bytes() for name in RESULTS}
    for name in RESULTS:
        (copy / name).unlink()
    assert cli.main(["benchmark", "--table_only", str(copy)]) == 0
    assert {name: (copy / name).read_bytes() for name in RESULTS} == before
    # The tables are built from the runs in the folder given (here a moved copy), not from where they ran.
    recalls = json.loads((copy / "pitts30k" / "recalls.json").read_text())
    recalls["query_sets"]["queries"]["reranked"]["R@5"] = 12.5
    (copy / "pitts30k" / "recalls.json").write_text(json.dumps(recalls))
    assert cli.main(["benchmark", "--table_only", str(copy)]) == 0
    assert row_of(json.loads((copy / "results.json").read_text())["rows"], "pitts30k")["reranked_R@5"] == 12.5


def test_the_latex_table_is_a_booktabs_tabular_with_bold_best_r1(finished, tmp_path):
    output, rows = finished
    tex = (output / "results.tex").read_text()
    spec = re.search(r"\\begin\{tabular\}\{([a-z]+)\}", tex).group(1)
    assert spec == "lrrrrrr" and r"\toprule" in tex and r"\bottomrule" in tex
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == len(rows)
    for line, row in zip(body, rows):
        cells = line.removesuffix(r"\\").strip().split(" & ")
        assert len(cells) == len(spec)
        assert cells[0] == (row["published_as"] or row["query_set"]).replace("_", r"\_")
        firsts = [row["global_R@1"], row["reranked_R@1"]]
        if firsts[0] is None:
            assert cells[1:] == ["--"] * 6
            continue
        best = max(firsts)
        assert [cells[1].startswith(r"\textbf"), cells[4].startswith(r"\textbf")] == [v == best for v in firsts]
    if shutil.which("pdflatex") is None:
        pytest.skip("no LaTeX toolchain: parsed the tabular only")
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\\usepackage{booktabs}\\begin{document}\\input{" + str(output / "results.tex")
        + "}\\end{document}\n"
    )
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "doc.tex"], cwd=tmp_path, capture_output=True)
    assert done.returncode == 0, done.stdout[-2000:]


def test_a_rerun_reuses_finished_datasets_and_retries_failed_ones(finished, datasets_folder, tiny_weights, monkeypatch, caplog):
    output, rows = finished
    calls = []
    monkeypatch.setattr(benchmark_runner, "run_eval", lambda config, processes: calls.append(config.output_dir.name))
    caplog.set_level("INFO")
    config = BenchmarkConfig(datasets_folder, ["pitts30k", "SF_XL", "sped"], output, tiny_options(tiny_weights), registry=MINI_REGISTRY)
    again = run_benchmark(config)
    assert calls == ["sped"]  # only the failed dataset runs again
    assert "pitts30k: finished earlier with the same settings" in caplog.text
    assert "Benchmark: dataset 2 of 3: SF_XL" in caplog.text
    assert [row_of(again, q)["reranked_R@1"] for q in ("pitts30k", "SF_XL_v1")] == [
        row_of(rows, q)["reranked_R@1"] for q in ("pitts30k", "SF_XL_v1")
    ]


def test_count_mismatches_and_missing_folders_are_reported_before_extraction(datasets_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(benchmark_runner, "run_eval", lambda *args: pytest.fail("a dataset ran"))
    code = cli.main([
        "benchmark", "--datasets_folder", str(datasets_folder), "--dataset_names", "pitts30k", "SF_XL", "tokyo247",
        "--output_dir", str(tmp_path / "out"),
    ])  # fmt: skip
    assert code == 2
    assert "pitts30k database: expected 10,000 images, found 17" in caplog.text
    assert "SF_XL SF_XL_v1: expected 1,000 images, found 5" in caplog.text
    assert "SF_XL SF_XL_v2: image folder" in caplog.text and "queries_v2 does not exist" in caplog.text
    assert "tokyo247: no folder found (tried " in caplog.text and "--dataset_path tokyo247=FOLDER" in caplog.text
    assert "--allow_mismatch" in caplog.text
    assert not (tmp_path / "out").exists()


def test_allow_mismatch_runs_marks_rows_and_sets_published_numbers_beside(datasets_folder, tiny_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "FoLModel", lambda backbone, **kwargs: FoLModel(TINY_VIT, **kwargs))
    code = cli.main([
        "benchmark", "--datasets_folder", str(tmp_path), "--dataset_names", "SF_XL_v1", "SF_XL_night",
        "--dataset_path", f"sf-xl={datasets_folder / 'SF_XL' / 'test'}", "--allow_mismatch",
        "--backbone", "vitb", "--weights", str(tiny_weights), "--image_size", "322", "322", "--rerank_topk", "4",
        "--num_workers", "0", "--output_dir", str(tmp_path / "out"),
    ])  # fmt: skip
    assert code == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [row["query_set"] for row in rows] == ["SF_XL_v1", "SF_XL_night"]
    published = PUBLISHED[("vitb", (322, 322))]
    for row, label in zip(rows, ("SF-XL-testv1", "SF-XL-night")):
        assert row["status"] == "count mismatch"
        assert row["published_as"] == label
        assert [row[f"published_reranked_R@{n}"] for n in (1, 5, 10)] == list(published[label][1])
        assert row["diff_global_R@1"] == round(row["global_R@1"] - published[label][0][0], 2)
    printed = capsys.readouterr().out
    assert "Published: ViT-B at 322x322, github.com/chenshunpeng/FoL README.md" in printed
    assert "this run differs from their protocol in top-k 4 (published: 100)" in printed
    assert "count mismatch" in printed


def test_another_methods_predictions_are_reranked(datasets_folder, tiny_weights, tmp_path):
    root = datasets_folder / "pitts30k" / "images" / "test"
    database, queries = load_image_set(root / "database"), load_image_set(root / "queries")
    given = np.stack([np.random.default_rng(q).permutation(len(database))[:10] for q in range(len(queries))])
    run_folder = tmp_path / "vme_logs" / "pitts30k" / "2026-11-23_10-00-00"
    write_preds_files(run_folder / "preds", queries.paths, database.paths, given, None)
    config = BenchmarkConfig(
        datasets_folder, ["pitts30k"], tmp_path / "out", tiny_options(tiny_weights), registry=MINI_REGISTRY,
        predictions_dir=tmp_path / "vme_logs",
    )
    row = run_benchmark(config)[0]
    direct = run_rerank(config_for(root, tmp_path / "direct", tiny_weights, num_preds_to_save=0), [given])
    # The "global" columns are the given method's own recalls.
    recalls = compute_recalls(given, find_positives(database.utms, queries.utms), (1, 5, 10))
    assert [row[f"global_R@{n}"] for n in (1, 5, 10)] == [round(recalls[n], 4) for n in (1, 5, 10)]
    assert [row[f"reranked_R@{n}"] for n in (1, 5, 10)] == [direct["query_sets"]["queries"]["reranked"][f"R@{n}"] for n in (1, 5, 10)]
    assert row["published_reranked_R@1"] is None  # FoL's numbers are not this method's
    meta = json.loads((tmp_path / "out" / "results.json").read_text())["run"]
    assert meta["method"] == f"predictions in {tmp_path / 'vme_logs'} + FoL re-ranking"


def test_names_are_selected_as_the_original_selects_them(tmp_path):
    chosen = select(["sf-xl_night", "Pitts30k", "SF_XL_v1"])
    assert [(spec.name, [q.name for q in sets]) for spec, sets in chosen] == [
        ("SF_XL", ["SF_XL_v1", "SF_XL_night"]), ("pitts30k", ["pitts30k"])
    ]
    assert [q.name for q in select(["svox"])[0][1]] == [q.name for q in REGISTRY["SVOX"].query_sets]
    # The original's other names: svox_base is SVOX's base query set alone; msls is MSLS-val.
    assert [(spec.name, [q.name for q in sets]) for spec, sets in select(["svox_base", "MSLS"])] == [
        ("SVOX", ["SVOX"]), ("msls_val", ["msls_val"])
    ]
    with pytest.raises(ValueError, match="--dataset_names pits30k: unknown dataset; choose from pitts30k, pitts250k"):
        select(["pits30k"], datasets_folder=tmp_path)
    # A name outside the registry is taken as the original takes it: <name>/images/test.
    (tmp_path / "my_city" / "images" / "test").mkdir(parents=True)
    (spec, sets), = select(["my_city"], datasets_folder=tmp_path)
    assert (spec.roots, spec.database, spec.num_database, [(q.folder, q.num_images) for q in sets]) == (
        ("my_city/images/test",), "database", None, [("queries", None)]
    )
    spec, sets = select(["SVOX_rain"])[0]
    (tmp_path / "svox" / "gallery").mkdir(parents=True)
    (tmp_path / "svox" / "gallery" / utm_name(0, 0, "a")).write_bytes(b"")
    located = locate(spec, sets, tmp_path / "nowhere", override=tmp_path / "svox")
    assert located.counts == {"database": 1}
    assert located.mismatches == [f"SVOX database: expected 17,166 images, found 1 in {tmp_path / 'svox' / 'gallery'}"]
    assert "SVOX SVOX_rain: image folder" in located.problems[0]


def test_published_numbers_are_the_original_readmes():
    # Rows read back from the original README's Performance tables (commit e930a76).
    assert PUBLISHED[("vitl", (504, 504))]["Pitts30k"] == ((93.9, 97.2, 98.1), (94.5, 97.4, 98.2))
    assert PUBLISHED[("vitl", (504, 504))]["SF-XL-occlusion"] == ((51.3, 65.8, 73.7), (61.8, 77.6, 77.6))
    assert PUBLISHED[("vitl", (504, 504))]["MSLS-challenge"] == ((78.7, 90.8, 93.0), (80.0, 90.9, 93.0))
    assert PUBLISHED[("vitl", (322, 322))]["MSLS-val"] == ((92.8, 96.9, 97.2), (90.1, 95.7, 96.9))
    assert PUBLISHED[("vitb", (322, 322))]["SVOX-snow"] == ((98.7, 99.5, 99.5), (97.7, 99.7, 99.7))
    assert PUBLISHED[("vitb", (322, 322))]["Nordland*"] == ((62.5, 80.3, 85.0), (78.2, 90.2, 92.9))
    assert [len(table) for table in PUBLISHED.values()] == [20, 16, 16]
    # Every published row is a row of the registry.
    labels = {q.label for spec in REGISTRY.values() for q in spec.query_sets}
    assert all(set(table) <= labels for table in PUBLISHED.values())


def test_rows_take_each_number_from_its_place(tmp_path):
    """A hand-written benchmark folder with distinct numbers everywhere: each lands in its column."""
    record = {
        "config": {"options": {"backbone": "vitl", "extraction": {"image_size": [504, 504]}, "rerank_topk": 100}},
        "order": ["SF_XL"],
        "datasets": {"SF_XL": {
            "status": "done", "query_sets": {"SF_XL_v1": "queries_v1", "SF_XL_night": "queries_night"},
            "published_as": {"SF_XL_v1": "SF-XL-testv1", "SF_XL_night": "SF-XL-night"},
            "counts": {"database": 1000, "SF_XL_v1": 40, "SF_XL_night": 10}, "mismatches": [], "peak_memory_mb": 321.0,
        }},
    }  # fmt: skip
    recalls = {
        "query_sets": {
            "queries_v1": {"global": {"R@1": 90.0, "R@5": 94.0, "R@10": 95.0}, "reranked": {"R@1": 96.0, "R@5": 97.0, "R@10": 98.0}},
            "queries_night": {"global": {"R@1": 61.0, "R@5": 70.0, "R@10": 72.0}, "reranked": {"R@1": 55.0, "R@5": 71.0, "R@10": 80.0},
                              "confidence": {"global_ap": 0.8125, "reranked_ap": None, "undefined": {"reranked_ap": "every top-1 is right"}}},
        },
        "timings_s": {"features_queries_v1": 2.0, "features_queries_night": 1.0, "global_search": 5.0,
                      "rerank_queries_v1": 8.0, "rerank_queries_night": 3.0, "features_database_global": 30.0,
                      "features_database_local": 4.5},
    }  # fmt: skip
    (tmp_path / "SF_XL").mkdir()
    (tmp_path / "benchmark.json").write_text(json.dumps(record))
    (tmp_path / "SF_XL" / "recalls.json").write_text(json.dumps(recalls))
    meta, rows = build_rows(tmp_path)
    v1, night = rows
    assert meta["published"].startswith("ViT-L at 504x504")
    assert [v1[f"global_R@{n}"] for n in (1, 5, 10)] == [90.0, 94.0, 95.0]
    assert [night[f"reranked_R@{n}"] for n in (1, 5, 10)] == [55.0, 71.0, 80.0]
    assert [v1[f"published_global_R@{n}"] for n in (1, 5, 10)] == [91.5, 94.8, 95.6]
    assert night["diff_reranked_R@1"] == round(55.0 - 60.5, 2) and v1["diff_global_R@10"] == round(95.0 - 95.6, 2)
    assert (v1["ms_per_query_features"], v1["ms_per_query_search"], v1["ms_per_query_rerank"]) == (50.0, 100.0, 200.0)
    assert (night["ms_per_query_features"], night["ms_per_query_rerank"]) == (100.0, 300.0)
    assert v1["database_features_s"] == 34.5 and v1["peak_memory_mb"] == 321.0 and v1["status"] == "ok"
    assert (night["global_ap"], night["reranked_ap"], night["reranked_ap_undefined"]) == (0.8125, None, "every top-1 is right")
    assert v1["global_ap"] is None and v1["global_ap_undefined"] is None  # a run without a confidence record
    tex = latex(meta, rows)
    assert r"SF-XL-testv1 & 90.0 & 94.0 & 95.0 & \textbf{96.0} & 97.0 & 98.0 \\" in tex
    assert r"SF-XL-night & \textbf{61.0} & 70.0 & 72.0 & 55.0 & 71.0 & 80.0 \\" in tex
    assert "| SF_XL | SF_XL_night | 1,000 | 10 | 61.0 70.0 72.0 | 55.0 71.0 80.0 | 53.4 65.9 71.7 | 60.5 72.8 75.8 | " \
        "+7.6 / -5.5 | 0.812 / every top-1 is right | 100.0 / 100.0 / 300.0 | 34.5 | 321 | ok |" in markdown(meta, rows)
    # A dataset without labels (MSLS-challenge) has rows without recalls, marked.
    record["datasets"]["SF_XL"]["labelled"] = False
    for results in recalls["query_sets"].values():
        results["global"] = results["reranked"] = None
    (tmp_path / "benchmark.json").write_text(json.dumps(record))
    (tmp_path / "SF_XL" / "recalls.json").write_text(json.dumps(recalls))
    _, rows = build_rows(tmp_path)
    assert rows[0]["status"] == "no labels: recalls from the dataset's server" and rows[0]["global_R@1"] is None
    assert rows[0]["published_reranked_R@1"] == 95.0  # the published numbers stand beside it


def test_two_processes_give_the_single_process_tables(datasets_folder, tiny_weights, tmp_path):
    """``torchrun ... benchmark``: each dataset split over the processes, rank 0 writes the same
    rows (and predictions) as one process."""
    from .test_distributed import TESTS, TORCHRUN, run

    def benchmark(*launcher: str, output: Path) -> list[dict]:
        done = run([
            *launcher, str(TESTS / "tiny_fol_vpr.py"), "benchmark", "--datasets_folder", str(datasets_folder),
            "--dataset_names", "pitts30k", "SF_XL_v1", "SF_XL_night", "--allow_mismatch", "--backbone", "vitb",
            "--weights", str(tiny_weights), "--image_size", "126", "126", "--rerank_topk", "8", "--batch_size", "2",
            "--num_workers", "0", "--output_dir", str(output),
        ])  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((output / "results.json").read_text())["rows"]

    single = benchmark(sys.executable, output=tmp_path / "one")
    double = benchmark(*TORCHRUN, output=tmp_path / "two")
    recall_columns = [key for key in single[0] if "R@" in key]
    assert [[row[key] for key in recall_columns] for row in double] == [[row[key] for key in recall_columns] for row in single]
    for dataset, key in (("pitts30k", "queries"), ("SF_XL", "queries_v1"), ("SF_XL", "queries_night")):
        for name in ("predictions_global.npy", "predictions_reranked.npy", "rerank_scores.npy"):
            assert (tmp_path / "one" / dataset / key / name).read_bytes() == (tmp_path / "two" / dataset / key / name).read_bytes()
    assert json.loads((tmp_path / "two" / "SF_XL" / "recalls.json").read_text())["processes"] == 2


def test_predictions_are_found_where_the_harness_leaves_them(tmp_path):
    (tmp_path / "pitts30k.npy").write_bytes(b"")
    assert find_predictions(tmp_path, "pitts30k") == tmp_path / "pitts30k.npy"
    for folder in ("tokyo247/preds", "sped/2026-11-23_10-00-00/preds", "amstertime"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "000.txt").write_text("Query path:\n")
    assert find_predictions(tmp_path, "tokyo247") == tmp_path / "tokyo247" / "preds"
    assert find_predictions(tmp_path, "sped") == tmp_path / "sped" / "2026-11-23_10-00-00" / "preds"
    assert find_predictions(tmp_path, "amstertime") == tmp_path / "amstertime"
    (tmp_path / "sped" / "2026-11-24_09-00-00" / "preds").mkdir(parents=True)
    (tmp_path / "sped" / "2026-11-24_09-00-00" / "preds" / "000.txt").write_text("Query path:\n")
    with pytest.raises(ValueError, match="holds several VPR-methods-evaluation runs"):
        find_predictions(tmp_path, "sped")
    with pytest.raises(FileNotFoundError, match="no predictions for eynsham: expected .*eynsham.npy, or .*eynsham/preds"):
        find_predictions(tmp_path, "eynsham")


def test_a_finished_dataset_is_run_again_when_an_image_changes(datasets_folder, tiny_weights, tmp_path, monkeypatch):
    shutil.copytree(datasets_folder / "pitts30k", tmp_path / "data" / "pitts30k")
    config = BenchmarkConfig(tmp_path / "data", ["pitts30k"], tmp_path / "out", tiny_options(tiny_weights), registry=MINI_REGISTRY)
    run_benchmark(config)
    calls = []
    monkeypatch.setattr(benchmark_runner, "run_eval", lambda config, processes: calls.append(config.output_dir.name))
    run_benchmark(config)
    assert calls == []  # reused
    image = next((tmp_path / "data" / "pitts30k" / "images" / "test" / "queries").iterdir())
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    run_benchmark(config)
    assert calls == ["pitts30k"]


def test_dataset_names_that_are_paths_are_refused_before_anything_is_written(datasets_folder, tmp_path, monkeypatch):
    """``--dataset_names ../x`` or an absolute name would put the dataset's outputs outside
    ``--output_dir`` (an absolute one into the dataset folder itself)."""
    monkeypatch.setattr(benchmark_runner, "run_eval", lambda *args: pytest.fail("a dataset ran"))
    outside = tmp_path / "outside"
    shutil.copytree(datasets_folder / "pitts30k", outside)
    (tmp_path / "data").mkdir()
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    for name in ("../outside", str(outside)):
        config = BenchmarkConfig(tmp_path / "data", [name], tmp_path / "out", {}, registry=MINI_REGISTRY)
        with pytest.raises(ValueError, match=rf"--dataset_names {re.escape(name)}: a dataset's name is its folder in --output_dir"):
            run_benchmark(config)
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before


def test_a_second_benchmark_on_one_output_dir_is_refused_before_it_writes(datasets_folder, tmp_path, monkeypatch):
    from fol_plugin.cache.lock import DirectoryLock
    from fol_plugin.cache.run_cache import LOCK_FILE

    monkeypatch.setattr(benchmark_runner, "run_eval", lambda *args: pytest.fail("a dataset ran"))
    output = tmp_path / "out"
    output.mkdir()
    config = BenchmarkConfig(datasets_folder, ["pitts30k", "sped"], output, {}, registry=MINI_REGISTRY)
    # The other benchmark: the same lock through another open file description (flock conflicts in one process too).
    with DirectoryLock(output, LOCK_FILE, f"--output_dir {output}"):
        with pytest.raises(
            RunLockedError,
            match=rf"--output_dir {re.escape(str(output))} is in use by another process \(process {os.getpid()} .*\); "
            "wait for it to finish, or use another folder",
        ):
            run_benchmark(config)
        assert [path.name for path in output.iterdir()] == [LOCK_FILE]  # the refused run wrote nothing
    assert list(output.iterdir()) == []  # and the holder's lock file goes with its lock


def test_a_benchmark_with_a_failed_dataset_exits_non_zero_after_the_others_and_the_tables(
    datasets_folder, tiny_weights, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(checkpoint, "FoLModel", lambda backbone, **kwargs: FoLModel(TINY_VIT, **kwargs))
    code = cli.main([
        "benchmark", "--datasets_folder", str(datasets_folder), "--dataset_names", "pitts30k", "sped", "--allow_mismatch",
        "--backbone", "vitb", "--weights", str(tiny_weights), "--image_size", *map(str, IMAGE_SIZE), "--rerank_topk", "4",
        "--num_workers", "0", "--output_dir", str(tmp_path / "out"),
    ])  # fmt: skip
    assert code == cli.DATASETS_FAILED_EXIT
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [(row["dataset"], row["status"].split(":")[0]) for row in rows] == [("pitts30k", "count mismatch"), ("sped", "failed")]
    assert all((tmp_path / "out" / name).is_file() for name in RESULTS)
    assert caplog.records[-1].levelname == "ERROR"
    assert caplog.records[-1].getMessage().startswith("1 of 2 datasets failed: sped")


def test_a_damaged_benchmark_json_is_named_with_what_to_do(finished, datasets_folder, tmp_path, caplog):
    output, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    damaged = copy / "benchmark.json"
    damaged.write_text(damaged.read_text()[:100])
    config = BenchmarkConfig(datasets_folder, ["pitts30k"], copy, {}, registry=MINI_REGISTRY)
    with pytest.raises(DamagedFileError, match=rf"^{re.escape(str(damaged))} is damaged \(.*\): delete it and rerun"):
        run_benchmark(config)
    assert cli.main(["benchmark", "--table_only", str(copy)]) == cli.USER_ERROR_EXIT
    assert f"{damaged} is damaged" in caplog.text and "delete it and rerun" in caplog.text


def test_a_damaged_recalls_json_is_computed_again_on_the_first_rerun(datasets_folder, tiny_weights, tmp_path, monkeypatch, caplog):
    config = BenchmarkConfig(datasets_folder, ["pitts30k"], tmp_path / "out", tiny_options(tiny_weights), registry=MINI_REGISTRY)
    (first,) = run_benchmark(config)
    damaged = tmp_path / "out" / "pitts30k" / "recalls.json"
    damaged.write_text(damaged.read_text()[:100])
    calls, real_run_eval = [], benchmark_runner.run_eval
    monkeypatch.setattr(
        benchmark_runner, "run_eval", lambda config, processes: (calls.append(config.output_dir.name), real_run_eval(config, processes))[1]
    )
    (again,) = run_benchmark(config)
    assert calls == ["pitts30k"]
    assert f"{damaged} is damaged" in caplog.text and "running pitts30k again" in caplog.text
    assert again["status"] == "ok" and again["reranked_R@1"] == first["reranked_R@1"]
    # --table_only on a damaged recalls.json names it and what to do.
    damaged.write_text("{")
    with pytest.raises(DamagedFileError, match=rf"^{re.escape(str(damaged))} is damaged \(.*\): rerun the fol-vpr benchmark"):
        build_rows(tmp_path / "out")


def test_an_undecodable_image_read_by_dataloader_workers_is_one_line(datasets_folder, tiny_weights, tmp_path, caplog, capfd):
    options = tiny_options(tiny_weights)
    options["extraction"].num_workers = 2
    config = BenchmarkConfig(datasets_folder, ["sped"], tmp_path / "out", options, registry=MINI_REGISTRY)
    caplog.set_level("INFO")
    (row,) = run_benchmark(config)
    (failure,) = [record for record in caplog.records if "sped failed" in record.getMessage()]
    message = failure.getMessage()
    assert message.startswith("sped failed: cannot decode image ") and "zz_broken" in message
    assert "\n" not in message and "Traceback" not in message and not failure.exc_info
    assert "Traceback" not in capfd.readouterr().err
    assert row["status"] == "failed: " + message.removeprefix("sped failed: ").removesuffix("; going on with the next dataset")


def test_fixing_the_undecodable_image_lets_the_same_benchmark_finish_the_dataset(
    finished, datasets_folder, tiny_weights, tmp_path, caplog
):
    """Issue 29, 10: sped failed on an undecodable image after caching some work; the user re-saves
    the image and reruns the same command: the dataset finishes (the earlier images' work is dropped, said aloud)."""
    output, _ = finished
    datasets, rerun = tmp_path / "datasets", tmp_path / "bench"
    shutil.copytree(datasets_folder / "sped", datasets / "sped")
    shutil.copytree(output, rerun)
    database = datasets / "sped" / "images" / "test" / "database"
    broken = database / utm_name(0, 0, "zz_broken")
    shutil.copyfile(sorted(database.glob("*.jpg"))[0], broken)  # re-saved as a real photo
    assert list((rerun / "sped" / "cache").rglob("*.commits"))  # the failed run had cached work
    caplog.set_level("WARNING")
    rows = run_benchmark(BenchmarkConfig(datasets, ["sped"], rerun, tiny_options(tiny_weights), registry=MINI_REGISTRY))
    assert row_of(rows, "sped")["status"] == "ok" and row_of(rows, "sped")["reranked_R@1"] is not None
    assert "The images changed since this command last ran" in caplog.text


def _edit_record(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    "file, change, message",
    [
        ("benchmark.json", lambda r: r.pop("datasets"), "benchmark.json: has no record of its datasets"),
        ("benchmark.json", lambda r: r["datasets"]["pitts30k"].update(peak_memory_mb="abc"),
         "benchmark.json: datasets.pitts30k.peak_memory_mb is 'abc', not a number"),
        ("benchmark.json", lambda r: r.update(order=["nowhere"]), "benchmark.json: order names datasets it has no record of"),
        ("pitts30k/recalls.json", lambda r: r["query_sets"]["queries"].update(reranked={"R@1": "high"}),
         "pitts30k/recalls.json: query_sets.queries.reranked is not a record of recalls"),
        ("pitts30k/recalls.json", lambda r: r["query_sets"]["queries"].update(confidence={"global_ap": [1]}),
         "pitts30k/recalls.json: query_sets.queries.confidence is not a record of APs"),
    ],
)
def test_table_only_names_every_damaged_record(finished, tmp_path, caplog, file, change, message):
    """Issue 29, 5: ``--table_only`` checks what it reads; one line, exit 2, no traceback."""
    copy = tmp_path / "copy"
    shutil.copytree(finished[0], copy)
    _edit_record(copy / file, change)
    caplog.clear()
    assert cli.main(["benchmark", "--table_only", str(copy)]) == cli.USER_ERROR_EXIT
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None and message in errors[0].getMessage()
