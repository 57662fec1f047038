"""FoL's training losses against hand computations on tiny tensors, and where their gradients go."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fol_plugin.models import FoLModel
from fol_plugin.train import (
    contrast_loss,
    fol_loss,
    local_similarity,
    local_triplet_loss,
    multi_similarity_loss,
    pseudo_correspondences,
    spatial_alignment_loss,
)
from fol_plugin.train.losses import patch_centre_descriptors

from .conftest import TINY_VIT


def test_multi_similarity_loss_by_hand():
    """Two places of two images in 2-D: the miner keeps every pair here, and the loss is the
    Multi-Similarity formula averaged over the anchors."""
    angles = torch.tensor([0.0, 0.3, 1.2, 1.6])
    descriptors = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    similarity = descriptors @ descriptors.T
    expected = 0.0
    for i in range(4):
        positive = [similarity[i, j] for j in range(4) if j != i and labels[j] == labels[i]]
        negative = [similarity[i, j] for j in range(4) if labels[j] != labels[i]]
        # Mining (epsilon 0.1): negatives above min(positive) - 0.1, positives below max(negative) + 0.1.
        negative = [s for s in negative if s > min(positive) - 0.1]
        positive = [s for s in positive if s < max(negative, default=-math.inf) + 0.1]
        if positive:
            expected += math.log1p(sum(math.exp(-1.0 * (s - 0)) for s in positive)) / 1.0
        if negative:
            expected += math.log1p(sum(math.exp(50.0 * (s - 0)) for s in negative)) / 50.0
    assert multi_similarity_loss(descriptors, labels).item() == pytest.approx(expected / 4, rel=1e-5)


def test_spatial_alignment_loss_by_hand_and_its_gradients():
    confidence = torch.tensor([[0.2, 0.3, 0.5]], requires_grad=True)
    importance = torch.tensor([[0.1, 0.6, 0.3]], requires_grad=True)
    to_importance, to_confidence = spatial_alignment_loss(confidence, importance)
    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q))  # noqa: E731
    assert to_importance.item() == pytest.approx(kl([0.1, 0.6, 0.3], [0.2, 0.3, 0.5]))
    assert to_confidence.item() == pytest.approx(kl([0.2, 0.3, 0.5], [0.1, 0.6, 0.3]))
    to_importance.backward(retain_graph=True)
    assert confidence.grad is not None and importance.grad is None  # one side detached
    confidence.grad = None
    to_confidence.backward()
    assert importance.grad is not None and confidence.grad is None


def test_contrast_loss_by_hand_and_only_the_selection_learns():
    """One place of two images on a 1 x 1 patch grid spread over a 2 x 2 local grid: the
    bilinear resize with align_corners=True gives the selection value at every cell."""
    local = F.normalize(torch.tensor([
        [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, -1.0]]],
        [[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]],
    ]), dim=-1).requires_grad_()  # [2, 2, 2, 2]: B, H', W', D
    selection = torch.tensor([[0.8], [0.3]], requires_grad=True)
    loss = contrast_loss(local, selection, (1, 1), torch.tensor([5, 5]))
    sums = local.detach().sum(dim=(1, 2))
    foreground = F.normalize(selection.detach() * sums, dim=-1)
    background = F.normalize((1 - selection.detach()) * sums, dim=-1)
    cos = lambda a, b: float((a * b).sum())  # noqa: E731
    expected = 0.7 * (1 - cos(foreground[0], foreground[1])) + 0.3 * (1 - cos(background[0], background[1]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)  # both images see the same pair
    loss.backward()
    assert local.grad is None and selection.grad is not None


def test_contrast_loss_with_a_varying_mask():
    """A 2 x 2 patch grid on a 3 x 3 local grid: the mask is the bilinear (align_corners=True)
    resize of the selection, checked against an explicit weighted sum."""
    generator = torch.Generator().manual_seed(0)
    local = F.normalize(torch.randn(2, 3, 3, 4, generator=generator), dim=-1)
    selection = torch.rand(2, 4, generator=generator)
    loss = contrast_loss(local, selection, (2, 2), torch.tensor([1, 1]))
    corners = selection.view(2, 2, 2)
    mask = torch.zeros(2, 3, 3)
    for u in range(3):
        for v in range(3):
            y, x = u / 2, v / 2  # align_corners=True: output cell u sits at input position u * (2 - 1) / (3 - 1)
            y0, x0 = min(int(y), 0), min(int(x), 0)
            wy, wx = y - y0, x - x0
            mask[:, u, v] = ((1 - wy) * (1 - wx) * corners[:, 0, 0] + (1 - wy) * wx * corners[:, 0, 1]
                             + wy * (1 - wx) * corners[:, 1, 0] + wy * wx * corners[:, 1, 1])
    fg = F.normalize((mask[..., None] * local).sum(dim=(1, 2)), dim=-1)
    bg = F.normalize(((1 - mask)[..., None] * local).sum(dim=(1, 2)), dim=-1)
    expected = 0.7 * (1 - (fg[0] * fg[1]).sum()) + 0.3 * (1 - (bg[0] * bg[1]).sum())
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_local_similarity_and_triplet_hinge():
    eye = torch.eye(4)
    near = F.normalize(eye + 0.3 * torch.roll(eye, 1, dims=1), dim=-1)  # cosine 0.958 with eye
    far = F.normalize(eye + 0.9 * torch.roll(eye, 1, dims=1), dim=-1)  # cosine 0.743
    assert local_similarity(eye, near).item() == pytest.approx(1 / math.sqrt(1.09), rel=1e-6)
    assert local_similarity(eye, -eye) is None  # no counted match
    # Globals: images 0, 1 (place 0) and 2, 3 (place 1). Batch-hard triplets (anchor, hardest
    # positive, hardest negative): (0, 1, 2), (1, 0, 2), (2, 3, 0), (3, 2, 1).
    globals_ = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.9, 0.1], [-1.0, 0.2]]), dim=-1)
    labels = torch.tensor([0, 0, 1, 1])
    locals_ = [eye.clone().requires_grad_(), far, near, -eye]
    loss = local_triplet_loss(globals_, locals_, labels)
    eye_near, eye_far = 1 / math.sqrt(1.09), 1 / math.sqrt(1.81)
    far_near = 1.27 / math.sqrt(1.81 * 1.09)
    # hinges: s(0,2) - s(0,1), s(1,2) - s(1,0); (2, 3, 0) has no anchor-positive match: no term;
    # s(3,1) - s(3,2) with neither matched: no term.
    expected = (eye_near - eye_far) + (far_near - eye_far)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert locals_[0].grad is not None


def test_a_triplet_without_a_positive_match_gives_no_loss_and_no_gradient():
    eye = torch.eye(4)
    near = F.normalize(eye + 0.3 * torch.roll(eye, 1, dims=1), dim=-1)
    # Images 0, 1 (place 0) and 2, 3 (place 1); every anchor's positive is its place's other image.
    globals_ = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.9, 0.1], [0.7, 0.7]]), dim=-1)
    labels = torch.tensor([0, 0, 1, 1])
    locals_ = [eye.clone().requires_grad_(), (-eye).requires_grad_(), near.clone().requires_grad_(), (-near).requires_grad_()]
    loss = local_triplet_loss(globals_, locals_, labels)  # no anchor shares a match with its positive
    assert loss.item() == 0.0 and not loss.requires_grad  # nothing to back-propagate, and no NaN
    # Beside a triplet that has a match, the unmatched one adds nothing to the loss or the gradients.
    mixed = [eye.clone().requires_grad_(), near.clone().requires_grad_(), locals_[2], locals_[3]]
    loss = local_triplet_loss(globals_, mixed, labels)
    loss.backward()
    assert torch.isfinite(loss) and locals_[3].grad is None


def test_pseudo_correspondences_follow_the_rules():
    """Four patches in i and j, two clusters: anchors are patches with g > 0.1; candidates in j
    share the anchor's cluster; the best token similarity must exceed 0.8 and be twice the second."""
    tokens_i = F.normalize(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]), dim=0)
    tokens_j = F.normalize(torch.tensor([[0.95, 0.1, 0.0, 0.0], [0.0, 0.9, 0.0, 0.0], [0.3, 0.0, 1.0, 0.3]]), dim=0)
    assignment_i = torch.tensor([[0.9, 0.0, 0.9, 0.9], [0.0, 0.9, 0.0, 0.0]])
    assignment_j = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 0.5, 0.0, 0.5]])
    guide_i = torch.tensor([0.5, 0.5, 0.05, 0.5])
    anchors, matches, similarity = pseudo_correspondences(tokens_i, tokens_j, assignment_i, assignment_j, guide_i)
    # Anchor 0 (cluster 0): candidates 0, 2 of j; cos 0.954 vs 0 -> accepted, match 0.
    # Anchor 1 (cluster 1): candidates 1, 3; cos 0.994 vs 0 -> accepted, match 1.
    # Anchor 2 has g = 0.05. Anchor 3 (cluster 0): cos 0.887 vs 0.707, ratio 1.25 < 2 -> rejected.
    similarity_matrix = tokens_i.T @ tokens_j
    assert anchors.tolist() == [0, 1] and matches.tolist() == [0, 1]
    assert torch.allclose(similarity, similarity_matrix[[0, 1], [0, 1]])
    limited = pseudo_correspondences(tokens_i, tokens_j, assignment_i, assignment_j, guide_i, max_pairs=1)
    assert limited[0].tolist() == [0]
    # A single candidate leaves -10 as the second best: the ratio test rejects it, as in the original.
    only_one = assignment_j.clone()
    only_one[0, 2] = 0.0
    assert pseudo_correspondences(tokens_i, tokens_j, assignment_i, only_one, guide_i)[0].tolist() == [1]


