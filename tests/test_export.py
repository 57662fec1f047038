"""FoL as ONNX (``fol_plugin.export``, ``fol-vpr export``): onnxruntime's outputs against PyTorch's."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fol_plugin import cli
from fol_plugin.cache import checkpoint_digest
from fol_plugin.models import FoLModel
from fol_plugin.rerank import mutual_match_scores

from .conftest import REPO_ROOT, TINY_VIT

onnx_extra = pytest.importorskip("onnxruntime", reason='needs the [onnx] extra: pip install -e ".[onnx]"')
export = importlib.import_module("fol_plugin.export")

GLOBAL_TOLERANCE = 1e-5
LOCAL_TOLERANCE = 1e-5
TINY_SIZE = (126, 154)  # non-square: 9 x 11 patches


@pytest.fixture(scope="module")
def tiny_model() -> FoLModel:
    torch.manual_seed(0)
    return FoLModel(TINY_VIT).eval()


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export.export_onnx(tiny_model, TINY_SIZE, path, checkpoint_digest="tiny-digest")
    return path


def assert_same_features(onnx_model, torch_model: FoLModel, images: torch.Tensor) -> dict:
    """onnxruntime against PyTorch on ``images``: global and local descriptors within the
    tolerances, the kept cells identical, FoL scores identical; returns the largest differences."""
    with torch.inference_mode():
        expected = torch_model.extract(images)
        expected_global = torch_model(images)
    got = onnx_model.extract(images)
    global_difference = float((got.global_descriptors - expected.global_descriptors).abs().max())
    assert global_difference <= GLOBAL_TOLERANCE
    assert float((onnx_model(images) - expected_global).abs().max()) <= GLOBAL_TOLERANCE
    assert all(torch.equal(a, b) for a, b in zip(got.keypoints, expected.keypoints))  # the same kept cells
    local_difference = max(float((a - b).abs().max()) for a, b in zip(got.local_descriptors, expected.local_descriptors))
    assert local_difference <= LOCAL_TOLERANCE
    scores = [mutual_match_scores(query, got.local_descriptors) for query in got.local_descriptors]
    reference = [mutual_match_scores(query, expected.local_descriptors) for query in expected.local_descriptors]
    assert all(torch.equal(a, b) for a, b in zip(scores, reference))
    return {"global": global_difference, "local": local_difference}


def test_onnxruntime_gives_pytorchs_features_for_any_batch(tiny_model, tiny_onnx):
    model = export.OnnxFoL(tiny_onnx)
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        assert_same_features(model, tiny_model, torch.randn(batch, 3, *TINY_SIZE, generator=generator))


def test_the_file_records_how_it_was_made(tiny_onnx):
    model = export.OnnxFoL(tiny_onnx)
    assert model.image_size == TINY_SIZE
    assert model.metadata["opset"] == str(export.ONNX_OPSET) and model.metadata["checkpoint"] == "tiny-digest"
    assert json.loads(model.metadata["normalisation"])["mean"] == [0.485, 0.456, 0.406]
    assert json.loads(model.metadata["backbone"])["embed_dim"] == TINY_VIT.embed_dim


def test_a_file_for_another_size_or_checkpoint_is_refused(tiny_onnx, tmp_path):
    model = export.OnnxFoL(tiny_onnx)
    with pytest.raises(export.OnnxError, match=r"exported for 126x154 images, got \[1, 3, 126, 126\]: resize to 126x154, "
                       r"or export again with --image_size 126 126"):
        model(torch.zeros(1, 3, 126, 126))
    with pytest.raises(export.OnnxError, match="exported from checkpoint tiny-digest, not other: export it again"):
        export.OnnxFoL(tiny_onnx, checkpoint_digest="other")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(export.OnnxError, match="junk.onnx is not a readable ONNX file"):
        export.OnnxFoL(tmp_path / "junk.onnx")
    with pytest.raises(export.OnnxError, match="missing.onnx does not exist: write it with fol-vpr export"):
        export.OnnxFoL(tmp_path / "missing.onnx")


def test_a_size_fol_cannot_take_is_refused_before_exporting(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        export.export_onnx(tiny_model, (320, 320), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_without_the_extra_one_line_says_how_to_get_it(tiny_model, tmp_path, monkeypatch):
    real = importlib.import_module

    def missing(name, *args):
        if name.startswith("onnx"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(export.importlib, "import_module", missing)
    with pytest.raises(export.OnnxError, match=r'need onnx, which is not installed: pip install "fol-plugin\[onnx\]"'):
        export.export_onnx(tiny_model, TINY_SIZE, tmp_path / "x.onnx")


def test_fol_vpr_export_writes_a_file_onnxruntime_runs(tiny_weights, tmp_path):
    output = tmp_path / "fol.onnx"
    finished = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "tiny_fol_vpr.py"), "export", "--backbone", "vitb", "--weights",
         str(tiny_weights), "--image_size", "126", "154", "--output", str(output)],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"{output}: FoL vitb for [B, 3, 126, 154] images" in finished.stdout
    model = export.OnnxFoL(output, checkpoint_digest=checkpoint_digest(tiny_weights))
    assert model(torch.zeros(2, 3, 126, 154)).shape == (2, 8448)
    assert cli.main(["export", "--output", str(tmp_path / "y.onnx"), "--image_size", "320", "320",
                     "--weights", str(tiny_weights), "--backbone", "vitb"]) == 2  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("size", [(322, 322), (322, 420)], ids=["322x322", "322x420"])
def test_vitb_on_the_reference_photos_agrees_with_pytorch(parity_fixture, parity_torch_home, size, tmp_path, monkeypatch):
    """ViT-B under the reference weights on the shared photos (resized to ``size``)."""
    from fol_plugin.data import preprocess

    monkeypatch.setenv("TORCH_HOME", str(parity_torch_home))
    model = torch.hub.load(str(REPO_ROOT), "fol_vitb14", source="local", pretrained=True).eval()
    path = export.export_onnx(model, size, tmp_path / "vitb.onnx")
    photos = torch.from_numpy(parity_fixture["expected"]["images_uint8"]).float() / 255
    images = preprocess(photos, size)
    differences = assert_same_features(export.OnnxFoL(path), model, images)
    print(f"ViT-B {size}: max |onnx - torch| global {differences['global']:.1e}, local {differences['local']:.1e}")
