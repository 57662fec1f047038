"""The adapters in adapters/, run against the real harness code when a clone is available.

Each harness is found through an environment variable naming its clone; without it (or without
the harness's own dependencies) the test skips and says which.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fol_plugin import load_model
from fol_plugin.data import load_image, normalize
from fol_plugin.matching import extract_local_features, match
from fol_plugin.models import FoLModel
from fol_plugin.models.resizing import PatchSizeResizer
from fol_plugin.rerank import mutual_match_scores

from .conftest import DATA, REPO_ROOT, TINY_VIT, require, save_upstream_checkpoint

ADAPTERS = REPO_ROOT / "adapters"


def harness_root(variable: str) -> Path:
    root = os.environ.get(variable)
    if not root or not Path(root).is_dir():
        pytest.skip(f"set {variable} to a clone of the harness to run this test")
    return Path(root)


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_weights(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny.pth"
    torch.save(FoLModel(TINY_VIT).state_dict(), path)
    return path


def test_add_fol_inserts_the_readme_lines_once(tmp_path):
    """The VPR-methods-evaluation patcher on a minimal stand-in of the two files it edits."""
    add_fol = load_module("add_fol", ADAPTERS / "vpr_methods_evaluation" / "add_fol.py")
    (tmp_path / "vpr_models").mkdir()
    (tmp_path / "parser.py").write_text(
        'def parse_arguments():\n    parser.add_argument(\n        "--method",\n        choices=[\n'
        '            "megaloc",\n        ],\n    )\n    args = parser.parse_args()\n    return args\n'
    )
    (tmp_path / "vpr_models" / "__init__.py").write_text(
        'def get_model(method, backbone=None, descriptors_dimension=None):\n    if method == "x":\n'
        "        model = 1\n    return model\n"
    )
    for _ in range(2):
        add_fol.add_fol(tmp_path, "owner/fol-plugin")
    parser_text = (tmp_path / "parser.py").read_text()
    models_text = (tmp_path / "vpr_models" / "__init__.py").read_text()
    assert parser_text.count(add_fol.MARKER) == 1 and models_text.count(add_fol.MARKER) == 1
    assert add_fol.parser_lines() in parser_text and add_fol.model_lines("owner/fol-plugin") in models_text
    readme = (ADAPTERS / "vpr_methods_evaluation" / "README.md").read_text()
    assert add_fol.parser_lines() in readme
    assert add_fol.model_lines("path/to/fol-plugin").replace(', source="local"', "") in readme.replace(
        ', source="local"', ""
    )
    namespace = {"torch": None}
    exec(compile(models_text, "models", "exec"), namespace)  # the patched module still parses


def test_hloc_extractor(tmp_path, tiny_weights, monkeypatch):
    root = harness_root("FOL_HLOC_ROOT")
    package = tmp_path / "hloc"
    for relative in ("__init__.py", "utils/__init__.py", "utils/base_model.py", "extractors/__init__.py"):
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "hloc" / relative, package / relative)
    shutil.copyfile(ADAPTERS / "hloc" / "fol.py", package / "extractors" / "fol.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "hloc" or m.startswith("hloc.")]:
        monkeypatch.delitem(sys.modules, name)
    import hloc.extractors
    from hloc.utils.base_model import dynamic_load

    Model = dynamic_load(hloc.extractors, "fol")
    model = Model({"backbone": TINY_VIT, "weights": str(tiny_weights)}).eval()
    image = torch.rand(1, 3, 130, 150)  # hloc's input: [0, 1], any size
    with torch.inference_mode():
        output = model({"image": image})
        expected = PatchSizeResizer(load_model(TINY_VIT, str(tiny_weights), "cpu"))(normalize(image))
    assert output["global_descriptor"].shape == (1, 8448)
    assert torch.allclose(output["global_descriptor"], expected, atol=1e-6)


def test_reranking_for_vpr_extractor_and_scorer(tmp_path, tiny_weights, monkeypatch):
    root = harness_root("FOL_RERANKING_FOR_VPR_ROOT")
    pair = require(DATA / "match_pair")
    models = tmp_path / "rrv" / "src" / "models"
    models.mkdir(parents=True)
    for package in (tmp_path / "rrv" / "src", models):
        (package / "__init__.py").write_text("")
    shutil.copyfile(root / "src" / "models" / "base_model.py", models / "base_model.py")
    shutil.copyfile(ADAPTERS / "re_ranking_for_vpr" / "fol.py", models / "fol.py")
    (tmp_path / "rrv" / "src" / "utils").mkdir()
    shutil.copyfile(root / "src" / "utils" / "utils.py", tmp_path / "rrv" / "src" / "utils" / "utils.py")
    monkeypatch.syspath_prepend(str(tmp_path / "rrv"))
    from src.models.fol import FoLExtractor, FoLScorer

    try:
        from src.utils.utils import extract_reranked_prediction
    except ImportError as error:
        pytest.skip(f"the harness's utils need {error.name}")

    extractor = FoLExtractor(backbone=TINY_VIT, weights=str(tiny_weights), image_size=(126, 126))
    scorer = FoLScorer()
    preprocess = extractor.get_preprocessing()
    paths = [pair / "database.jpg", pair / "query.jpg", pair / "query.jpg"]  # 2 database images, 1 query

    class PairDataset:
        database_num, queries_num = 2, 1

        def __getitem__(self, index):
            return preprocess(paths[index]), index

        def __len__(self):
            return 3

    predictions, scores = extract_reranked_prediction(extractor, scorer, PairDataset(), [[0, 1]], 2, "cpu")
    model = load_model(TINY_VIT, str(tiny_weights), "cpu")
    local = [extract_local_features(model, load_image(p), (126, 126)).descriptors for p in paths]
    expected = mutual_match_scores(local[2], local[:2])
    assert [-score for score in scores[0]] == sorted(expected.tolist(), reverse=True)  # best (most matches) first
    assert list(predictions[0]) == [1, 0]  # the query's own copy first


def test_vismatch_matcher(tiny_weights, monkeypatch):
    root = harness_root("FOL_VISMATCH_ROOT")
    pair = require(DATA / "match_pair")
    monkeypatch.syspath_prepend(str(root))
    try:
        import vismatch  # noqa: F401
    except ImportError as error:
        pytest.skip(f"vismatch's dependencies are missing: {error.name}")
    adapter = load_module("fol_vismatch", ADAPTERS / "image_matching_models" / "fol.py")
    matcher = adapter.FoLMatcher("cpu", backbone=TINY_VIT, weights=str(tiny_weights), image_size=(126, 126))
    result = matcher(str(pair / "query.jpg"), str(pair / "database.jpg"))
    model = load_model(TINY_VIT, str(tiny_weights), "cpu")
    features = [extract_local_features(model, load_image(pair / name), (126, 126)) for name in ("query.jpg", "database.jpg")]
    assert len(result["matched_kpts0"]) == len(match(*features, "fol"))
    assert result["all_kpts0"].shape == (len(features[0]), 2) and result["all_desc1"].shape == (len(features[1]), 128)
    assert 0 <= result["num_inliers"] <= len(result["matched_kpts0"])


# The harness's own model inputs, through FoL's hub entrypoint, in the harness's environment: it
# needs torchvision, which this process never imports.
OURS_ON_HARNESS_INPUTS = """
import sys
import numpy as np
import torch
from test_dataset import TestDataset

