"""Building blocks of the VAR transformer: AdaLN self-attention blocks, their attention (SDPA with a dense mask,
or FlexAttention with a block-sparse one) with a static KV cache, and the AdaLN before the head.

Attribute names follow the official FoundationVision/VAR modules so that official checkpoints load with
`strict=True` (`attn.mat_qkv`, `attn.scale_mul_1H11`, `ffn.fc1`, `ada_lin.1`, `ada_gss`, ...).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5 has no FlexAttention
    BlockMask = create_block_mask = flex_attention = None

from scalegen.models.var_pruning import BlockTokens

# Per-head multiplier of the L2-normalised queries: it starts at 4 and is clamped at 100 (both as logarithms).
INITIAL_QUERY_SCALE = 4.0
MAX_QUERY_SCALE = 100.0
# Official softmax scale without L2-normalised attention (a quarter of the usual head_dim ** -0.5).
PLAIN_ATTENTION_SCALE_FACTOR = 0.25
# Official AdaLN modulation layout: one (B, 1, 6, C) tensor, chunks in this order.
ADALN_CHUNKS = 6
# Devices where torch's FlexAttention is inference only (no backward pass).
FLEX_INFERENCE_ONLY_DEVICES = ("cpu", "mps")


class KVCache:
    """Keys and values of all scales seen so far, for one attention layer during generation.

    Next-scale prediction feeds one whole scale at a time; each new scale attends to every earlier scale and to
    itself, so no mask is needed: attention reads the filled prefix of a buffer of the whole sequence, allocated
    at the first scale and written in place at every later one (no re-allocation or copying of earlier scales).
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0  # positions filled so far
        self.keys: torch.Tensor | None = None  # (B, H, max_length, head_dim)
        self.values: torch.Tensor | None = None  # (B, H, max_length, head_dim)

    def slots(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffer slices a new scale's keys and values are written into, after the filled prefix (the buffers are
        allocated at the first call, shaped as the inputs but for the whole sequence); `fill` marks them filled.

        Args:
            keys: (B, H, l, head_dim) keys of the new positions (their shape, dtype and device; not written).
            values: (B, H, l, head_dim) values of the new positions (likewise).

        Returns:
            Views (B, H, l, head_dim) of the key and value buffers.
        """
        if self.keys is None:
            batch, heads, _, head_dim = keys.shape
            self.keys = keys.new_empty(batch, heads, self.max_length, head_dim)  # (B, H, max_length, head_dim)
            self.values = values.new_empty(batch, heads, self.max_length, head_dim)  # (B, H, max_length, head_dim)
        end = self.length + keys.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache of {self.max_length} positions cannot take {end}")
        return self.keys[:, :, self.length : end], self.values[:, :, self.length : end]  # each (B, H, l, head_dim)

    def fill(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mark `length` more positions (written into `slots`) filled; returns views of all keys and values so far,
        each (B, H, L_seen, head_dim)."""
        self.length += length
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the keys and values of a new scale after the filled prefix.

        Args:
            keys: (B, H, l, head_dim) keys of the new positions.
            values: (B, H, l, head_dim) values of the new positions.

        Returns:
            Views of all keys and values so far, each (B, H, L_seen + l, head_dim).
        """
        key_slot, value_slot = self.slots(keys, values)
        key_slot.copy_(keys)  # (B, H, l, head_dim)
        value_slot.copy_(values)  # (B, H, l, head_dim)
        return self.fill(keys.shape[2])


def block_causal_mask(scale_of_position: torch.Tensor) -> torch.Tensor:
    """Additive attention mask letting each position see its own and all earlier scales.

    Args:
        scale_of_position: (L,) scale index of every position.

    Returns:
        (1, 1, L, L) float mask, 0 where attention is allowed and -inf elsewhere.
    """
    allowed = scale_of_position.view(-1, 1) >= scale_of_position.view(1, -1)  # (L, L) query scale >= key scale
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(allowed, zero, -torch.inf).view(1, 1, *allowed.shape)


def block_causal_block_mask(scale_of_position: torch.Tensor) -> BlockMask:
    """FlexAttention's block-sparse form of `block_causal_mask` (same allowed pairs), on the positions' device.

    Args:
        scale_of_position: (L,) scale index of every position.

    Returns:
        A BlockMask for (L, L) attention, shared by all batch entries and heads.
    """

    def same_or_earlier_scale(
        batch: torch.Tensor, head: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor
    ) -> torch.Tensor:
        return scale_of_position[query_index] >= scale_of_position[key_index]

    length = scale_of_position.shape[0]
    return create_block_mask(same_or_earlier_scale, None, None, length, length, device=scale_of_position.device)


def flex_unavailable_reason(x: torch.Tensor) -> str | None:
    """Why FlexAttention cannot run teacher forcing on these activations, or None when it can.

    Args:
        x: (B, L, C) activations entering the blocks (their device, and whether gradients flow through them).
    """
    if flex_attention is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (it needs torch >= 2.5)"
    needs_backward = torch.is_grad_enabled() and x.requires_grad
    if needs_backward and x.device.type in FLEX_INFERENCE_ONLY_DEVICES:
        return f"FlexAttention has no backward pass on {x.device.type} (torch {torch.__version__})"
    return None


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """flex_attention compiled once per process: on GPUs only the compiled kernel is fused and skips the masked
    blocks (eager mode materialises the full score matrix)."""
    return torch.compile(flex_attention, dynamic=False)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample in training, rescaling the kept ones."""

    def __init__(self, drop_probability: float) -> None:
        super().__init__()
        self.drop_probability = drop_probability

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_probability == 0.0:
            return x
        keep_probability = 1.0 - self.drop_probability
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_probability)  # (B, 1, 1)
        return x * keep / keep_probability

    def extra_repr(self) -> str:
        return f"drop_probability={self.drop_probability:g}"


