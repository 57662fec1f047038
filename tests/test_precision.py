"""Reduced precision at scale: ``--extraction_precision bf16|fp16`` and ``--global_dtype float16``.

The fp32 path is the parity path (tests/test_parity.py); these tests hold the reduced modes to
the tolerances docs/PRECISION.md states."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fol_plugin import load_model
from fol_plugin.evaluation import run_eval
from fol_plugin.features import ExtractionConfig
from fol_plugin.features.extract import extraction_autocast

from .conftest import config_for, imagenet_input

# docs/PRECISION.md: ViT-B under the fixture weights, the fixture's three 322x322 images.
GLOBAL_TOLERANCE = {"bf16": 1e-3, "fp16": 2e-4}  # max |diff| of a global descriptor entry against fp32
MIN_COSINE = {"bf16": 0.9999, "fp16": 0.99999}


@pytest.fixture(scope="module")
def fixture_model(parity_fixture, parity_torch_home):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(parity_torch_home))
        return load_model("vitb", "auto", "cpu")


def features(model, images: torch.Tensor, precision: str):
    with torch.inference_mode(), extraction_autocast(ExtractionConfig(precision=precision)):
        return model.extract(images)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_stays_within_the_documented_tolerance(fixture_model, parity_fixture, precision):
    images = imagenet_input(parity_fixture["expected"]["images_uint8"])
    reference = torch.from_numpy(parity_fixture["expected"]["global_descriptors"])
    reduced = features(fixture_model, images, precision)
    descriptors = reduced.global_descriptors
    assert descriptors.dtype == torch.float32 and torch.isfinite(descriptors).all()
    torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(len(descriptors)), rtol=0, atol=1e-5)
    assert (descriptors - reference).abs().max() <= GLOBAL_TOLERANCE[precision]
    assert (descriptors * reference).sum(dim=1).min() >= MIN_COSINE[precision]
    for local in reduced.local_descriptors:
        assert local.dtype == torch.float32 and torch.isfinite(local).all()
        torch.testing.assert_close(local.norm(dim=1), torch.ones(len(local)), rtol=0, atol=1e-5)
    # Not a copy of the fp32 result: the reduced precision really ran.
    assert not torch.equal(descriptors, reference)


def test_fp32_extraction_is_unchanged_by_the_precision_option(fixture_model, parity_fixture):
    images = imagenet_input(parity_fixture["expected"]["images_uint8"])
    descriptors = features(fixture_model, images, "fp32").global_descriptors
    np.testing.assert_allclose(descriptors.numpy(), parity_fixture["expected"]["global_descriptors"], rtol=0, atol=1e-5)
    with torch.inference_mode():
        assert torch.equal(descriptors, fixture_model.extract(images).global_descriptors)


def test_an_unknown_extraction_precision_is_refused():
    with pytest.raises(ValueError, match="--extraction_precision 'int8'; choose one of"):
        ExtractionConfig(precision="int8")


def test_float16_database_descriptors_halve_the_cache_and_keep_the_predictions(labelled_set, tiny_weights, tmp_path):
    runs = {}
    for dtype in ("float32", "float16"):
        output = tmp_path / dtype
        run_eval(config_for(labelled_set, output, tiny_weights, global_dtype=dtype))
        runs[dtype] = output
    name = {"float32": "database_global.npy", "float16": "database_global_float16.npy"}
    cached = {dtype: np.load(runs[dtype] / "cache" / name[dtype], mmap_mode="r") for dtype in runs}
    assert cached["float16"].dtype == np.float16 and cached["float32"].dtype == np.float32
    assert cached["float16"].nbytes * 2 == cached["float32"].nbytes
    np.testing.assert_allclose(cached["float16"], cached["float32"], rtol=0, atol=1e-3)
    for stage in ("global", "reranked"):
        file = f"predictions_{stage}.npy"
        np.testing.assert_array_equal(
            np.load(runs["float16"] / "queries" / file), np.load(runs["float32"] / "queries" / file)
        )
    # The recalls; not the confidence APs, which rank queries by their distances (float16's here).
    recalls = [
        {key: (results["global"], results["reranked"]) for key, results in summary["query_sets"].items()}
        for summary in (json.loads((runs[dtype] / "recalls.json").read_text()) for dtype in runs)
    ]
    assert recalls[0] == recalls[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_on_cuda_stays_within_the_documented_tolerance(parity_fixture, parity_torch_home, precision):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(parity_torch_home))
        model = load_model("vitb", "auto", "cuda")
    images = imagenet_input(parity_fixture["expected"]["images_uint8"]).cuda()
    reference = torch.from_numpy(parity_fixture["expected"]["global_descriptors"])
    with torch.inference_mode(), extraction_autocast(ExtractionConfig(precision=precision, device="cuda")):
        descriptors = model.extract(images).global_descriptors.cpu()
    assert torch.isfinite(descriptors).all()
    torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(len(descriptors)), rtol=0, atol=1e-5)
    assert (descriptors - reference).abs().max() <= GLOBAL_TOLERANCE[precision]
