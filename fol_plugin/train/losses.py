"""FoL's training losses (docs/METHOD.md section 6), computed from :class:`~fol_plugin.models.fol.TrainingOutputs`.

A batch holds P places x K images; ``labels`` [B] gives each image's place. Every loss returns a
scalar tensor. :func:`fol_loss` combines them with the paper's weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity

from ..models.fol import TrainingOutputs
from ..rerank.mutual import MATCH_THRESHOLD, mutual_matches
from ..config import LossWeights

MS_ALPHA, MS_BETA, MS_BASE = 1.0, 50.0, 0.0
MINER_EPSILON = 0.1
FOREGROUND_WEIGHT = 0.7
ANCHOR_GUIDE_THRESHOLD = 0.1  # g above this makes a patch a pseudo-correspondence anchor
CANDIDATE_ASSIGNMENT_THRESHOLD = 0.1  # P above this makes a patch of the other image a candidate
MIN_TOKEN_SIMILARITY = 0.8
MIN_SIMILARITY_RATIO = 2.0  # best / second-best token similarity
MAX_PAIRS_PER_IMAGE = 5
PSEUDO_SCALE = 1e-2
MASKED_SIMILARITY = -10.0  # the original's value for non-candidates (it enters the ratio test)
LOCAL_CELLS_PER_PATCH_SIDE = 4  # patch (r, c) is centred on local-grid cell (4r, 4c)


def multi_similarity_loss(descriptors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Global loss: pytorch-metric-learning's Multi-Similarity loss (alpha 1, beta 50, base 0,
    dot-product similarity) on the pairs its Multi-Similarity miner picks (epsilon 0.1, cosine).

    Args:
        descriptors: [B, D] L2-normalised global descriptors.
        labels: [B] place ids.
    """
    miner = miners.MultiSimilarityMiner(epsilon=MINER_EPSILON, distance=CosineSimilarity())
    loss = losses.MultiSimilarityLoss(alpha=MS_ALPHA, beta=MS_BETA, base=MS_BASE, distance=DotProductSimilarity())
    return loss(descriptors, labels, miner(descriptors, labels))


