"""The draws of VAR's categorical token head (`token_heads.CategoricalSampler`): top-k / top-p filtering, multinomial
or inverse-CDF draws and the Gumbel-softmax smoothing used for visualisation. Each piece reproduces the official VAR
code draw for draw, so a seeded `torch.Generator` gives the same tokens as the official `autoregressive_infer_cfg`.
"""
from __future__ import annotations

import torch

# more_smooth sampling (visualisation only): Gumbel temperature falls from 0.27 to 0.27·0.05, never below 0.005.
GUMBEL_START_TEMPERATURE = 0.27
GUMBEL_TEMPERATURE_DECAY = 0.95
GUMBEL_MIN_TEMPERATURE = 0.005


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask logits outside the top-k and outside the top-p nucleus with -inf (the input is not modified).

    Args:
        logits: (..., V) unnormalised scores.
        top_k: keep the k largest (ties with the k-th are kept too); 0, or V or more, keeps all.
        top_p: drop the least likely tokens whose cumulative probability is at most 1 - top_p, always keeping
            the most likely one; 0 keeps all.

    Returns:
        (..., V) logits with the removed entries set to -inf.
    """
    if 0 < top_k < logits.shape[-1]:  # torch's topk refuses k > V, and k = V keeps every token anyway
        kth_largest = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth_largest, -torch.inf)  # (..., V)
    if top_p > 0:
        ascending, order = logits.sort(dim=-1, descending=False)  # (..., V)
        drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)  # (..., V)
        drop_sorted[..., -1] = False  # the most likely token always survives
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, -torch.inf)  # (..., V)
    return logits


def sample_tokens(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per position from softmax(logits).

    Args:
        logits: (B, l, V) logits, already filtered.
        generator: random generator, or None for the global one.

    Returns:
        (B, l) LongTensor of token ids.
    """
    batch, length, vocab = logits.shape
    probabilities = logits.softmax(dim=-1).view(-1, vocab)  # (B*l, V)
    # replacement=True as in the official sampler: it selects the same algorithm, hence the same draws.
    drawn = torch.multinomial(probabilities, num_samples=1, replacement=True, generator=generator)  # (B*l, 1)
    return drawn.view(batch, length)


def inverse_cdf_tokens(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per position from softmax(logits) by inverting the cumulative distribution: one uniform draw per
    position instead of `sample_tokens`' one per vocabulary entry (same distribution, other tokens for a seed).

    Args:
        logits: (B, l, V) logits, already filtered (-inf entries are never drawn).
        generator: random generator, or None for the global one.

    Returns:
        (B, l) LongTensor of token ids.
    """
    cumulative = logits.softmax(dim=-1).cumsum(dim=-1)  # (B, l, V)
    uniform = torch.rand(*logits.shape[:-1], 1, generator=generator, device=logits.device)  # (B, l, 1)
    drawn = torch.searchsorted(cumulative, uniform * cumulative[..., -1:], right=True)  # (B, l, 1)
    return drawn.clamp_max(logits.shape[-1] - 1).squeeze(-1)  # (B, l); the clamp guards a rounding at the very top


def gumbel_softmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Soft Gumbel-softmax sample along the last dimension.

    Args:
        logits: (..., V) logits.
        temperature: softmax temperature τ.
        generator: random generator, or None for the global one.

    Returns:
        (..., V) probabilities.
    """
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()  # (..., V)
    return ((logits + gumbels) / temperature).softmax(dim=-1)


def smooth_embedding(filtered_logits: torch.Tensor, progress: float, codebook: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The `more_smooth` input of one scale: a Gumbel-softmax mixture of codebook vectors instead of one code.

    Args:
        filtered_logits: (B, l, V) guided, top-k/top-p filtered logits of the scale.
        progress: scale index / (number of scales - 1), in [0, 1]; sharpens the mixture at finer scales.
        codebook: (V, Cvae) codebook vectors.
        generator: random generator, or None for the global one.

    Returns:
        (B, l, Cvae) mixed embeddings.
    """
    temperature = max(GUMBEL_START_TEMPERATURE * (1 - GUMBEL_TEMPERATURE_DECAY * progress), GUMBEL_MIN_TEMPERATURE)
    mixture = gumbel_softmax(filtered_logits * (1 + progress), temperature, generator)  # (B, l, V)
    return mixture @ codebook  # (B, l, Cvae)
