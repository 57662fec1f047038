"""One matcher interface over FoL's own matching and kornia's descriptor matchers.

``match(features0, features1, method)`` -> :class:`Matches`:

- ``fol``: FoL's thresholded mutual nearest neighbours (its count is FoL's re-ranking score);
- ``nn``, ``mnn``, ``snn``, ``smnn``: ``kornia.feature.DescriptorMatcher``;
- ``fginn``, ``adalam``: ``kornia.feature.GeometryAwareDescriptorMatcher``, on the keypoints' LAFs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from kornia.feature import DescriptorMatcher, GeometryAwareDescriptorMatcher

from ..options import DESCRIPTOR_MATCHERS, MATCHERS
from ..rerank.mutual import MATCH_THRESHOLD, mutual_matches
from .features import LocalFeatures

# kornia's default ratio-test thresholds; nn and mnn take none.
DEFAULT_RATIO = {"nn": 1.0, "mnn": 1.0, "snn": 0.8, "smnn": 0.95}


@dataclass
class Matches:
    """Matched pairs between two images.

    Attributes:
        indices: [K, 2] int64, (index in features0, index in features1).
        distances: [K] float32, lower is better: the descriptors' L2 distance (``fol``, ``nn``,
            ``mnn``) or kornia's ratio (``snn``, ``smnn``, ``fginn``, ``adalam``).
    """

    indices: torch.Tensor
    distances: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)


def match(
    features0: LocalFeatures,
    features1: LocalFeatures,
    method: str = "fol",
    threshold: float | None = None,
    params: dict | None = None,
) -> Matches:
    """Match two images' local features.

    Args:
        method: one of :data:`MATCHERS`.
        threshold: ``fol``: the cosine a match must exceed (default 0.7); ``snn``/``smnn``: the
            ratio (kornia's defaults 0.8 / 0.95); unused otherwise.
        params: ``fginn`` / ``adalam`` parameters, as kornia takes them.
    """
    if method not in MATCHERS:
        raise ValueError(f"matcher {method!r}; choose one of {MATCHERS}")
    d0, d1 = features0.descriptors.float(), features1.descriptors.float()
    if len(d0) == 0 or len(d1) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=d0.device)
        return Matches(torch.stack([empty, empty], dim=1), torch.zeros(0, device=d0.device))
    if method == "fol":
        index0, index1 = mutual_matches(d0, d1, MATCH_THRESHOLD if threshold is None else threshold)
        cosine = (d0[index0] * d1[index1]).sum(dim=-1)
        return Matches(torch.stack([index0, index1], dim=1), (2 - 2 * cosine).clamp(min=0).sqrt())
    if method in DESCRIPTOR_MATCHERS:
        ratio = DEFAULT_RATIO[method] if threshold is None else threshold
        distances, indices = DescriptorMatcher(method, ratio)(d0, d1)
    else:
        matcher = GeometryAwareDescriptorMatcher(method, params)
        distances, indices = matcher(d0, d1, features0.lafs().to(d0), features1.lafs().to(d1))
    return Matches(indices.long(), distances.reshape(-1).float())
