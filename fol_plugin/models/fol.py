"""The FoL model: DINOv2 backbone -> FoL aggregator -> global descriptor + selected local features."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .aggregator import GLOBAL_DIM, MIN_PATCHES, AggregatorOutput, FoLAggregator, clip_top_values
from .backbone import PATCH_SIZE, VIT_CONFIGS, BackboneOutput, DINOv2Backbone, ViTConfig
from .local_features import LOCAL_DIM, UPCONV_DIM, gather_selected, make_upconv, pad_like_original, select_patches


@dataclass
class FoLFeatures:
    """Everything FoL computes for a batch of B images (h x w patches each)."""

    global_descriptors: torch.Tensor  # [B, 8448], L2-normalised
    local_descriptors: list[torch.Tensor]  # B x [N_i, 128], L2-normalised, raster order of the local grid
    keypoints: list[torch.Tensor]  # B x [N_i, 2], (x, y) in network-input pixels
    region_scores: torch.Tensor  # [B, h, w], the test-time selection score


@dataclass
class TrainingOutputs:
    """What FoL's training losses need (docs/METHOD.md section 6), for B images of N = h*w patches."""

    global_descriptors: torch.Tensor  # [B, 8448], L2-normalised
    confidence: torch.Tensor  # [B, N], softmax(clip(mean_k P)): Ma
    importance: torch.Tensor  # [B, N], softmax(clip(a)) of the backbone's region cue: Me
    assignment: torch.Tensor  # [B, 64, N], optimal-transport assignment P
    mask_guide: torch.Tensor  # [B, N], g
    tokens: torch.Tensor  # [B, C, N], backbone patch tokens, L2-normalised over C
    dense_local: torch.Tensor  # [B, H', W', 128], dense local map, L2-normalised
    local_descriptors: list[torch.Tensor]  # B x [N_i, 128], the 225 patches of largest Ma + Me
    grid: tuple[int, int]  # (h, w)

    @property
    def selection(self) -> torch.Tensor:
        """[B, N] training selection score Ma + Me."""
        return self.confidence + self.importance


