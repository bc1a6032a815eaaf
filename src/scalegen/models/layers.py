"""Building blocks of the transformers: attention, MLP, embedders, positions, and helper modules held by reference."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scalegen.diffusion.objective import drop_labels
from scalegen.models.settings import ROPE_AXES, ROPE_HEAD_DIVISOR

LAYER_NORM_EPS = 1e-6
TIMESTEP_FREQUENCY_SIZE = 256
MAX_PERIOD = 10000
ROPE_BASE = 10000  # θ of the rotary frequencies (EVA / LightningDiT)
SWIGLU_HIDDEN_FRACTION = 2 / 3  # SwiGLU's hidden width against the GELU MLP's (about the same parameters and MACs)


class ReferencedModule:
    """A frozen helper network (a tokenizer, a VAE) that a model uses but does not own.

    Held in a plain attribute, it stays out of the model's parameters and state dict (official checkpoints hold the
    network alone); deep copies share it (an EMA copy must not duplicate a frozen 100M-parameter VQVAE). To change the
    helper, replace the holder: it is never mutated, so copies that share it are unaffected.
    """

    def __init__(self, module: nn.Module | None = None):
        self.module = module

    def __deepcopy__(self, memo: dict) -> ReferencedModule:
        return self


class ReferencingModule(nn.Module):
    """An nn.Module whose `ReferencedModule` attributes follow `.to()`, `.cuda()` and casts: they are no registered
    children, so nn.Module alone would leave them on the old device."""

    def _apply(self, fn, *args, **kwargs):
        for value in vars(self).values():
            if isinstance(value, ReferencedModule) and value.module is not None:
                value.module._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens x (B, T, D) by per-sample shift and scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (B, T, D)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Each channel pair (x₂ᵢ, x₂ᵢ₊₁) of x (..., d) turned by 90°: (−x₂ᵢ₊₁, x₂ᵢ) (EVA's `rotate_half`)."""
    first, second = x.unflatten(-1, (-1, 2)).unbind(-1)  # 2 × (..., d/2)
    return torch.stack((-second, first), dim=-1).flatten(-2)  # (..., d)


def rope_angles(head_dim: int, grid_size: int) -> torch.Tensor:
    """Rotation angles (grid_size², head_dim), in float64, of 2-D RoPE for a row-major token grid, as EVA's /
    LightningDiT's `VisionRotaryEmbeddingFast`: the first half of the head rotates with the token's row, the second
    half with its column; each half turns its channel pairs at frequencies ROPE_BASE^(−2i/half), i < half/2."""
    if head_dim % ROPE_HEAD_DIVISOR:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by {ROPE_HEAD_DIVISOR}; got {head_dim}")
    axis_dim = head_dim // ROPE_AXES
    frequencies = 1.0 / ROPE_BASE ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)  # (a/2,)
    positions = torch.arange(grid_size, dtype=torch.float64)  # (G,)
    axis_angles = torch.outer(positions, frequencies).repeat_interleave(2, dim=-1)  # (G, a): both channels of a pair
    rows = axis_angles[:, None, :].expand(grid_size, grid_size, axis_dim)  # (G, G, a)
    columns = axis_angles[None, :, :].expand(grid_size, grid_size, axis_dim)  # (G, G, a)
    return torch.cat([rows, columns], dim=-1).reshape(grid_size * grid_size, head_dim)  # (T, d)


class RotaryEmbedding2d(nn.Module):
    """2-D rotary position embedding of queries or keys (B, H, T, d) on a grid_size × grid_size token grid.

    The cos / sin tables are non-persistent buffers, rebuilt from the grid size: they add no state-dict keys.
    """

    def __init__(self, head_dim: int, grid_size: int):
        super().__init__()
        angles = rope_angles(head_dim, grid_size)  # (T, d)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)  # 2 × (T, d), in the activations' precision
        return x * cos + rotate_pairs(x) * sin  # (B, H, T, d)