class SelfAttention(nn.Module):
    """Multi-head self-attention with VAR's biases and optional L2-normalised queries/keys.

    The key bias is a zero buffer (not learned), kept so the packed qkv bias has the official layout.
    """

    def __init__(self, dim: int, num_heads: int, l2_norm: bool) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.l2_norm = l2_norm
        if l2_norm:
            # Cosine attention: the temperature is learned per head instead of using a fixed softmax scale.
            self.softmax_scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(INITIAL_QUERY_SCALE)))
        else:
            self.softmax_scale = PLAIN_ATTENTION_SCALE_FACTOR / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | BlockMask | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Attend over the input (and over the cached earlier scales when a cache is given).

        Args:
            x: (B, l, C) input positions.
            attn_mask: for teacher forcing, an additive (1, 1, l, l) mask (0 or -inf) for SDPA, or a BlockMask
                for FlexAttention (`block_causal_block_mask`); None with a cache.
            cache: the layer's KV cache during generation; it is extended with this call's keys and values.

        Returns:
            (B, l, C) attention output.
        """
        batch, length, dim = x.shape
        qkv_bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))  # (3C,)
        qkv = F.linear(x, self.mat_qkv.weight, qkv_bias)  # (B, l, 3C)
        qkv = qkv.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, l, d)
        query, key, value = qkv.unbind(0)  # each (B, H, l, d)
        if self.l2_norm:
            query_scale = self.scale_mul_1H11.clamp_max(math.log(MAX_QUERY_SCALE)).exp()  # (1, H, 1, 1)
            query = F.normalize(query, dim=-1) * query_scale  # (B, H, l, d)
        if cache is not None and self.l2_norm and not key.requires_grad:
            # The normalised keys are written straight into the cache, in the values' dtype: no copy of them, and
            # under autocast (where they come out in float32) the attention's cast of the whole cache at every scale
            # is gone too. (With gradients they cannot be written into a buffer.)
            key_slot, value_slot = cache.slots(value, value)  # each (B, H, l, d)
            F.normalize(key, dim=-1, out=key_slot)
            value_slot.copy_(value)
            key, value = cache.fill(length)  # (B, H, L_seen, d)
        else:
            if self.l2_norm:
                key = F.normalize(key, dim=-1)  # (B, H, l, d)
            if cache is not None:
                key, value = cache.extend(key, value)  # (B, H, L_seen, d)
        if BlockMask is not None and isinstance(attn_mask, BlockMask):
            attend = compiled_flex_attention() if query.is_cuda else flex_attention
            # Under autocast the normalised query and key come out in float32; SDPA casts them, flex does not.
            query, key = query.to(value.dtype), key.to(value.dtype)  # (B, H, l, d)
            out = attend(query, key, value, block_mask=attn_mask, scale=self.softmax_scale)  # (B, H, l, d)
        else:
            if attn_mask is not None:
                attn_mask = attn_mask.to(query.dtype)  # SDPA wants the mask in the query dtype under autocast
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=self.softmax_scale)
        out = out.transpose(1, 2).reshape(batch, length, dim)  # (B, l, C)
        return self.proj(out)  # (B, l, C)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, l2_norm={self.l2_norm}"


class FeedForward(nn.Module):
    """Two-layer MLP with tanh-approximated GELU."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, l, C)