toy, hub, output = sys.argv[1:]
dataset = TestDataset(f"{toy}/database", f"{toy}/queries", image_size=[322, 322], use_labels=False)
model = torch.hub.load(hub, "get_trained_model", source="local", backbone="vitb")
with torch.inference_mode():
    np.save(output, np.concatenate([model(dataset[i][0][None]).numpy() for i in range(dataset.num_database)]))
"""


@pytest.mark.slow
def test_vpr_methods_evaluation_main_gives_fols_descriptors(tmp_path, parity_fixture):
    root = harness_root("FOL_VPR_METHODS_EVALUATION_ROOT")
    probe = subprocess.run([sys.executable, "-c", "import faiss, loguru, torchvision.transforms"], capture_output=True, text=True)
    if probe.returncode:  # torchvision's compiled ops fail to load with some torch builds
        pytest.skip(f"the harness's dependencies do not load here: {probe.stderr.strip().splitlines()[-1]}")
    clone = tmp_path / "harness"
    shutil.copytree(root, clone)
    add_fol = load_module("add_fol", ADAPTERS / "vpr_methods_evaluation" / "add_fol.py")
    add_fol.add_fol(clone, str(REPO_ROOT))
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    save_upstream_checkpoint(parity_fixture["state_dict"], checkpoints / "FoL_base.pth")
    environment = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home")}
    toy = clone / "toy_dataset"
    command = [sys.executable, "main.py", "--method", "fol-vitb", "--database_folder", str(toy / "database"),
               "--queries_folder", str(toy / "queries"), "--no_labels", "--device", "cpu", "--image_size", "322", "322",
               "--save_descriptors", "--num_workers", "0", "--log_dir", "fol"]
    subprocess.run(command, cwd=clone, env=environment, check=True)
    saved = np.load(next((clone / "logs" / "fol").glob("*/database_descriptors.npy")))
    ours = tmp_path / "ours.npy"
    subprocess.run([sys.executable, "-c", OURS_ON_HARNESS_INPUTS, str(toy), str(REPO_ROOT), str(ours)],
                   cwd=clone, env=environment, check=True)
    np.testing.assert_allclose(saved, np.load(ours), atol=1e-5, rtol=0)