def nearest_valid_sizes(size: int) -> tuple[int, int]:
    """The multiples of the patch size just below and just above ``size``."""
    below = max(PATCH_SIZE, size // PATCH_SIZE * PATCH_SIZE)
    return below, below + PATCH_SIZE


def check_images(images: torch.Tensor) -> tuple[int, int]:
    """Validate a [B, 3, H, W] batch and return its patch grid (h, w)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"FoL expects images of shape [B, 3, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("FoL got an empty batch [0, 3, H, W]: give at least one image")
    height, width = images.shape[-2:]
    for name, size in (("height", height), ("width", width)):
        if size <= 0:
            raise ValueError(f"image {name} {size} must be positive: a multiple of the patch size {PATCH_SIZE}, e.g. 322")
        if size % PATCH_SIZE:
            below, above = nearest_valid_sizes(size)
            raise ValueError(
                f"image {name} {size} is not a multiple of the patch size {PATCH_SIZE}; "
                f"resize to {below} or {above} (or use the model from get_trained_model(), which rounds sizes)"
            )
    h, w = height // PATCH_SIZE, width // PATCH_SIZE
    if h * w < MIN_PATCHES:
        raise ValueError(
            f"image size {height}x{width} gives {h * w} patches, but FoL's optimal transport needs more than "
            f"{MIN_PATCHES - 1} (for example 126x126 or larger)"
        )
    return h, w


class FoLModel(nn.Module):
    """FoL ("Focus on Local", AAAI 2025) for visual place recognition.

    State-dict keys match the published checkpoints (``backbone.model.*``, ``aggregator.*``,
    ``upconv``, ``upconv2``).

    Under ``torch.autocast`` (reduced-precision extraction) only the ViT runs in the autocast
    dtype: its outputs are cast to float32 and the aggregator (optimal transport, whose
    log-domain iterations lose too much in 8-bit mantissas) and the local head run in float32.

    Args:
        backbone: "vitb", "vitl", or a :class:`ViTConfig` (tests use tiny ones).
        num_trainable_blocks: last ViT blocks that receive gradients during fine-tuning
            (None: 4, or all blocks of a shallower ViT).
    """

    def __init__(self, backbone: str | ViTConfig = "vitl", num_trainable_blocks: int | None = None) -> None:
        super().__init__()
        if isinstance(backbone, str):
            if backbone not in VIT_CONFIGS:
                raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(VIT_CONFIGS)}")
            backbone = VIT_CONFIGS[backbone]
        self.config = backbone
        self.backbone = DINOv2Backbone(backbone, num_trainable_blocks=num_trainable_blocks)
        channels = backbone.embed_dim
        self.aggregator = FoLAggregator(channels)
        self.upconv = make_upconv(channels, UPCONV_DIM)
        self.upconv2 = make_upconv(UPCONV_DIM, LOCAL_DIM)

    @property
    def descriptor_dim(self) -> int:
        return GLOBAL_DIM

    def encode(self, images: torch.Tensor) -> tuple[BackboneOutput, AggregatorOutput]:
        """Backbone and aggregator outputs for [B, 3, H, W] ImageNet-normalised images."""
        check_images(images)
        self._check_dtype(images)
        tokens = self.backbone(images)
        if not torch.is_autocast_enabled(images.device.type):
            return tokens, self.aggregator(tokens.feature_map, tokens.class_token, tokens.region_cue)
        tokens = tokens.float()
        with torch.autocast(images.device.type, enabled=False):
            return tokens, self.aggregator(tokens.feature_map, tokens.class_token, tokens.region_cue)

    def _check_dtype(self, images: torch.Tensor) -> None:
        """Float images of the weights' dtype (any float dtype under autocast)."""
        if not images.is_floating_point():
            raise TypeError(
                f"FoL takes float images, ImageNet-normalised, not {images.dtype}: convert RGB in [0, 1] with "
                "fol_plugin.preprocess(images.float() / 255, size)"
            )
        weights = next(self.parameters()).dtype
        if images.dtype != weights and not torch.is_autocast_enabled(images.device.type):
            raise TypeError(
                f"images are {images.dtype} but the model's weights are {weights}: pass images.to({weights}) "
                f"or run the model under torch.autocast"
            )

    def dense_local_map(self, feature_map: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, 128, 4h - 3, 4w - 3], not normalised (float32 under autocast)."""
        with torch.autocast(feature_map.device.type, enabled=False):
            return self.upconv2(F.relu(self.upconv(feature_map.to(self.upconv.weight.dtype))))

    def forward(self, images: torch.Tensor, test: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Global descriptors: [B, 3, H, W] ImageNet-normalised -> [B, 8448] float32, L2-normalised.

        Args:
            test: the compatibility form of chenshunpeng/FoL's ``model(x, test=True)``, as its
                evaluation reads it (``outputs[0], outputs[1]``): the pair (global descriptors
                [B, 8448], equal to ``model(x)``; local descriptors [B, L, 128] zero-padded as the
                original pads them, :func:`~fol_plugin.models.local_features.pad_like_original`).
                New code should call :meth:`extract`, whose local features are not padded.
        """
        if not test:
            return self.encode(images)[1].global_descriptor.float()
        features = self.extract(images)
        return features.global_descriptors, pad_like_original(features.local_descriptors, check_images(images))

    def forward_train(self, images: torch.Tensor) -> TrainingOutputs:
        """The training forward: everything the losses of :mod:`fol_plugin.train.losses` use.

        Regions are selected by Ma + Me (the original's training selection) instead of Ma.
        """
        tokens, aggregated = self.encode(images)
        _, channels, h, w = tokens.feature_map.shape
        importance = clip_top_values(tokens.region_cue).softmax(dim=-1)
        dense = self.dense_local_map(tokens.feature_map)
        patch_mask = select_patches(aggregated.selection_score + importance, h, w)
        local_descriptors, _ = gather_selected(dense, patch_mask)
        return TrainingOutputs(
            global_descriptors=aggregated.global_descriptor,
            confidence=aggregated.selection_score,
            importance=importance,
            assignment=aggregated.assignment,
            mask_guide=aggregated.mask_guide,
            tokens=F.normalize(tokens.feature_map.flatten(2), p=2, dim=1),
            dense_local=F.normalize(dense.permute(0, 2, 3, 1), p=2, dim=-1),
            local_descriptors=local_descriptors,
            grid=(h, w),
        )

    def extract(self, images: torch.Tensor) -> FoLFeatures:
        """Global descriptors plus the selected local features used for re-ranking.

        Args:
            images: [B, 3, H, W] ImageNet-normalised, H and W multiples of 14, more than 64 patches.
        """
        tokens, aggregated = self.encode(images)
        return select_features(
            aggregated.global_descriptor, aggregated.selection_score, self.dense_local_map(tokens.feature_map)
        )

    def exportable(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What :meth:`extract` computes before its selection, as plain tensors (the ONNX graph's
        outputs, :mod:`fol_plugin.export`): global descriptors [B, 8448] float32, selection scores
        [B, h*w], the dense local map [B, 128, 4h - 3, 4w - 3]."""
        tokens, aggregated = self.encode(images)
        return aggregated.global_descriptor.float(), aggregated.selection_score, self.dense_local_map(tokens.feature_map)


def select_features(global_descriptors: torch.Tensor, selection_scores: torch.Tensor, dense: torch.Tensor) -> FoLFeatures:
    """FoL's test-time selection: the 225 best-scored patches' cells of the dense local map.

    Args:
        global_descriptors: [B, 8448].
        selection_scores: [B, h*w].
        dense: [B, 128, 4h - 3, 4w - 3] dense local map (not normalised).
    """
    h, w = ((size + 3) // 4 for size in dense.shape[-2:])  # the local grid is 4h - 3 cells high
    patch_mask = select_patches(selection_scores, h, w)
    descriptors, keypoints = gather_selected(dense, patch_mask)
    return FoLFeatures(
        global_descriptors=global_descriptors.float(),
        local_descriptors=[d.float() for d in descriptors],
        keypoints=keypoints,
        region_scores=selection_scores.view(-1, h, w),
    )