class SharedAdaLin(nn.Linear):
    """The one conditioning projection shared by all blocks (shared-AdaLN models such as VAR-d36-s)."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        dim = self.out_features // ADALN_CHUNKS
        return super().forward(cond).view(-1, 1, ADALN_CHUNKS, dim)  # (B, 1, 6, C)


class AdaLNSelfAttn(nn.Module):
    """Transformer block whose LayerNorms are modulated by the class embedding (AdaLN).

    x += γ1 · attn(LN(x)·(1 + scale1) + shift1);  x += γ2 · FFN(LN(x)·(1 + scale2) + shift2).
    With `shared_aln`, the block gets the shared projection (B, 1, 6, C) and adds its own learned `ada_gss`;
    otherwise it projects the class embedding itself with `ada_lin` = SiLU + Linear(C, 6C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float,
        norm_eps: float,
        shared_aln: bool,
        attn_l2_norm: bool,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.shared_aln = shared_aln
        self.attn = SelfAttention(dim, num_heads, attn_l2_norm)
        self.ffn = FeedForward(dim, round(dim * mlp_ratio))
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, ADALN_CHUNKS, dim))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, ADALN_CHUNKS * dim))
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        attn_mask: torch.Tensor | BlockMask | None = None,
        cache: KVCache | None = None,
        tokens: BlockTokens | None = None,
    ) -> torch.Tensor:
        """Run the block.

        Args:
            x: (B, l, C) positions.
            cond: (B, C) class embedding, or with `shared_aln` the shared projection (B, 1, 6, C).
            attn_mask: block-causal mask for teacher forcing (additive (1, 1, l, l) tensor, or a BlockMask), or None.
            cache: this block's KV cache during generation, or None.
            tokens: during pruned generation, which positions the branches compute (`var_pruning.BlockTokens`);
                None computes every position.

        Returns:
            (B, l, C) updated positions.
        """
        if self.shared_aln:
            modulation = self.ada_gss + cond  # (B, 1, 6, C)
        else:
            modulation = self.ada_lin(cond).view(-1, 1, ADALN_CHUNKS, self.dim)  # (B, 1, 6, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation.unbind(2)  # each (B, 1, C)

        # Fused multiply-adds and in-place gains on fresh outputs: fewer passes over (B, l, C) tensors.
        def attention(h: torch.Tensor) -> torch.Tensor:
            return self.attn(torch.addcmul(shift1, self.norm(h), 1 + scale1), attn_mask, cache).mul_(gamma1)

        def feed_forward(h: torch.Tensor) -> torch.Tensor:
            return self.ffn(torch.addcmul(shift2, self.norm(h), 1 + scale2)).mul_(gamma2)

        attended = attention(x) if tokens is None else tokens.compute("attention", x, attention)  # (B, l, C)
        x = x + self.drop_path(attended)  # (B, l, C)
        fed = feed_forward(x) if tokens is None else tokens.compute("ffn", x, feed_forward)  # (B, l, C)
        return x + self.drop_path(fed)  # (B, l, C)


class AdaLNBeforeHead(nn.Module):
    """Final AdaLN before the classifier head: LN(x)·(1 + scale) + shift from SiLU + Linear(C, 2C)."""

    def __init__(self, dim: int, norm_eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)  # each (B, 1, C)
        return torch.addcmul(shift, self.norm(x), 1 + scale)  # (B, l, C)
