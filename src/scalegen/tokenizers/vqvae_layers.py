"""VQGAN-style convolutional encoder and decoder of the VAR multi-scale tokenizer.

Module and attribute names (`down.{i}.block.{j}`, `mid.attn_1`, `nin_shortcut`, …) follow the official VAR
`basic_vae.py` (itself from latent-diffusion), so the official tokenizer checkpoint loads with `strict=True`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scalegen.errors import UserError

NORM_EPS = 1e-6
DEFAULT_NORM_GROUPS = 32


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the VQGAN epsilon; a group count that does not divide `channels` is a config error."""
    if channels % groups:
        raise UserError(f"GroupNorm with {groups} groups cannot split {channels} channels; "
                        f"pick norm_groups dividing every level width (ch * ch_mult)")
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """norm → SiLU → conv → norm → SiLU → dropout → conv, plus a shortcut (1x1 conv when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels)
        # The official checkpoint has `nin_shortcut` weights only where the width changes.
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1)
                             if in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place: each SiLU acts on a fresh norm output, and saving that allocation is ~10% of decode time.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))  # (B, C_out, H, W)
        return self.nin_shortcut(x) + h  # (B, C_out, H, W)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width)  # (B, 3, C, HW)
        query, key, value = qkv.transpose(2, 3).unsqueeze(2).unbind(1)  # 3 × (B, 1, HW, C)
        h = F.scaled_dot_product_attention(query, key, value)  # (B, 1, HW, C), softmax scale C^-0.5
        h = h.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
        return x + self.proj_out(h)  # (B, C, H, W)


class Downsample(nn.Module):
    """Halve the resolution: pad one zero row/column at the right and bottom, then a 3x3 stride-2 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour ×2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # (B, C, 2H, 2W)


class MiddleBlocks(nn.Module):
    """ResBlock → attention (or identity) → ResBlock at the lowest resolution."""

    def __init__(self, channels: int, norm_groups: int, dropout: float, use_attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_groups, dropout)
        self.attn_1 = AttnBlock(channels, norm_groups) if use_attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, norm_groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))  # (B, C, h, w)


class LevelBlocks(nn.Module):
    """The ResBlocks of one resolution level, each followed by attention when `use_attention`."""

    def __init__(self, widths: Sequence[int], norm_groups: int, dropout: float, use_attention: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(widths[i], widths[i + 1], norm_groups, dropout) for i in range(len(widths) - 1))
        self.attn = nn.ModuleList(
            AttnBlock(widths[i + 1], norm_groups) for i in range(len(widths) - 1) if use_attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            x = block(x)  # (B, C, H, W)
            if len(self.attn):
                x = self.attn[index](x)  # (B, C, H, W)
        return x


class EncoderLevel(LevelBlocks):
    """Encoder level: ResBlocks (+ attention), then `downsample` except at the lowest resolution."""

    def __init__(self, widths: Sequence[int], norm_groups: int, dropout: float, use_attention: bool,
                 downsample: bool):
        super().__init__(widths, norm_groups, dropout, use_attention)
        self.downsample = Downsample(widths[-1]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)  # (B, C, H, W)
        return x if self.downsample is None else self.downsample(x)  # (B, C, H/2, W/2)


class DecoderLevel(LevelBlocks):
    """Decoder level: ResBlocks (+ attention), then `upsample` except at the finest resolution."""

    def __init__(self, widths: Sequence[int], norm_groups: int, dropout: float, use_attention: bool,
                 upsample: bool):
        super().__init__(widths, norm_groups, dropout, use_attention)
        self.upsample = Upsample(widths[-1]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)  # (B, C, H, W)
        return x if self.upsample is None else self.upsample(x)  # (B, C, 2H, 2W)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) → latent (B, z_channels, H/r, W/r), r = 2^(len(ch_mult)-1).

    Args:
        ch: base width; level i has width ch * ch_mult[i].
        ch_mult: width multipliers, one per resolution level (each level but the last halves the resolution).
        num_res_blocks: ResBlocks per level.
        z_channels: latent channels.
        in_channels: image channels.
        norm_groups: GroupNorm groups (must divide every level width).
        dropout: dropout inside ResBlocks.
        use_attention: attention after every ResBlock of the lowest-resolution level.
        use_mid_attention: attention between the two middle ResBlocks.
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 in_channels: int = 3, norm_groups: int = DEFAULT_NORM_GROUPS, dropout: float = 0.0,
                 use_attention: bool = True, use_mid_attention: bool = True):
        super().__init__()
        self.conv_in = conv3x3(in_channels, ch)
        last = len(ch_mult) - 1
        self.down = nn.ModuleList()
        width = ch
        for level, mult in enumerate(ch_mult):
            widths = [width] + [ch * mult] * num_res_blocks
            width = ch * mult
            self.down.append(EncoderLevel(widths, norm_groups, dropout, use_attention and level == last,
                                          downsample=level != last))
        self.mid = MiddleBlocks(width, norm_groups, dropout, use_mid_attention)
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = conv3x3(width, z_channels)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(img)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # (B, ch*mult, H', W')
        h = self.mid(h)  # (B, C_last, H/r, W/r)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))  # (B, z_channels, H/r, W/r)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) → image (B, in_channels, h*r, w*r); mirror of `Encoder` with one more
    ResBlock per level. `up[i]` holds resolution level i (0 = finest), run from the coarsest up, as officially.

    Args: as `Encoder`; `in_channels` is the number of image channels produced.
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 in_channels: int = 3, norm_groups: int = DEFAULT_NORM_GROUPS, dropout: float = 0.0,
                 use_attention: bool = True, use_mid_attention: bool = True):
        super().__init__()
        last = len(ch_mult) - 1
        width = ch * ch_mult[last]
        self.conv_in = conv3x3(z_channels, width)
        self.mid = MiddleBlocks(width, norm_groups, dropout, use_mid_attention)
        levels = []
        for level in reversed(range(len(ch_mult))):
            widths = [width] + [ch * ch_mult[level]] * (num_res_blocks + 1)
            width = ch * ch_mult[level]
            levels.append(DecoderLevel(widths, norm_groups, dropout, use_attention and level == last,
                                       upsample=level != 0))
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = conv3x3(width, in_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, C_last, h, w)
        for level in reversed(self.up):
            h = level(h)  # (B, ch*mult, h', w')
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))  # (B, in_channels, h*r, w*r)
