"""DiT transformer blocks: adaLN-Zero (the paper's choice) and the three designs it was ablated against, with
LightningDiT's block options (RMSNorm, SwiGLU, 2-D RoPE, QK-norm) for the adaLN blocks."""
from __future__ import annotations

import torch
from torch import nn

from scalegen.models.layers import (
    LAYER_NORM_EPS, Attention, CrossAttention, Mlp, SwiGLU, modulate, swiglu_hidden_size,
)
from scalegen.models.settings import ADALN_KINDS, BLOCK_KINDS, OFFICIAL_BLOCK, BlockOptions, NormKind


def plain_norm(dim: int, kind: NormKind = OFFICIAL_BLOCK.norm) -> nn.Module:
    """A norm without affine parameters, as every adaLN-conditioned norm in DiT: LayerNorm, or RMSNorm."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=LAYER_NORM_EPS, elementwise_affine=False)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)


class AdaLNBlock(nn.Module):
    """Block whose norms are modulated by the conditioning c: shift, scale and a residual gate per branch.

    With adaLN-Zero the modulation is zero-initialised so each block starts as the identity. `options` choose
    LightningDiT's norm, MLP, RoPE (on the grid_size × grid_size token grid) and QK-norm.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, options: BlockOptions = OFFICIAL_BLOCK,
                 grid_size: int | None = None):
        super().__init__()
        if options.rope and grid_size is None:
            raise ValueError("RoPE needs the token grid's side (grid_size)")
        self.norm1 = plain_norm(dim, options.norm)
        self.attn = Attention(dim, num_heads, options.qk_norm, grid_size if options.rope else None)
        self.norm2 = plain_norm(dim, options.norm)
        if options.mlp == "swiglu":
            self.mlp = SwiGLU(dim, swiglu_hidden_size(dim, mlp_ratio))
        else:
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, condition: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(condition).chunk(
            6, dim=1
        )  # 6 × (B, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, D)
        return x


class PlainBlock(nn.Module):
    """Standard pre-norm ViT block; conditioning enters as extra tokens in the sequence (in-context)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, condition: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, T, D)
        return x + self.mlp(self.norm2(x))  # (B, T, D)


class CrossAttentionBlock(nn.Module):
    """ViT block with an extra multi-head cross-attention over the conditioning tokens [t, y]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm_cross = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, condition: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, T, D)
        x = x + self.cross_attn(self.norm_cross(x), context)  # (B, T, D)
        return x + self.mlp(self.norm2(x))  # (B, T, D)


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens to patches of out_channels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = plain_norm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(condition).chunk(2, dim=1)  # 2 × (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C_out)


def make_block(kind: str, dim: int, num_heads: int, mlp_ratio: float, options: BlockOptions = OFFICIAL_BLOCK,
               grid_size: int | None = None) -> nn.Module:
    """Build one transformer block of the given kind (see BLOCK_KINDS).

    Args:
        kind: the conditioning block.
        dim, num_heads, mlp_ratio: width, heads, MLP width over `dim` (of the GELU MLP).
        options: LightningDiT's options, for the adaLN kinds only (a one-line error otherwise).
        grid_size: the token grid's side (input_size // patch_size), which RoPE needs.
    """
    options.check(kind, dim // num_heads)
    if kind in ADALN_KINDS:
        return AdaLNBlock(dim, num_heads, mlp_ratio, options, grid_size)
    if kind == "in_context":
        return PlainBlock(dim, num_heads, mlp_ratio)
    if kind == "cross_attention":
        return CrossAttentionBlock(dim, num_heads, mlp_ratio)
    raise ValueError(f"unknown block kind {kind!r}; choose one of {', '.join(BLOCK_KINDS)}")