def test_patch_centre_descriptors():
    dense = torch.arange(5 * 5 * 1, dtype=torch.float32).view(5, 5, 1)  # 2 x 2 patches -> 5 x 5 cells
    centres = patch_centre_descriptors(dense, torch.tensor([0, 3]), grid_width=2)
    assert centres[0].item() == pytest.approx(dense[:2, :2].mean().item())  # cell (0, 0): a corner
    assert centres[1].item() == pytest.approx(dense[3:, 3:].mean().item())  # cell (4, 4)


def test_training_forward_and_total_loss_backward():
    torch.manual_seed(0)
    model = FoLModel(TINY_VIT).train()
    outputs = model.forward_train(torch.randn(4, 3, 126, 126))
    assert torch.allclose(outputs.selection.sum(dim=1), torch.full((4,), 2.0))
    assert outputs.tokens.shape == (4, TINY_VIT.embed_dim, 81) and outputs.dense_local.shape == (4, 33, 33, 128)
    assert [len(d) for d in outputs.local_descriptors] == [33 * 33] * 4  # 81 patches < 225: all selected
    parts = fol_loss(outputs, torch.tensor([0, 0, 1, 1]), generator=torch.Generator().manual_seed(0))
    assert set(parts) == {"total", "global_ms", "alignment", "contrast", "local_triplet", "pseudo_correspondence"}
    assert parts["total"].item() == pytest.approx(sum(v.item() for k, v in parts.items() if k != "total"))
    parts["total"].backward()
    assert model.aggregator.score[0].weight.grad is not None and model.upconv.weight.grad is not None
