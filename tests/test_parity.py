"""Parity with the original implementation on the shared reference run (ViT-B, 322x322)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fol_plugin import load_model, mutual_match_scores
from fol_plugin.host import SCREEN_PRODUCTS
from fol_plugin.rerank import mutual_matches

from .conftest import REPO_ROOT, imagenet_input


@pytest.fixture(scope="module")
def hub_features(parity_fixture, parity_torch_home):
    """Features of the fixture images from torch.hub.load(<clone>, "fol_vitb14", pretrained=True)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(parity_torch_home))
        model = torch.hub.load(str(REPO_ROOT), "fol_vitb14", source="local", pretrained=True)
    with torch.inference_mode():
        return model.extract(imagenet_input(parity_fixture["expected"]["images_uint8"]))


def test_global_descriptors_match_original(hub_features, parity_fixture):
    expected = parity_fixture["expected"]["global_descriptors"]
    np.testing.assert_allclose(hub_features.global_descriptors.numpy(), expected, atol=1e-4, rtol=0)


def test_local_counts_and_descriptors_match_original(hub_features, parity_fixture):
    expected = parity_fixture["expected"]
    assert [len(d) for d in hub_features.local_descriptors] == expected["local_counts"].tolist()
    first = parity_fixture["meta"]["local_descriptors_first_images"]
    ours = torch.cat(hub_features.local_descriptors[:first]).numpy()
    np.testing.assert_allclose(ours, expected["local_descriptors_first"], atol=1e-3, rtol=0)


@pytest.mark.parametrize("product", SCREEN_PRODUCTS)
def test_rerank_scores_match_original(hub_features, parity_fixture, product):
    local = hub_features.local_descriptors
    scores = torch.stack([mutual_match_scores(query, local, product=product) for query in local])
    np.testing.assert_array_equal(scores.numpy(), parity_fixture["expected"]["rerank_scores"])


def test_matches_are_mutual_nearest_neighbours_above_threshold(hub_features):
    query, candidate = hub_features.local_descriptors[:2]
    q_idx, c_idx = mutual_matches(query, candidate)
    similarity = candidate @ query.T
    assert torch.equal(similarity.argmax(0)[q_idx], c_idx)
    assert torch.equal(similarity.argmax(1)[c_idx], q_idx)
    assert bool(((query[q_idx] * candidate[c_idx]).sum(-1) > 0.7).all())


def test_forward_is_the_global_descriptor(parity_fixture, parity_torch_home, hub_features, no_network, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(parity_torch_home))
    model = load_model("vitb", weights="auto", device="cpu")
    images = imagenet_input(parity_fixture["expected"]["images_uint8"][:1])
    with torch.inference_mode():
        descriptors = model(images)
    assert descriptors.shape == (1, 8448) and descriptors.dtype == torch.float32
    np.testing.assert_allclose(descriptors.numpy(), hub_features.global_descriptors[:1].numpy(), atol=1e-6, rtol=0)


def test_get_trained_model_passes_valid_sizes_through_and_resizes_others(parity_fixture, parity_torch_home, no_network):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(parity_torch_home))
        wrapped = torch.hub.load(str(REPO_ROOT), "get_trained_model", source="local", backbone="vitb")
    images = imagenet_input(parity_fixture["expected"]["images_uint8"][:1])
    with torch.inference_mode():
        same = wrapped(images)
        inner = wrapped.model(images)
        odd = wrapped(images[..., :317, :330])  # rounds to 322 x 336
    np.testing.assert_array_equal(same.numpy(), inner.numpy())
    assert odd.shape == (1, 8448)
    assert torch.allclose(odd.norm(dim=-1), torch.ones(1))


def test_code_written_for_the_original_hub_runs_unchanged(parity_fixture, parity_torch_home, hub_features, no_network):
    """chenshunpeng/FoL's hub call (``strict=False``) and its evaluation's ``model(x, test=True)``,
    read as ``outputs[0], outputs[1]``: our global descriptors, and the local descriptors
    zero-padded to the original's 3600 (322 x 322: an 89-row local grid), which score as the
    original's re-ranking does."""
    weights = parity_torch_home / "hub" / "checkpoints" / "FoL_base.pth"
    model = torch.hub.load(str(REPO_ROOT), "FoL", source="local", backbone="vitb", weights=str(weights), strict=False)
    images = imagenet_input(parity_fixture["expected"]["images_uint8"])
    with torch.inference_mode():
        outputs = model(images, test=True)
        plain = model(images)
    features, local = outputs[0], outputs[1]
    assert len(outputs) == 2 and torch.equal(features, plain)
    assert local.shape == (3, 3600, 128)
    for padded, descriptors in zip(local, hub_features.local_descriptors):
        assert torch.equal(padded[: len(descriptors)], descriptors)
        assert not padded[len(descriptors) :].any()
    scores = torch.stack([mutual_match_scores(query, list(local)) for query in local])
    np.testing.assert_array_equal(scores.numpy(), parity_fixture["expected"]["rerank_scores"])
