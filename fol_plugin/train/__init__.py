"""Fine-tuning FoL: the paper's losses (the training forward is ``FoLModel.forward_train``)."""
from ..config import LossWeights
from .losses import (
    contrast_loss,
    fol_loss,
    local_similarity,
    local_triplet_loss,
    multi_similarity_loss,
    pseudo_correspondence_loss,
    pseudo_correspondences,
    spatial_alignment_loss,
)

__all__ = [
    "LossWeights",
    "contrast_loss",
    "fol_loss",
    "local_similarity",
    "local_triplet_loss",
    "multi_similarity_loss",
    "pseudo_correspondence_loss",
    "pseudo_correspondences",
    "spatial_alignment_loss",
]
