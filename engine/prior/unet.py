"""A small fully convolutional U-Net for the 2D diffusion prior (own implementation).

The network F_theta(c_in * x; c_noise) of EDM (Karras et al. 2022, Eq. 7): input and output are
(batch, channels, H, W) float tensors (channels 2 = real, imag of a complex image); c_noise is a
(batch,) tensor embedded with sinusoidal positional features (as in DDPM / EDM's
``PositionalEmbedding``) and fed to every residual block. H and W must be divisible by
2 ** (len(channel_mult) - 1); there is no absolute position anywhere, so a network trained on
64x64 patches runs on 256x256 images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet` (stored verbatim in the prior's arch.json)."""

    in_channels: int = 2
    """Image channels (2: real and imaginary part)."""
    base_channels: int = 32
    """Channels of the first level; level i has base_channels * channel_mult[i]."""
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    """One entry per resolution level; len - 1 = number of 2x downsamplings."""
    num_res_blocks: int = 1
    """Residual blocks per level on the way down (the way up has one more, as in DDPM)."""
    attention_levels: tuple[int, ...] = (3,)
    """Level indices (0 = full resolution) whose blocks are followed by self-attention."""
    attention_heads: int = 4
    """Heads of each self-attention layer."""
    noise_embedding_channels: int = 64
    """Sinusoidal features of c_noise before the embedding MLP."""
    embedding_mult: int = 4
    """Width of the embedding MLP relative to base_channels."""
    groupnorm_groups: int = 8
    """Groups of every GroupNorm (each level's channel count must be divisible by it)."""
    dropout: float = 0.0
    """Dropout inside residual blocks."""

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a (batch,) float tensor into (batch, channels) features.

    Frequencies 1 / 10000^(i / half) as in the Transformer / DDPM embedding; EDM applies the same
    to c_noise = ln(sigma) / 4, which lies roughly in [-1.6, 1.1] for sigma in [0.002, 80].
    """

    def __init__(self, channels: int, max_period: float = 10000.0):
        super().__init__()
        if channels % 2:
            raise ValueError(f"PositionalEmbedding: channels must be even, got {channels}")
        half = channels // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        angles = values.float()[:, None] * self.freqs[None, :]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the noise embedding added in between (scale and shift)."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Zero-initialised last conv: every block starts as the identity (stable early training).
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over all H*W positions (pre-GroupNorm, residual)."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"SelfAttention: {channels} channels not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # (b, heads, hw, c/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class _Level(nn.Module):
    """Residual blocks of one level, each optionally followed by attention."""

    def __init__(self, blocks: list[ResBlock], attention: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attention = nn.ModuleList(attention)


class UNet(nn.Module):
    """Fully convolutional U-Net: (B, C, H, W), c_noise (B,) -> (B, C, H, W).

    Down path: per level ``num_res_blocks`` ResBlocks (+ attention), then a stride-2 conv.
    Middle: ResBlock, attention, ResBlock. Up path: per level ``num_res_blocks + 1`` ResBlocks on the
    concatenation with the stored skip features, then nearest upsampling + conv.
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = config or UNetConfig()
        self.config = cfg
        emb_ch = cfg.base_channels * cfg.embedding_mult
        g = cfg.groupnorm_groups
        self.noise_features = PositionalEmbedding(cfg.noise_embedding_channels)
        self.embed = nn.Sequential(
            nn.Linear(cfg.noise_embedding_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
        )
        self.stem = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)

        def attention(ch: int, level: int) -> nn.Module:
            if level in cfg.attention_levels:
                return SelfAttention(ch, cfg.attention_heads, g)
            return nn.Identity()

        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        skip_chans = [cfg.base_channels]
        ch = cfg.base_channels
        self.down_levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for level, out_ch in enumerate(chans):
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, out_ch, emb_ch, g, cfg.dropout))
                attn.append(attention(out_ch, level))
                ch = out_ch
                skip_chans.append(ch)
            self.down_levels.append(_Level(blocks, attn))
            if level < len(chans) - 1:
                self.downsamples.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_chans.append(ch)

        self.mid1 = ResBlock(ch, ch, emb_ch, g, cfg.dropout)
        self.mid_attn = SelfAttention(ch, cfg.attention_heads, g)
        self.mid2 = ResBlock(ch, ch, emb_ch, g, cfg.dropout)

        self.up_levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(chans))):
            out_ch = chans[level]
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(ch + skip_chans.pop(), out_ch, emb_ch, g, cfg.dropout))
                attn.append(attention(out_ch, level))
                ch = out_ch
            self.up_levels.append(_Level(blocks, attn))
            if level > 0:
                self.upsamples.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.out_norm = nn.GroupNorm(g, ch)
        self.out_conv = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) float; c_noise: (B,) float. Returns (B, C, H, W) in x's dtype."""
        m = self.config.size_multiple
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"UNet: expected input (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"UNet: H and W must be multiples of {m}, got {tuple(x.shape[-2:])}")
        emb = self.embed(self.noise_features(c_noise).to(x.dtype))
        h = self.stem(x)
        skips = [h]
        for level, stage in enumerate(self.down_levels):
            for block, attn in zip(stage.blocks, stage.attention):
                h = attn(block(h, emb))
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, stage in enumerate(self.up_levels):
            for block, attn in zip(stage.blocks, stage.attention):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if i < len(self.upsamples):
                h = self.upsamples[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out_conv(F.silu(self.out_norm(h)))


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["PositionalEmbedding", "UNet", "UNetConfig", "count_parameters"]
