"""Full-size ViT-L through torch.hub at the paper's 504x504 and a non-square size (slow)."""
from __future__ import annotations

import pytest
import torch

from fol_plugin import mutual_match_scores
from fol_plugin.models import FoLModel

from .conftest import REPO_ROOT, save_upstream_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vitl(tmp_path_factory):
    home = tmp_path_factory.mktemp("vitl_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    save_upstream_checkpoint(FoLModel("vitl").state_dict(), home / "hub" / "checkpoints" / "FoL_large.pth")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(home))
        return torch.hub.load(str(REPO_ROOT), "fol_vitl14", source="local", pretrained=True)


@pytest.mark.parametrize("size", [(504, 504), (504, 392), (224, 224)])
def test_vitl_runs_where_the_original_crashed(vitl, size, no_network):
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = vitl.extract(images)
    assert features.global_descriptors.shape == (2, 8448)
    h, w = size[0] // 14, size[1] // 14
    for descriptors in features.local_descriptors:
        assert 225 <= len(descriptors) <= (4 * h - 3) * (4 * w - 3)
    self_scores = mutual_match_scores(features.local_descriptors[0], features.local_descriptors)
    assert self_scores[0] == len(features.local_descriptors[0])
