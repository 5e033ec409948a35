"""A small vision transformer: strided-conv patch embedding, learned position embedding,
pre-norm blocks, a class token (or mean pooling) and a linear head."""

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runner.errors import ConfigError
from runner.models.arguments import count, probability
from runner.models.cnn import image_channels

POOLS = ("cls", "mean")


class SelfAttention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention, which picks the
    flash or memory-efficient kernel on CUDA when the inputs allow it."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.dim={dim} is not divisible by model.heads={heads}; pick heads that divide dim, e.g. model.heads={math.gcd(dim, heads)}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        # [batch, tokens, 3 * dim] -> three [batch, heads, tokens, head_dim]
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x)))
        return x + self.mlp(self.mlp_norm(x))


class ViT(nn.Module):
    """Vision transformer for [C, H, W] images or [C, F, T] spectrograms; H and W (F and T)
    must be multiples of patch_size."""

    modalities = ("image", "spectrogram")

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        patch_size: int = 2,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        pool: str = "cls",
    ):
        super().__init__()
        channels = image_channels(input_shape, "vit")
        height, width = int(input_shape[1]), int(input_shape[2])
        patch_size = count(patch_size, "model.patch_size", "2", minimum=0)  # 0: _check_patch_size says which fit
        dim, heads = count(dim, "model.dim", "64"), count(heads, "model.heads", "4")
        depth = count(depth, "model.depth", "2", minimum=0)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ConfigError(f"model.mlp_ratio={mlp_ratio!r} is not a positive number; e.g. model.mlp_ratio=2.0")
        dropout = probability(dropout, "model.dropout")
        _check_patch_size(patch_size, height, width)
        if pool not in POOLS:
            raise ConfigError(f"model.pool='{pool}' is not supported; use one of {', '.join(POOLS)}")
        self.pool = pool
        # a conv whose stride equals its kernel is a linear map of each non-overlapping patch
        self.patch_embedding = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        tokens = (height // patch_size) * (width // patch_size) + (pool == "cls")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.position_embedding = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [batch, patches, dim]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = self.norm(self.blocks(self.dropout(x + self.position_embedding)))
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(dim=1))


def _check_patch_size(patch_size: int, height: int, width: int) -> None:
    if patch_size >= 1 and height % patch_size == 0 and width % patch_size == 0:
        return
    common = math.gcd(height, width)
    fits = [size for size in range(1, common + 1) if common % size == 0]
    below = [size for size in fits if size <= max(patch_size, 1)]
    raise ConfigError(
        f"model.patch_size={patch_size} does not divide the image size {height}x{width}; "
        f"use a patch size that divides both sides, e.g. model.patch_size={below[-1]} "
        f"(sizes that fit: {', '.join(map(str, fits))})"
    )
