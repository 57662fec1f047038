"""What a new user and a harness user hit (issue 10), one test per finding where it can be tested
without torchvision: the same results wherever and however FoL runs, a cache that never blocks
the fix, a command line that explains itself, runnable README snippets and readable figures."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import AxesImage

import fol_plugin
from fol_plugin import checkpoint, cli
from fol_plugin.data import load_image, preprocess
from fol_plugin.data.datasets import load_image_set
from fol_plugin.evaluation import compute_recalls, run_eval
from fol_plugin.evaluation.inputs import read_preds_files
from fol_plugin.evaluation.outputs import in_display_order
from fol_plugin.matching import extract_local_features, match, verify
from fol_plugin.models import FoLModel
from fol_plugin.options import default_num_workers
from fol_plugin.rerank import kernels
from fol_plugin.visualization import draw_pair, match_pair, panel_labels

from .conftest import DATA, TINY_VIT, config_for, require

REPO_ROOT = Path(__file__).resolve().parents[1]
VME_FIXTURE = Path(__file__).with_name("fixtures") / "vme_preprocessed.npz"
OUTPUT_FILES = ("predictions_global.npy", "predictions_reranked.npy", "rerank_scores.npy", "queries_descriptors.npy")


# 1. VPR-methods-evaluation's pre-processing.


def test_bilinear_antialias_is_vpr_methods_evaluations_preprocessing():
    """Tensors made by the harness's own TestDataset (torchvision 0.23) in a separate environment."""
    reference = np.load(VME_FIXTURE)
    size = tuple(int(n) for n in reference["image_size"])
    for name, expected in zip(reference["images"], reference["tensors"]):
        image = load_image(require(DATA / str(name)))
        ours = preprocess(image, size, "bilinear_antialias")[0].numpy()
        assert np.abs(ours - expected).max() <= 1e-6
        assert np.abs(preprocess(image, size, "original")[0].numpy() - expected).max() > 1e-2  # the old modes differ


# 2. Results that depend on --num_workers.


@pytest.mark.parametrize("mode", ["original", "bilinear_antialias", "antialias"])
def test_preprocessing_does_not_depend_on_the_thread_count(mode):
    image = load_image(require(DATA / "toy_dataset" / "database" / "db1.jpg"))
    threads = torch.get_num_threads()
    try:
        outputs = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            outputs.append(preprocess(image, (322, 322), mode))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])
    assert torch.get_num_threads() == threads


def test_outputs_do_not_depend_on_the_number_of_workers(labelled_set, tiny_weights, tmp_path):
    runs = {}
    for name, workers in {"main": 0, "workers": 2}.items():
        config = config_for(labelled_set, tmp_path / name, tiny_weights, num_preds_to_save=0, save_descriptors=True)
        config.extraction.num_workers = workers
        runs[name] = run_eval(config)
    assert runs["main"]["query_sets"] == runs["workers"]["query_sets"]
    for name in OUTPUT_FILES:
        assert (tmp_path / "main" / "queries" / name).read_bytes() == (tmp_path / "workers" / "queries" / name).read_bytes()
    assert (tmp_path / "main" / "database_descriptors.npy").read_bytes() == (
        tmp_path / "workers" / "database_descriptors.npy"
    ).read_bytes()