def spatial_alignment_loss(confidence: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAL: the two directions of the KL divergence between Ma (``confidence``) and Me
    (``importance``), each with its target detached, as the original computes them with
    ``KLDivLoss(input=log(x), target=y.detach())``:

        to_importance = mean_b sum_n Me (log Me - log Ma),   gradient to Ma only;
        to_confidence = mean_b sum_n Ma (log Ma - log Me),   gradient to Me only.

    Args:
        confidence, importance: [B, N], each row a softmax.

    Returns:
        (to_importance, to_confidence); FoL weights each 5e-3.
    """
    to_importance = F.kl_div(confidence.log(), importance.detach(), reduction="none").sum(-1).mean()
    to_confidence = F.kl_div(importance.log(), confidence.detach(), reduction="none").sum(-1).mean()
    return to_importance, to_confidence


def _other_image_of_place(labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """For each image, a random other image of its place [B] (itself when it is alone)."""
    partners = torch.arange(len(labels))
    for label in labels.unique():
        members = torch.nonzero(labels == label).squeeze(1).cpu()
        if len(members) < 2:
            continue
        offsets = torch.randint(1, len(members), (len(members),), generator=generator)
        partners[members] = members[(torch.arange(len(members)) + offsets) % len(members)]
    return partners


def _next_image_of_place(labels: torch.Tensor) -> torch.Tensor:
    """For each image, the next image of its place in batch order, cyclically [B]."""
    partners = torch.arange(len(labels))
    for label in labels.unique():
        members = torch.nonzero(labels == label).squeeze(1).cpu()
        partners[members] = members.roll(-1)
    return partners


def contrast_loss(
    dense_local: torch.Tensor,
    selection: torch.Tensor,
    grid: tuple[int, int],
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """CEL, the foreground-background contrast loss. With M the selection score resized to the
    local grid (bilinear, align_corners=True) and L the DETACHED dense local map,

        fg = normalise(sum_cells M L),  bg = normalise(sum_cells (1 - M) L),
        loss = mean_i 0.7 (1 - cos(fg_i, fg_j)) + 0.3 (1 - cos(bg_i, bg_j)),

    j a random other image of i's place. Only M receives gradient.

    Args:
        dense_local: [B, H', W', 128] L2-normalised dense local map.
        selection: [B, N] training selection score Ma + Me, N = h * w.
        grid: (h, w).
        labels: [B] place ids.
        generator: draws the partners (the original uses Python's ``random``).
    """
    height, width = dense_local.shape[1:3]
    mask = F.interpolate(
        selection.view(-1, 1, *grid), size=(height, width), mode="bilinear", align_corners=True
    ).squeeze(1)  # [B, H', W']
    local = dense_local.detach()
    foreground = F.normalize(torch.einsum("bhw,bhwd->bd", mask, local), p=2, dim=-1)
    background = F.normalize(torch.einsum("bhw,bhwd->bd", 1 - mask, local), p=2, dim=-1)
    partners = _other_image_of_place(labels, generator).to(dense_local.device)
    foreground_similarity = (foreground * foreground[partners]).sum(-1)
    background_similarity = (background * background[partners]).sum(-1)
    loss = FOREGROUND_WEIGHT * (1 - foreground_similarity) + (1 - FOREGROUND_WEIGHT) * (1 - background_similarity)
    return loss.mean()


def local_similarity(
    query: torch.Tensor, candidate: torch.Tensor, threshold: float = MATCH_THRESHOLD
) -> torch.Tensor | None:
    """Mean cosine of FoL's counted mutual matches (docs/METHOD.md section 5); None without a match
    (the original's mean over no match is NaN)."""
    query_index, candidate_index = mutual_matches(query.detach(), candidate.detach(), threshold)
    if len(query_index) == 0:
        return None
    return (query[query_index] * candidate[candidate_index]).sum(-1).mean()


def local_triplet_loss(
    global_descriptors: torch.Tensor, local_descriptors: list[torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """Local triplet loss: batch-hard triplets (a, p, n) mined on the global descriptors
    (pytorch-metric-learning's ``BatchHardMiner``), then

        loss = sum over triplets max(0, s(a, n) - s(a, p)),  s = :func:`local_similarity`.

    The matches are found without gradient; the similarity of the matched descriptors carries it.
    A triplet whose anchor and positive share no counted match contributes no loss and no
    gradient, as in the original (whose similarity is then NaN and its gradient zero); a negative
    without a match has similarity 0.

    Args:
        global_descriptors: [B, D].
        local_descriptors: B tensors [N_i, 128], L2-normalised.
        labels: [B].
    """
    anchors, positives, negatives = miners.BatchHardMiner()(global_descriptors.detach(), labels)
    total = global_descriptors.new_zeros(())
    for a, p, n in zip(anchors.tolist(), positives.tolist(), negatives.tolist()):
        positive = local_similarity(local_descriptors[a], local_descriptors[p])
        if positive is None:
            continue
        negative = local_similarity(local_descriptors[a], local_descriptors[n])
        total = total + ((0.0 if negative is None else negative) - positive).clamp(min=0)
    return total


def pseudo_correspondences(
    tokens_i: torch.Tensor, tokens_j: torch.Tensor, assignment_i: torch.Tensor, assignment_j: torch.Tensor,
    guide_i: torch.Tensor, max_pairs: int = MAX_PAIRS_PER_IMAGE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patch pairs (anchor in i, match in j) found without labels, as docs/METHOD.md section 6.

    Anchors: patches with g > 0.1. Each anchor's cluster k = argmax_k P_i[k, anchor]; candidates:
    patches of j with P_j[k, patch] > 0.1; similarity: cosine of the L2-normalised backbone
    tokens (-10 for non-candidates, as the original). Accepted when the best similarity is above
    0.8 and best / second-best above 2; the first ``max_pairs`` in anchor order. (The original
    also skips the first anchor; this does not.)

    Args:
        tokens_i, tokens_j: [C, N] L2-normalised.
        assignment_i, assignment_j: [64, N].
        guide_i: [N] mask guide g of image i.

    Returns:
        anchor patches [K], matched patches [K], token similarities [K] (detached).
    """
    with torch.no_grad():
        anchors = torch.nonzero(guide_i > ANCHOR_GUIDE_THRESHOLD).squeeze(1)
        empty = anchors.new_zeros(0)
        if len(anchors) == 0 or tokens_j.shape[1] < 2:
            return empty, empty, tokens_i.new_zeros(0)
        clusters = assignment_i[:, anchors].argmax(dim=0)
        candidates = assignment_j[clusters] > CANDIDATE_ASSIGNMENT_THRESHOLD  # [A, N]
        similarity = tokens_i[:, anchors].T @ tokens_j  # [A, N]
        similarity = torch.where(candidates, similarity, torch.full_like(similarity, MASKED_SIMILARITY))
        top, index = similarity.topk(2, dim=1)
        accepted = (top[:, 0] > MIN_TOKEN_SIMILARITY) & (top[:, 0] / top[:, 1] > MIN_SIMILARITY_RATIO)
        return anchors[accepted][:max_pairs], index[accepted, 0][:max_pairs], top[accepted, 0][:max_pairs]


def patch_centre_descriptors(dense_local: torch.Tensor, patches: torch.Tensor, grid_width: int) -> torch.Tensor:
    """3x3-averaged local descriptors at patch centres (cell (4r, 4c) for patch (r, c); the
    average covers the cells inside the grid).

    Args:
        dense_local: [H', W', 128].
        patches: [K] patch indices, raster order of the h x w patch grid.

    Returns:
        [K, 128].
    """
    averaged = F.avg_pool2d(
        dense_local.permute(2, 0, 1)[None], kernel_size=3, stride=1, padding=1, count_include_pad=False
    )[0]  # [128, H', W']
    rows = torch.div(patches, grid_width, rounding_mode="floor") * LOCAL_CELLS_PER_PATCH_SIDE
    cols = patches % grid_width * LOCAL_CELLS_PER_PATCH_SIDE
    return averaged[:, rows, cols].T


def pseudo_correspondence_loss(outputs: TrainingOutputs, labels: torch.Tensor) -> torch.Tensor:
    """Weakly supervised local loss: for image i and the next image j of its place, the pairs of
    :func:`pseudo_correspondences`, and

        loss = (sum over images 1e-2 sum_pairs sim (1 - cos(L_a, L_p))) / number of pairs,

    L_a, L_p the 3x3-averaged local descriptors at the two patch centres
    (:func:`patch_centre_descriptors`: the exact patch centre on the local grid, where the
    original rounds with a 322-pixel input hard-coded). 0 without a pair.
    """
    partners = _next_image_of_place(labels)
    grid_width = outputs.grid[1]
    total, pairs = outputs.dense_local.new_zeros(()), 0
    for i, j in enumerate(partners.tolist()):
        if i == j:
            continue
        anchors, matches, similarity = pseudo_correspondences(
            outputs.tokens[i], outputs.tokens[j], outputs.assignment[i], outputs.assignment[j], outputs.mask_guide[i]
        )
        if len(anchors) == 0:
            continue
        anchor_descriptors = patch_centre_descriptors(outputs.dense_local[i], anchors, grid_width)
        match_descriptors = patch_centre_descriptors(outputs.dense_local[j], matches, grid_width)
        cosine = F.cosine_similarity(anchor_descriptors, match_descriptors, dim=-1)
        total = total + PSEUDO_SCALE * (similarity * (1 - cosine)).sum()
        pairs += len(anchors)
    return total / pairs if pairs else total


def fol_loss(
    outputs: TrainingOutputs,
    labels: torch.Tensor,
    weights: LossWeights | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """FoL's total training loss and its weighted parts.

    Returns:
        {"total", "global_ms", "alignment", "contrast", "local_triplet", "pseudo_correspondence"}.
    """
    weights = weights or LossWeights()
    to_importance, to_confidence = spatial_alignment_loss(outputs.confidence, outputs.importance)
    parts = {
        "global_ms": weights.global_ms * multi_similarity_loss(outputs.global_descriptors, labels),
        "alignment": weights.alignment * (to_importance + to_confidence),
        "contrast": weights.contrast * contrast_loss(outputs.dense_local, outputs.selection, outputs.grid, labels, generator),
        "local_triplet": weights.local_triplet
        * local_triplet_loss(outputs.global_descriptors, outputs.local_descriptors, labels),
        "pseudo_correspondence": weights.pseudo_correspondence * pseudo_correspondence_loss(outputs, labels),
    }
    return {"total": sum(parts.values()), **parts}
