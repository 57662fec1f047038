"""FoL aggregator: SALAD-style optimal transport guided by the backbone's region cue.

Implements docs/METHOD.md section 3: the global descriptor and the patch-level selection score.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .batching import per_image

NUM_CLUSTERS = 64
CLUSTER_DIM = 128
TOKEN_DIM = 256
HIDDEN_DIM = 512
DROPOUT = 0.3
SINKHORN_ITERATIONS = 3
MASK_GUIDE_THRESHOLD = 0.01
NUM_CLIPPED = 3  # the largest values replaced by the value at CLIP_QUANTILE
CLIP_QUANTILE = 0.05
GLOBAL_DIM = TOKEN_DIM + NUM_CLUSTERS * CLUSTER_DIM  # 8448
MIN_PATCHES = NUM_CLUSTERS + 1  # the dustbin mass log(N - 64) needs N > 64


@dataclass
class AggregatorOutput:
    """Aggregator output for B images of N patches."""

    global_descriptor: torch.Tensor  # [B, 8448], L2-normalised
    assignment: torch.Tensor  # [B, 64, N], optimal-transport assignment P (dustbin dropped)
    selection_score: torch.Tensor  # [B, N], softmax(clip(mean_k P)), the test-time region score
    mask_guide: torch.Tensor  # [B, N], region cue where >= 0.01, else 0


def log_optimal_transport(scores: torch.Tensor, dustbin: torch.Tensor, iterations: int) -> torch.Tensor:
    """Log-domain Sinkhorn with one dustbin row.

    Args:
        scores: [B, m, n] cluster scores, n > m.
        dustbin: [B, n] score of the dustbin row.
        iterations: Sinkhorn iterations, starting from zero potentials.

    Returns:
        [B, m + 1, n] log-assignment, scaled by m + n.
    """
    b, m, n = scores.shape
    one = scores.new_tensor(1)
    ms, ns, bs = (m * one).to(scores), (n * one).to(scores), ((n - m) * one).to(scores)
    couplings = torch.cat([scores, dustbin.unsqueeze(1)], dim=1)
    norm = -(ms + ns).log()
    log_mu = torch.cat([norm.expand(m), bs.log()[None] + norm])[None].expand(b, -1)
    log_nu = norm.expand(n)[None].expand(b, -1)
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iterations):
        u = log_mu - torch.logsumexp(couplings + v.unsqueeze(1), dim=2)
        v = log_nu - torch.logsumexp(couplings + u.unsqueeze(2), dim=1)
    return couplings + u.unsqueeze(2) + v.unsqueeze(1) - norm


def clip_top_values(values: torch.Tensor) -> torch.Tensor:
    """FoL's "clip": the 3 largest values of each row become the row's value at rank int(0.05 N).

    Args:
        values: [B, N].

    Returns:
        [B, N], a new tensor.
    """
    _, top_indices = torch.topk(values, NUM_CLIPPED, dim=1, largest=True, sorted=False)
    sorted_values, _ = values.sort(dim=1, descending=True)
    rank = int(CLIP_QUANTILE * values.shape[1])
    replacement = sorted_values[:, rank : rank + 1].expand(-1, NUM_CLIPPED)
    return values.scatter(1, top_indices, replacement)


class FoLAggregator(nn.Module):
    """Mask-guided optimal-transport aggregation of a ViT feature map.

    Args:
        num_channels: channels C of the backbone feature map.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.token_features = nn.Sequential(
            nn.Linear(num_channels, HIDDEN_DIM), nn.ReLU(), nn.Linear(HIDDEN_DIM, TOKEN_DIM)
        )
        self.cluster_features = nn.Sequential(
            nn.Conv2d(num_channels, HIDDEN_DIM, 1), nn.Dropout(DROPOUT), nn.ReLU(), nn.Conv2d(HIDDEN_DIM, CLUSTER_DIM, 1)
        )
        self.score = nn.Sequential(
            nn.Conv2d(num_channels, HIDDEN_DIM, 1), nn.Dropout(DROPOUT), nn.ReLU(), nn.Conv2d(HIDDEN_DIM, NUM_CLUSTERS, 1)
        )

    def forward(self, feature_map: torch.Tensor, class_token: torch.Tensor, region_cue: torch.Tensor) -> AggregatorOutput:
        """Aggregate B feature maps of N = h*w > 64 patches.

        The class token's layers run on one image at a time: a [B, C] matrix product rounds
        differently for B = 1 (a matrix-vector kernel) than for B > 1, and results must not
        depend on what else is in the batch.

        Args:
            feature_map: [B, C, h, w].
            class_token: [B, C].
            region_cue: [B, N], the backbone's class-to-patch attention.
        """
        mask_guide = torch.where(region_cue >= MASK_GUIDE_THRESHOLD, region_cue, torch.zeros_like(region_cue))
        local = self.cluster_features(feature_map).flatten(2)  # [B, 128, N]
        scores = self.score(feature_map).flatten(2)  # [B, 64, N]
        token = per_image(self.token_features, class_token)  # [B, 256], per image (see the docstring)
        assignment = log_optimal_transport(scores, 1 - mask_guide, SINKHORN_ITERATIONS).exp()[:, :-1]
        selection_score = clip_top_values(assignment.mean(dim=1)).softmax(dim=-1)
        clusters = F.normalize(local @ assignment.transpose(1, 2), p=2, dim=1)  # [B, 128, 64]
        descriptor = torch.cat([F.normalize(token, p=2, dim=-1), clusters.flatten(1)], dim=-1)
        return AggregatorOutput(
            global_descriptor=F.normalize(descriptor, p=2, dim=-1),
            assignment=assignment,
            selection_score=selection_score,
            mask_guide=mask_guide,
        )