def test_vitb_features_do_not_depend_on_the_batch():
    """Bit for bit: the class token's layers run per image; the ViT-B's other kernels are
    batch-invariant on the CPU."""
    torch.manual_seed(0)
    model = FoLModel("vitb").eval()
    images = torch.randn(3, 3, 322, 322, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        batched = model.extract(images)
        for i in range(3):
            single = model.extract(images[i : i + 1])
            assert torch.equal(single.global_descriptors[0], batched.global_descriptors[i])
            assert torch.equal(single.local_descriptors[0], batched.local_descriptors[i])


# 3. VPR-methods-evaluation predictions saved with --no_labels.


def test_rerank_reads_harness_predictions_without_labels(labelled_set, tmp_path):
    database, queries = load_image_set(labelled_set / "database"), load_image_set(labelled_set / "queries")
    given = np.stack([np.random.default_rng(q).permutation(len(database))[:4] for q in range(len(queries))])
    folder = tmp_path / "preds"
    folder.mkdir()
    for q, row in enumerate(given):  # the harness's layout without labels: no "Positives paths:" section
        lines = ["Query path:", queries.paths[q] + "\n", "Predictions paths:", "\n".join(database.paths[i] for i in row) + "\n"]
        (folder / f"{q:03d}.txt").write_text("\n".join(lines))
    assert np.array_equal(read_preds_files(folder, queries.paths, database.paths), given)


# 4. R@N above the database size.


def test_recall_at_n_above_the_number_of_predictions_counts_them_all():
    predictions = np.array([[2, 0, 1], [1, 2, 0]])
    positives = [np.array([1]), np.array([5])]
    assert compute_recalls(predictions, positives, (1, 3, 20)) == {1: 0.0, 3: 50.0, 20: 50.0}


# 5. A failed run blocks its own fix.


def test_a_failed_download_leaves_nothing_that_blocks_the_next_command(
    labelled_set, tiny_weights, tmp_path, hub_home, no_network, monkeypatch, caplog
):
    """The README's toy command offline: the download fails, then adding --weights just runs."""
    monkeypatch.setattr(checkpoint, "FoLModel", lambda backbone, **kwargs: FoLModel(TINY_VIT, **kwargs))
    common = [
        "eval", "--database_folder", str(labelled_set / "database"), "--queries_folder", str(labelled_set / "queries"),
        "--backbone", "vitb", "--image_size", "126", "126", "--num_workers", "0", "--output_dir", str(tmp_path / "toy"),
    ]
    assert cli.main(common) == 2
    assert "could not download FoL weights" in caplog.text and "--weights /path/to/checkpoint.pth" in caplog.text
    assert cli.main([*common, "--weights", str(tiny_weights)]) == 0


# 6-8. The command line explains itself.


def test_help_is_fast_shows_defaults_and_the_version():
    script = (
        "import sys, contextlib, io\n"
        "from fol_plugin import cli\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    for args in (['--help'], ['eval', '--help'], ['train', '--help'], ['--version']):\n"
        "        try:\n"
        "            cli.main(args)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(out.getvalue())\n"
        "print('TORCH IMPORTED' if 'torch' in sys.modules else 'no torch')\n"
    )
    environment = {**os.environ, "COLUMNS": "200"}
    output = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, check=True, env=environment
    ).stdout
    assert output.strip().endswith("no torch")  # --help parses before importing torch
    assert "``" not in output
    assert re.search(r"--batch_size BATCH_SIZE\s+images per forward pass \(default: 4\)", output)
    assert re.search(r"--backbone \{vitb,vitl\}\s+the published ViT of FoL \(default: vitl\)", output)  # eval
    assert re.search(r"--recipe \{paper,improved\}\s+'paper'.*\(default: paper\)", output, flags=re.S)  # train
    assert f"fol-vpr {fol_plugin.__version__}" in output


def test_default_workers_fit_the_machine():
    assert 1 <= default_num_workers() <= min(4, len(os.sched_getaffinity(0)))


def test_errors_name_command_line_flags(tmp_path):
    vitl = FoLModel(TINY_VIT).state_dict()
    with pytest.raises(checkpoint.CheckpointError, match="--weights"):
        checkpoint.read_checkpoint(tmp_path / "missing.pth")
    state = {key: value for key, value in vitl.items()}
    state["backbone.model.cls_token"] = torch.zeros(1, 1, 1024)  # a ViT-L width
    with pytest.raises(checkpoint.CheckpointError, match="load it with --backbone vitl"):
        checkpoint.load_weights(FoLModel(TINY_VIT), state, "x.pth")


# 9. Consistent numbers.


def test_recalls_json_records_the_top_k_used_and_the_store_size(labelled_set, tiny_weights, tmp_path):
    summary = run_eval(config_for(labelled_set, tmp_path / "run", tiny_weights, rerank_topk=100, num_preds_to_save=0))
    written = json.loads((tmp_path / "run" / "recalls.json").read_text())
    assert written["query_sets"]["queries"]["rerank_topk_used"] == 17 == summary["query_sets"]["queries"]["rerank_topk_used"]
    assert written["config"]["rerank_topk"] == 100
    assert written["store_bytes_per_image"] > 0


# 10. verify and visualize agree.


def test_verify_and_visualize_give_the_same_inliers(tiny_model):
    pair = require(DATA / "match_pair")
    paths = (pair / "query.jpg", pair / "database.jpg")
    images, _, result = match_pair(tiny_model, paths, (126, 126))
    features = [extract_local_features(tiny_model, load_image(path), (126, 126)) for path in paths]
    matches = match(*features, "fol")
    model, inliers = verify(*features, matches, "homography", seed=0)
    assert torch.equal(matches.indices, result.matches) and torch.equal(inliers, result.inliers)
    assert inliers.sum() >= 4
    # The keypoints are the images' own pixels, and the homography maps them.
    assert torch.allclose(features[0].keypoints, result.features[0].keypoints)
    assert features[0].scale == (images[0].shape[-1] / 126, images[0].shape[-2] / 126)
    points = torch.cat([features[0].keypoints[matches.indices[inliers, 0]], torch.ones(int(inliers.sum()), 1)], dim=1)
    mapped = points @ model.T
    error = (mapped[:, :2] / mapped[:, 2:] - features[1].keypoints[matches.indices[inliers, 1]]).norm(dim=1)
    assert error.max() < 3.5 * max(features[1].scale) * 1.01


