"""DINOv2 ViT/14 backbone, written to load the FoL checkpoints' ``backbone.model.*`` weights.

Besides the final tokens, the backbone returns FoL's region cue: the attention of the class
token to every patch in the last block, summed over heads (docs/METHOD.md section 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ViTConfig
from ..options import PATCH_SIZE
from .batching import per_image

POS_INTERPOLATE_OFFSET = 0.1  # DINOv2's offset for the bicubic position-embedding resize
LAYER_NORM_EPS = 1e-6
DEFAULT_TRAINABLE_BLOCKS = 4  # FoL fine-tunes the last 4 blocks


VIT_CONFIGS: dict[str, ViTConfig] = {
    "vitb": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vitl": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
}


@dataclass
class BackboneOutput:
    """Output of :class:`DINOv2Backbone` for a batch of B images with h x w patches."""

    feature_map: torch.Tensor  # [B, C, h, w], normalised patch tokens
    class_token: torch.Tensor  # [B, C], normalised class token
    region_cue: torch.Tensor  # [B, h*w], last-block class-to-patch attention summed over heads

    def float(self) -> BackboneOutput:
        """The same outputs in float32 (after a reduced-precision backbone)."""
        return BackboneOutput(self.feature_map.float(), self.class_token.float(), self.region_cue.float())


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, C] in raster order."""
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, C] -> q, k, v each [B, heads, T, head_dim]."""
        b, t, _ = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, T, C]."""
        b, t, c = x.shape
        q, k, v = self._split_heads(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))

    def class_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the class token (position 0): [B, T, C] -> [B, heads, T]."""
        q, k, _ = self._split_heads(x)
        logits = (q[:, :, :1] @ k.transpose(-2, -1)) * self.scale
        return logits.softmax(dim=-1)[:, :, 0]


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with layer scale."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, config.num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, config.mlp_hidden_dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, T, C]."""
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """DINOv2 ViT/14 without registers; parameter names follow the published checkpoints."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.pos_embed_grid**2 + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused at inference; kept for the checkpoints
        self.patch_embed = PatchEmbed(dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DINOv2's initialisation; nothing on the meta device, where weights come from a
        checkpoint (initialising there imports torch's compiler, which leaves a folder in /tmp)."""
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerScale):
                nn.init.constant_(module.gamma, 1e-5)

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an h x w patch grid: [1, 1 + h*w, C].

        The stored grid is used as is for the square grid it was trained at; otherwise its patch
        part is resized bicubically with DINOv2's scale factors, in float32.
        """
        grid = self.config.pos_embed_grid
        if h == w == grid:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos,
            mode="bicubic",
            antialias=False,
            scale_factor=((h + POS_INTERPOLATE_OFFSET) / grid, (w + POS_INTERPOLATE_OFFSET) / grid),
        )
        if patch_pos.shape[-2:] != (h, w):
            raise RuntimeError(f"position embeddings resized to {tuple(patch_pos.shape[-2:])}, expected {(h, w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat((class_pos, patch_pos), dim=1).to(self.pos_embed.dtype)

    def prepare_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 1 + N, C]: class token + patch tokens with position embeddings."""
        h, w = images.shape[-2] // PATCH_SIZE, images.shape[-1] // PATCH_SIZE
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.interpolate_pos_encoding(h, w)


class DINOv2Backbone(nn.Module):
    """The ViT plus FoL's read-out: normalised tokens and the last block's class attention.

    Args:
        config: ViT sizes (see :data:`VIT_CONFIGS`).
        num_trainable_blocks: the last blocks that receive gradients; earlier ones always run
            without autograd, as in FoL's training. None: FoL's 4, or all blocks of a shallower ViT.
    """

    def __init__(self, config: ViTConfig, num_trainable_blocks: int | None = None) -> None:
        super().__init__()
        if num_trainable_blocks is None:
            num_trainable_blocks = min(DEFAULT_TRAINABLE_BLOCKS, config.depth)
        if not 1 <= num_trainable_blocks <= config.depth:
            raise ValueError(f"num_trainable_blocks={num_trainable_blocks} must be between 1 and depth={config.depth}")
        self.model = VisionTransformer(config)
        self.num_trainable_blocks = num_trainable_blocks

    @property
    def num_channels(self) -> int:
        return self.model.config.embed_dim

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        """[B, 3, H, W] (H, W multiples of 14) -> :class:`BackboneOutput`."""
        b, _, height, width = images.shape
        h, w = height // PATCH_SIZE, width // PATCH_SIZE
        vit = self.model
        num_frozen = vit.config.depth - self.num_trainable_blocks
        with torch.set_grad_enabled(torch.is_grad_enabled() and num_frozen == 0):
            x = vit.prepare_tokens(images)
            for block in vit.blocks[:num_frozen]:
                x = block(x)
        for block in vit.blocks[num_frozen:-1]:
            x = block(x)
        last = vit.blocks[-1]
        # One image at a time, like the class token's layers: a batched [1, T] product rounds with the batch size.
        region_cue = per_image(last.attn.class_attention, last.norm1(x))[:, :, 1:].sum(dim=1)
        x = vit.norm(last(x))
        feature_map = x[:, 1:].reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return BackboneOutput(feature_map=feature_map, class_token=x[:, 0], region_cue=region_cue)
