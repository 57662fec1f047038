"""FoL features as kornia matching inputs, the matcher interface, RANSAC and the scorers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kornia.feature import get_laf_center, get_laf_scale

from fol_plugin import mutual_match_scores
from fol_plugin.matching import MATCHERS, LocalFeatures, ScorerConfig, make_pair_scorer, match, verify
from fol_plugin.models import FoLModel
from fol_plugin.rerank import mutual_matches

from .conftest import imagenet_input


@pytest.fixture(scope="module")
def fixture_features(parity_fixture) -> list[LocalFeatures]:
    """Local features of the shared reference images under the reference weights."""
    model = FoLModel("vitb").eval()
    model.load_state_dict(parity_fixture["state_dict"])
    with torch.inference_mode():
        features = model.extract(imagenet_input(parity_fixture["expected"]["images_uint8"]))
    return [LocalFeatures(k, d) for k, d in zip(features.keypoints, features.local_descriptors)]


def synthetic_pair(seed: int = 0, n: int = 300) -> tuple[LocalFeatures, LocalFeatures]:
    """Image 1 is image 0 shifted by (5, -3) pixels, with noisy descriptors and extra clutter."""
    generator = torch.Generator().manual_seed(seed)
    keypoints = torch.rand(n, 2, generator=generator) * 300
    descriptors = F.normalize(torch.randn(n, 128, generator=generator), dim=-1)
    noisy = F.normalize(descriptors + 0.05 * torch.randn(n, 128, generator=generator), dim=-1)
    clutter = F.normalize(torch.randn(50, 128, generator=generator), dim=-1)
    moved = torch.cat([keypoints + torch.tensor([5.0, -3.0]), torch.rand(50, 2, generator=generator) * 300])
    return LocalFeatures(keypoints, descriptors), LocalFeatures(moved, torch.cat([noisy, clutter]))


def test_fol_matcher_counts_equal_the_rerank_scores_on_the_fixture(fixture_features, parity_fixture):
    expected = parity_fixture["expected"]["rerank_scores"]
    for q, query in enumerate(fixture_features):
        counts = [len(match(query, candidate, "fol")) for candidate in fixture_features]
        engine = mutual_match_scores(query.descriptors, [c.descriptors for c in fixture_features])
        assert counts == engine.int().tolist() == expected[q].astype(int).tolist()


def test_lafs_sit_on_the_keypoints_one_cell_wide(fixture_features):
    features = fixture_features[0]
    lafs = features.lafs()
    assert lafs.shape == (1, len(features), 2, 3)
    assert torch.allclose(get_laf_center(lafs)[0], features.keypoints)
    assert torch.allclose(get_laf_scale(lafs).flatten(), torch.full((len(features),), 3.5))


@pytest.mark.parametrize("method", MATCHERS)
def test_every_matcher_returns_valid_pairs(method):
    image0, image1 = synthetic_pair()
    matches = match(image0, image1, method)
    assert matches.indices.dtype == torch.long and matches.indices.shape[1] == 2
    assert len(matches.distances) == len(matches)
    if len(matches):
        assert int(matches.indices[:, 0].max()) < len(image0) and int(matches.indices[:, 1].max()) < len(image1)
    if method in ("fol", "nn", "mnn", "snn", "smnn", "fginn"):
        # The true correspondences (i -> i) dominate.
        correct = (matches.indices[:, 0] == matches.indices[:, 1]).float().mean()
        assert len(matches) > 100 and correct > 0.9


def test_kornia_mnn_is_the_unthresholded_fol_matching():
    image0, image1 = synthetic_pair(1)
    kornia_pairs = {tuple(p) for p in match(image0, image1, "mnn").indices.tolist()}
    ours = mutual_matches(image0.descriptors, image1.descriptors, threshold=-2.0)
    assert kornia_pairs == set(zip(ours[0].tolist(), ours[1].tolist()))


def test_ransac_is_deterministic_with_a_seed_and_finds_the_shift():
    image0, image1 = synthetic_pair(2)
    matches = match(image0, image1, "mnn")
    for model in ("homography", "fundamental"):
        first = verify(image0, image1, matches, model, seed=3)
        second = verify(image0, image1, matches, model, seed=3)
        assert torch.equal(first[1], second[1]) and torch.equal(first[0], second[0])
        inliers = first[1]
        true_pairs = matches.indices[:, 0] == matches.indices[:, 1]
        assert bool(inliers[true_pairs].float().mean() > 0.9) and not bool(inliers[~true_pairs].any())
    homography, _ = verify(image0, image1, matches, "homography", seed=3)
    homography = homography / homography[2, 2]
    assert torch.allclose(homography[:2, 2], torch.tensor([5.0, -3.0]), atol=0.5)


def test_too_few_matches_give_no_model():
    image0, image1 = synthetic_pair(3, n=3)
    matches = match(image0, image1, "mnn")
    model, inliers = verify(image0, image1, matches, "homography")
    assert model is None and inliers.shape == (len(matches),) and not bool(inliers.any())


def test_scorers():
    image0, image1 = synthetic_pair(4)
    fol = make_pair_scorer(ScorerConfig("fol"))(image0, image1)
    assert fol == len(mutual_matches(image0.descriptors, image1.descriptors)[0])
    inliers = make_pair_scorer(ScorerConfig("mnn+ransac"))(image0, image1)
    assert 0 < inliers <= make_pair_scorer(ScorerConfig("mnn"))(image0, image1)
    with pytest.raises(ValueError, match="choose one of fol, nn"):
        ScorerConfig("lightglue")
    with pytest.raises(ValueError, match="matcher 'sift'"):
        match(image0, image1, "sift")