# 11. README snippets run as written.


ONNX_FILE = "fol_vitb_322.onnx"  # what the README's fol-vpr export line writes


def test_readme_python_snippets_run_as_written(parity_torch_home, monkeypatch, capsys, tmp_path):
    require(DATA / "match_pair")
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.setenv("TORCH_HOME", str(parity_torch_home))
    monkeypatch.chdir(REPO_ROOT)
    namespace: dict = {}
    for block in blocks:
        if ONNX_FILE in block:
            _run_the_onnxruntime_snippet(block, tmp_path, monkeypatch)
            continue
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    assert "global similarity:" in printed and "FoL score:" in printed and "RANSAC inliers" in printed


def _run_the_onnxruntime_snippet(block: str, folder: Path, monkeypatch) -> None:
    """After the README's ``fol-vpr export`` line (the reference ViT-B weights), its onnxruntime
    snippet gives ``model(images)``'s descriptors within 1e-5."""
    pytest.importorskip("onnxruntime", reason='needs the [onnx] extra: pip install -e ".[onnx]"')
    from fol_plugin.export import export_onnx

    model = torch.hub.load(str(REPO_ROOT), "fol_vitb14", source="local", pretrained=True).eval()
    export_onnx(model, (322, 322), folder / ONNX_FILE)
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    images = (torch.from_numpy(namespace["rgb"]) - torch.from_numpy(namespace["mean"])) / torch.from_numpy(namespace["std"])
    with torch.inference_mode():
        expected = model(images)
    assert float((torch.from_numpy(namespace["global_descriptors"]) - expected).abs().max()) <= 1e-5


# 12. Figures a person would rather look at.


def test_prediction_grids_show_file_names_and_fol_scores():
    predictions = np.array([[7, 3, 9]])
    scores = in_display_order(predictions, np.array([[3, 7, 9, 1]]), np.array([[120.0, 340.0]]))
    assert np.array_equal(scores[0, :2], [340.0, 120.0]) and np.isnan(scores[0, 2])
    distances = in_display_order(predictions, np.array([[3, 7, 9, 1]]), np.array([[0.5, 0.61, 0.7, 0.8]]))
    labels = panel_labels(
        "q/@551234.56@4178123.4@10@S@q1@.jpg", ["db/a.jpg", "db/b.jpg", "db/" + "x" * 60 + ".jpg"], scores[0],
        distances[0], [True, False, None],
    )
    assert labels[:3] == [
        "query\nUTM 551235 E, 4178123 N", "#1 correct\na.jpg\nFoL 340, L2² 0.610", "#2 wrong\nb.jpg\nFoL 120, L2² 0.500",
    ]
    assert labels[3].startswith("#3\nxxx") and "..." in labels[3] and labels[3].endswith("L2² 0.700")


def test_visualize_keeps_aspect_ratios_and_has_colour_bars(tiny_model):
    pair = require(DATA / "match_pair")
    images, regions, result = match_pair(tiny_model, (pair / "query.jpg", pair / "database.jpg"), (126, 126))
    figure = draw_pair(images, regions, result, ("query.jpg", "database.jpg"), "homography")
    assert len(figure.axes) == 5  # two region panels, their one shared colour bar, two match rows
    heats = []
    for axis, image in zip([a for a in figure.axes if a.get_label() != "<colorbar>"][:2], images):
        height, width = image.shape[-2:]
        shown, heat = [artist for artist in axis.get_children() if isinstance(artist, AxesImage)][:2]
        assert shown.get_array().shape[:2] == (height, width)  # the original image, not squashed
        heats.append(heat)
    assert sum(axis.get_label() == "<colorbar>" for axis in figure.axes) == 1
    assert [heat.get_clim() for heat in heats] == [(0.0, 1.0), (0.0, 1.0)]  # one scale for both images
    assert min(float(heat.get_array().min()) for heat in heats) == 0.0
    assert max(float(heat.get_array().max()) for heat in heats) == 1.0


# 13. Nothing written beside the code.


def test_numba_caches_and_default_outputs_stay_out_of_the_package():
    cache_path = Path(kernels.exact_row_best._cache._cache_path)
    assert not cache_path.is_relative_to(REPO_ROOT / "fol_plugin")
    # <user cache>/numba/<digest of the kernels' sources>: a change of either source compiles afresh.
    in_user_cache = cache_path.parent.parent.name == "numba" and cache_path.parent.name == kernels.SOURCES_DIGEST
    assert in_user_cache and "fol-plugin" in str(cache_path) or os.environ.get("NUMBA_CACHE_DIR")
    ignored = subprocess.run(
        ["git", "check-ignore", "runs/toy/recalls.json", "fol_matches.png"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.stdout.split() == ["runs/toy/recalls.json", "fol_matches.png"]
