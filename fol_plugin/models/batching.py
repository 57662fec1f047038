"""Products that must not depend on the rest of the batch.

A [B, C] matrix product rounds differently for B = 1 (a matrix-vector kernel) than for B > 1, so
the few layers whose result FoL's parity depends on run one image at a time. While ``torch.export``
traces the model (``fol-vpr export`` to ONNX) they run on the whole batch at once instead, so the
exported graph takes any batch size; the two differ by float32 rounding only (:mod:`fol_plugin.export`, measured by its tests).
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def _exporting() -> bool:
    """Whether torch.export is tracing (``torch.compiler.is_exporting``, from torch 2.6 on)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def per_image(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``function`` of each image of ``x`` [B, ...] on its own, concatenated: [B, ...]."""
    if _exporting():
        return function(x)
    return torch.cat([function(one) for one in x.split(1)])
