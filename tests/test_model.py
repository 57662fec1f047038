"""Model plumbing on a tiny ViT: shapes, sizes, batch independence, keypoint geometry, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fol_plugin import PatchSizeResizer
from fol_plugin.models import FoLModel, nearest_valid_sizes
from fol_plugin.models.aggregator import clip_top_values
from fol_plugin.models.local_features import original_padded_length

from .conftest import TINY_VIT


def extract(model, images):
    with torch.inference_mode():
        return model.extract(images)


@pytest.mark.parametrize("size", [(182, 252), (252, 182), (322, 322)])
def test_output_shapes_and_normalisation(tiny_model, size):
    images = torch.randn(2, 3, *size)
    features = extract(tiny_model, images)
    h, w = size[0] // 14, size[1] // 14
    assert features.global_descriptors.shape == (2, 8448)
    assert features.global_descriptors.dtype == torch.float32
    assert torch.allclose(features.global_descriptors.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert features.region_scores.shape == (2, h, w)
    assert torch.allclose(features.region_scores.flatten(1).sum(-1), torch.ones(2), atol=1e-5)
    for descriptors, keypoints in zip(features.local_descriptors, features.keypoints):
        assert descriptors.shape[1] == 128 and keypoints.shape == (len(descriptors), 2)
        assert torch.allclose(descriptors.norm(dim=-1), torch.ones(len(descriptors)), atol=1e-5)
    with torch.inference_mode():
        assert torch.equal(tiny_model(images), features.global_descriptors)


def test_results_do_not_depend_on_the_batch(tiny_model):
    torch.manual_seed(1)
    images = torch.randn(3, 3, 224, 266)
    batched = extract(tiny_model, images)
    for i in range(3):
        single = extract(tiny_model, images[i : i + 1])
        assert torch.equal(single.global_descriptors[0], batched.global_descriptors[i])
        assert torch.equal(single.keypoints[0], batched.keypoints[i])
        torch.testing.assert_close(single.local_descriptors[0], batched.local_descriptors[i], atol=1e-5, rtol=0)


def test_225_patches_are_selected_and_map_to_local_cells(tiny_model):
    features = extract(tiny_model, torch.randn(1, 3, 322, 294))  # 23 x 21 patches
    scores = features.region_scores[0]
    selected = torch.zeros(scores.numel())
    selected[scores.flatten().topk(225).indices] = 1
    cell_mask = F.interpolate(selected.view(1, 1, 23, 21), size=(89, 81), mode="nearest").flatten()
    assert len(features.local_descriptors[0]) == int(cell_mask.sum())


def test_small_images_select_every_patch_and_keypoints_cover_the_grid(tiny_model):
    features = extract(tiny_model, torch.randn(1, 3, 182, 140))  # 13 x 10 = 130 patches < 225
    rows, cols = 4 * 13 - 3, 4 * 10 - 3
    keypoints = features.keypoints[0]
    assert len(keypoints) == rows * cols
    xs = torch.arange(cols) * 3.5 + 7
    ys = torch.arange(rows) * 3.5 + 7
    expected = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)  # raster order
    assert torch.equal(keypoints, expected)
    assert keypoints[:, 0].max() == 140 - 7 and keypoints[:, 1].max() == 182 - 7


def test_local_descriptors_sit_at_their_keypoints(tiny_model):
    images = torch.randn(1, 3, 266, 238)
    features = extract(tiny_model, images)
    with torch.inference_mode():
        tokens, _ = tiny_model.encode(images)
        dense = F.normalize(tiny_model.dense_local_map(tokens.feature_map)[0], dim=0)  # [128, H', W']
    keypoints = features.keypoints[0]
    rows = ((keypoints[:, 1] - 7) / 3.5).long()
    cols = ((keypoints[:, 0] - 7) / 3.5).long()
    raster = rows * dense.shape[-1] + cols
    assert torch.all(raster[1:] > raster[:-1])
    torch.testing.assert_close(dense[:, rows, cols].T, features.local_descriptors[0])


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((320, 322), "height 320 is not a multiple of the patch size 14; resize to 308 or 322"),
        ((322, 230), "width 230 is not a multiple of the patch size 14; resize to 224 or 238"),
        ((10, 322), "height 10 is not a multiple of the patch size 14; resize to 14 or 28"),
        ((112, 112), "112x112 gives 64 patches"),
    ],
)
def test_invalid_sizes_are_rejected_with_the_fix(tiny_model, size, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(torch.randn(1, 3, *size))


def test_smallest_valid_grid_runs(tiny_model):
    features = extract(tiny_model, torch.randn(1, 3, 70, 182))  # 5 x 13 = 65 patches
    assert len(features.local_descriptors[0]) == (4 * 5 - 3) * (4 * 13 - 3)


def test_wrong_channel_count_is_rejected(tiny_model):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\], got \(1, 1, 224, 224\)"):
        tiny_model(torch.randn(1, 1, 224, 224))


def test_nearest_valid_sizes():
    assert nearest_valid_sizes(320) == (308, 322)
    assert nearest_valid_sizes(5) == (14, 28)


def test_clip_replaces_three_largest_by_the_five_percent_rank():
    values = torch.arange(40, dtype=torch.float32).flip(0).unsqueeze(0)  # 39, 38, ..., 0
    clipped = clip_top_values(values)
    assert clipped[0, :3].tolist() == [37.0, 37.0, 37.0]  # rank int(0.05 * 40) = 2 holds 37
    assert torch.equal(clipped[0, 3:], values[0, 3:])
    assert values[0, 0] == 39  # input untouched


def test_resizer_rounds_sizes_and_maps_keypoints_back(tiny_model):
    wrapper = PatchSizeResizer(tiny_model)
    images = torch.randn(1, 3, 300, 400)  # -> 294 x 406
    with torch.inference_mode():
        descriptors = wrapper(images)
        features = wrapper.extract(images)
        resized = wrapper.resize(images)
        direct = tiny_model.extract(resized)
    assert resized.shape[-2:] == (294, 406)
    assert torch.equal(descriptors, direct.global_descriptors)
    scale = torch.tensor([400 / 406, 300 / 294])
    torch.testing.assert_close(features.keypoints[0], direct.keypoints[0] * scale)


def test_unknown_backbone_is_rejected():
    with pytest.raises(ValueError, match="unknown backbone 'vits'"):
        FoLModel("vits")


def test_trainable_blocks_default_fits_the_depth():
    model = FoLModel(TINY_VIT)
    assert model.backbone.num_trainable_blocks == 2
    with pytest.raises(ValueError, match="num_trainable_blocks=3"):
        FoLModel(TINY_VIT, num_trainable_blocks=3)


def test_frozen_blocks_get_no_gradient():
    model = FoLModel(TINY_VIT, num_trainable_blocks=1)
    model(torch.randn(1, 3, 126, 126)).sum().backward()
    vit = model.backbone.model
    assert vit.blocks[0].attn.qkv.weight.grad is None and vit.patch_embed.proj.weight.grad is None
    assert vit.blocks[1].attn.qkv.weight.grad is not None
    assert model.aggregator.score[0].weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(tiny_model):
    images = torch.randn(2, 3, 224, 252)
    cpu = extract(tiny_model, images)
    cuda = extract(tiny_model.cuda(), images.cuda())
    torch.testing.assert_close(cuda.global_descriptors.cpu(), cpu.global_descriptors, atol=1e-4, rtol=0)
    assert [len(d) for d in cuda.local_descriptors] == [len(d) for d in cpu.local_descriptors]
    assert cuda.keypoints[0].device.type == "cuda"


@pytest.mark.parametrize(("size", "length"), [(126, 33**2), (168, 45**2)])
def test_test_forward_pads_local_features_as_the_original(tiny_model, size, length):
    """``model(x, test=True)``: the global descriptors of ``model(x)`` and the selected local
    descriptors zero-padded to the original's length for the local grid's height (33 rows:
    33 x 33), or to the longest where that is longer (45 rows: every one of the 144 patches is
    selected, 2,025 cells, past the original's 1,000, where it raises)."""
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features, local = tiny_model(images, test=True)
        extracted = tiny_model.extract(images)
    assert torch.equal(features, tiny_model(images))
    assert local.shape == (2, length, 128)
    for padded, descriptors in zip(local, extracted.local_descriptors):
        assert torch.equal(padded[: len(descriptors)], descriptors) and not padded[len(descriptors) :].any()


def test_original_padded_lengths():
    assert [original_padded_length(h) for h in (33, 40, 41, 70, 71, 80, 81, 141)] == [1089, 1600, 1000, 1000, 3500, 3500, 3600, 3600]


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(0, 3, 126, 126), "empty batch"),
        (torch.zeros(1, 3, 126, 126, dtype=torch.uint8), r"float images.*not torch\.uint8.*preprocess"),
        (torch.zeros(1, 3, 126, 126, dtype=torch.float16), r"float16 but the model's weights are torch\.float32"),
    ],
)
def test_model_input_errors_name_the_fix(tiny_model, images, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tiny_model(images)