class Attention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention` (flash / memory-efficient when available).

    Key names follow timm's `Attention` (`qkv`, `proj`), which the official DiT checkpoints use. Two LightningDiT
    options, both off by default: `qk_norm` RMS-normalises each head's queries and keys (learnable weights
    `q_norm.weight`, `k_norm.weight`) and `rope_grid_size` rotates them by their 2-D position on that token grid
    (after the norm, as LightningDiT). Off, they are identities, so the default computation is unchanged.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, rope_grid_size: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=LAYER_NORM_EPS) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=LAYER_NORM_EPS) if qk_norm else nn.Identity()
        self.rope = RotaryEmbedding2d(head_dim, rope_grid_size) if rope_grid_size else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)  # (B, T, 3, H, d)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, T, d)
        query, key = self.rope(self.q_norm(query)), self.rope(self.k_norm(key))  # 2 × (B, H, T, d)
        x = F.scaled_dot_product_attention(query, key, value)  # (B, H, T, d)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))  # (B, T, D)


class CrossAttention(nn.Module):
    """Multi-head attention of image tokens over a few conditioning tokens (the paper's cross-attention block)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        query = self.q(x).reshape(batch, tokens, self.num_heads, head_dim).transpose(1, 2)  # (B, H, T, d)
        key_value = self.kv(context).reshape(batch, context.shape[1], 2, self.num_heads, head_dim)  # (B, S, 2, H, d)
        key, value = key_value.permute(2, 0, 3, 1, 4).unbind(0)  # 2 × (B, H, S, d)
        x = F.scaled_dot_product_attention(query, key, value)  # (B, H, T, d)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))  # (B, T, D)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (key names `fc1`, `fc2` as in timm)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, T, D)


def swiglu_hidden_size(dim: int, mlp_ratio: float) -> int:
    """LightningDiT's SwiGLU hidden width: 2/3 of the GELU MLP's int(dim · mlp_ratio), truncated as there."""
    return int(SWIGLU_HIDDEN_FRACTION * int(dim * mlp_ratio))


class SwiGLU(nn.Module):
    """LightningDiT's SwiGLU MLP: fc2(SiLU(gate) · value), with gate and value packed in fc1 (LightningDiT's `w12`,
    gate first; fc2 is its `w3`), so its three matrices run as two matmuls."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)  # 2 × (B, T, h)
        return self.fc2(F.silu(gate) * value)  # (B, T, D)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches to tokens with a strided convolution (key `proj` as in timm)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.patch_size = patch_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_FREQUENCY_SIZE) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) -> (B, dim), laid out [cos, sin]."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (half,)
    angles = t[:, None].float() * frequencies[None]  # (B, half)
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, 2*half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (B, dim)
    return embedding


class TimestepEmbedder(nn.Module):
    """Timestep t -> sinusoid (256) -> Linear, SiLU, Linear (keys `mlp.0`, `mlp.2`); the sinusoid is computed in
    float32 (the official way) and handed to the MLP in its weights' dtype (a float64 model's too)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCY_SIZE, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class label -> vector; with dropout > 0 an extra row (index num_classes) is the null class used for CFG."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor, drop: bool = True) -> torch.Tensor:
        """Embed labels (B,) -> (B, D), dropping each to the null class with the dropout probability in training
        (unless `drop` is False: the caller dropped them itself)."""
        if drop and self.training and self.dropout_prob > 0:
            labels = drop_labels(labels, self.dropout_prob, self.num_classes)[0]  # (B,)
        return self.embedding_table(labels)  # (B, D)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE-style 1-D sin-cos embedding of positions (M,) -> (M, dim) as [sin, cos], computed in float64."""
    omega = 1.0 / MAX_PERIOD ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))  # (dim/2,)
    angles = np.outer(positions.reshape(-1), omega)  # (M, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (M, dim)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """2-D sin-cos position embedding (grid_size², dim): first half encodes the column, second half the row."""
    columns, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    embedding = np.concatenate([sincos_1d(dim // 2, columns), sincos_1d(dim // 2, rows)], axis=1)  # (T, dim)
    return torch.from_numpy(embedding).float()
