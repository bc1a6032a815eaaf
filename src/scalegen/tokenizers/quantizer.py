"""Multi-scale residual vector quantizer of VAR (the official `VectorQuantizer2`).

A feature map f (B, C, H, W) becomes K token maps of growing size p_1 < … < p_K = H. At scale k the residual
r = f − f̂ is area-downsampled to p_k×p_k and every position takes its nearest codebook vector (squared L2);
the chosen vectors are bicubic-upsampled back to H×W, passed through a refining conv φ_k and added to f̂.
One codebook serves all scales. Names of parameters and buffers follow the official checkpoint.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

COMMITMENT_BETA = 0.25
PHI_KERNEL_SIZE = 3
# The official code swaps φ for the identity when |quant_resi| is at most this.
IDENTITY_PHI_BELOW = 1e-6
# Usage EMA: copy the first step, then momentum 0.9 for the first updates, 0.99 after (official schedule).
USAGE_FAST_UPDATES = 100
USAGE_FAST_MOMENTUM = 0.9
USAGE_SLOW_MOMENTUM = 0.99


def phi_indices(scale_count: int, phi_count: int) -> list[int]:
    """Which of `phi_count` φ convs each of `scale_count` scales uses (the official tick rule).

    Scale k sits at position k / (scale_count − 1) in [0, 1] and takes the φ whose tick is nearest, ticks being
    `phi_count` evenly spaced points (pulled further from the ends when phi_count == 4, as officially).

    Returns:
        One φ index per scale, e.g. [0, 0, 1, 1, 1, 2, 2, 3, 3, 3] for 10 scales and 4 φ convs.
    """
    end_margin = 1 / 3 / phi_count if phi_count == 4 else 1 / 2 / phi_count
    # float64 numpy on purpose: for 10 scales scale 2 is a near-tie between ticks 0 and 1 that float64 gives to 1.
    ticks = np.linspace(end_margin, 1 - end_margin, phi_count)
    positions = [index / (scale_count - 1) if scale_count > 1 else 0.0 for index in range(scale_count)]
    return [int(np.argmin(np.abs(ticks - position))) for position in positions]


class Phi(nn.Conv2d):
    """φ(h) = (1 − ratio)·h + ratio·conv3x3(h), the conv that refines each scale's upsampled codes."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, PHI_KERNEL_SIZE, padding=PHI_KERNEL_SIZE // 2)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio  # (B, C, H, W)


def make_phi(channels: int, ratio: float) -> nn.Module:
    return Phi(channels, ratio) if abs(ratio) > IDENTITY_PHI_BELOW else nn.Identity()


class PartiallySharedPhis(nn.Module):
    """A few φ convs shared over the scales by the tick rule (official default, keys `qresi_ls.{k}`)."""

    def __init__(self, phis: Sequence[nn.Module]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)

    @property
    def phis(self) -> list[nn.Module]:
        return list(self.qresi_ls)


class SharedPhi(nn.Module):
    """One φ conv for all scales (key `qresi`)."""

    def __init__(self, phi: nn.Module):
        super().__init__()
        self.qresi = phi

    @property
    def phis(self) -> list[nn.Module]:
        return [self.qresi]


class NonSharedPhis(nn.ModuleList):
    """One φ conv per scale, or a given count placed by the tick rule (keys `{k}`)."""

    @property
    def phis(self) -> list[nn.Module]:
        return list(self)


class QuantizerOutput(NamedTuple):
    """Training output of `MultiScaleQuantizer.forward`."""

    f_hat: torch.Tensor  # (B, C, H, W) quantized features; gradient passes straight through to the input
    loss: torch.Tensor  # scalar: mean over scales of beta·‖sg(f̂_k) − f‖² + ‖f̂_k − sg(f)‖² (MSE)
    vocab_hits: torch.Tensor  # (scales, vocab) how often each code was chosen at each scale in this batch


class MultiScaleQuantizer(nn.Module):
    """Residual quantizer over the scales `patch_nums`, with one shared codebook `embedding` (vocab × C).

    Args:
        vocab_size: number of codebook vectors.
        channels: feature channels C (the tokenizer's z_channels).
        patch_nums: side of each scale's token map, coarse to fine; the last equals the feature map side.
        beta: commitment-loss weight.
        quant_resi: φ's conv ratio (φ is the identity when it is 0).
        share_quant_resi: 0 = φ per scale (or `phi_count` of them), 1 = one φ for all, n ≥ 2 = n φ shared by ticks.
        phi_count: with share_quant_resi = 0, how many φ convs (0 = one per scale).
    """

    def __init__(self, vocab_size: int, channels: int, patch_nums: Sequence[int], beta: float = COMMITMENT_BETA,
                 quant_resi: float = 0.5, share_quant_resi: int = 4, phi_count: int = 0):
        super().__init__()
        self.vocab_size = vocab_size
        self.channels = channels
        self.patch_nums = tuple(patch_nums)
        self.beta = beta
        if share_quant_resi == 0:
            count = phi_count or len(self.patch_nums)
            self.quant_resi = NonSharedPhis(make_phi(channels, quant_resi) for _ in range(count))
        elif share_quant_resi == 1:
            count = 1
            self.quant_resi = SharedPhi(make_phi(channels, quant_resi))
        else:
            count = share_quant_resi
            self.quant_resi = PartiallySharedPhis([make_phi(channels, quant_resi) for _ in range(count)])
        self.phi_index = tuple(phi_indices(len(self.patch_nums), count))
        # EMA of per-scale code hits, kept in checkpoints so a resumed trainer keeps its dead-code statistics.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.usage_updates = 0
        self.embedding = nn.Embedding(vocab_size, channels)

    def extra_repr(self) -> str:
        return f"patch_nums={self.patch_nums}, beta={self.beta}, phi_index={self.phi_index}"

    def phi(self, scale_index: int) -> nn.Module:
        """The φ module (a `Phi` conv, or the identity) used at scale `scale_index`."""
        return self.quant_resi.phis[self.phi_index[scale_index]]

    # ----- pieces shared by every path -----

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codebook vectors of one scale's tokens (B, p*p), row-major → (B, C, p, p)."""
        batch, length = tokens.shape
        side = round(length ** 0.5)
        return self.embedding(tokens).view(batch, side, side, self.channels).permute(0, 3, 1, 2)  # (B, C, p, p)

    def _upsample_and_phi(self, scale_index: int, h: torch.Tensor) -> torch.Tensor:
        """Bicubic-upsample one scale's codes (B, C, p, p) to the finest side (except at the last scale), apply φ."""
        finest = self.patch_nums[-1]
        if scale_index != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(finest, finest), mode="bicubic")  # (B, C, H, W)
        # contiguous as in the official code, so φ's conv sums in the same order and near-tie tokens agree exactly
        return self.phi(scale_index)(h.contiguous())  # (B, C, H, W)

    def _nearest_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook vector (squared L2) for each row of `vectors` (N, C) → (N,)."""
        codebook = self.embedding.weight.detach()  # (V, C)
        squared_norms = vectors.square().sum(1, keepdim=True) + codebook.square().sum(1)  # (N, V)
        distances = torch.addmm(squared_norms, vectors, codebook.T, beta=1, alpha=-2)  # (N, V)
        return distances.argmin(1)  # (N,)

    def _check_features(self, f: torch.Tensor) -> None:
        finest = self.patch_nums[-1]
        if f.dim() != 4 or f.shape[1] != self.channels or f.shape[2:] != (finest, finest):
            raise ValueError(f"features of shape {tuple(f.shape)} do not fit this quantizer: expected "
                            f"(B, {self.channels}, {finest}, {finest}); the last patch_num must equal the latent side")

    def _check_tokens(self, tokens: Sequence[torch.Tensor], scale_count: int) -> None:
        if not scale_count <= len(tokens) <= len(self.patch_nums):
            raise ValueError(f"got token maps for {len(tokens)} scales, need {scale_count} "
                            f"(patch_nums={self.patch_nums})")
        for scale_index, (scale_tokens, side) in enumerate(zip(tokens[:scale_count], self.patch_nums)):
            if scale_tokens.dim() != 2 or scale_tokens.shape[1] != side * side:
                raise ValueError(f"tokens of scale {scale_index} have shape {tuple(scale_tokens.shape)}, "
                                f"expected (B, {side * side}) for patch_nums={self.patch_nums}")

    def _residual_quantization(self, f: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Quantize f (B, C, H, W), treated as a constant; yield (tokens (B, p*p), cumulative f̂ (B, C, H, W))
        after each scale. f̂ carries gradients into the codebook and φ, never into f."""
        batch = f.shape[0]
        residual = f.detach().clone()  # (B, C, H, W)
        f_hat = torch.zeros_like(residual)  # (B, C, H, W)
        last = len(self.patch_nums) - 1
        for scale_index, side in enumerate(self.patch_nums):
            coarse = residual if scale_index == last else F.interpolate(residual, size=(side, side), mode="area")
            vectors = coarse.permute(0, 2, 3, 1).reshape(-1, self.channels)  # (B*p*p, C)
            tokens = self._nearest_codes(vectors).view(batch, side * side)  # (B, p*p)
            h = self._upsample_and_phi(scale_index, self.embed_tokens(tokens))  # (B, C, H, W)
            f_hat = f_hat + h  # (B, C, H, W)
            residual = residual - h.detach()  # (B, C, H, W)
            yield tokens, f_hat

    # ----- training -----

    def forward(self, f: torch.Tensor) -> QuantizerOutput:
        """Quantize encoder features for tokenizer training (computed in float32, autocast off).

        Args:
            f: features (B, C, H, W), H = W = patch_nums[-1].

        Returns:
            `QuantizerOutput(f_hat, loss, vocab_hits)`; pass `vocab_hits` (summed over processes) to
            `record_usage` to keep the per-scale usage statistics.
        """
        self._check_features(f)
        with torch.autocast(device_type=f.device.type, enabled=False):
            f = f.float()  # (B, C, H, W)
            target = f.detach()  # (B, C, H, W)
            loss = f.new_zeros(())
            hits = []
            for tokens, f_hat in self._residual_quantization(f):
                hits.append(tokens.flatten().bincount(minlength=self.vocab_size).float())  # (V,)
                # beta pulls the encoder towards its codes; the second term moves codes and φ towards f.
                loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, target)
            f_hat = (f_hat.detach() - target) + f  # (B, C, H, W) value f̂, gradient d/df = identity
        return QuantizerOutput(f_hat, loss / len(self.patch_nums), torch.stack(hits))

    @torch.no_grad()
    def record_usage(self, vocab_hits: torch.Tensor) -> None:
        """Fold one step's hit counts (scales, vocab) into the EMA buffer `ema_vocab_hit_SV`.

        In data-parallel training, all-reduce (sum) `vocab_hits` first so every process keeps the same EMA.
        """
        if self.usage_updates == 0:
            self.ema_vocab_hit_SV.copy_(vocab_hits)
        else:
            momentum = USAGE_FAST_MOMENTUM if self.usage_updates < USAGE_FAST_UPDATES else USAGE_SLOW_MOMENTUM
            self.ema_vocab_hit_SV.mul_(momentum).add_(vocab_hits, alpha=1 - momentum)
        self.usage_updates += 1

    def codebook_usage(self, min_hits: float) -> torch.Tensor:
        """Percent of codes whose EMA hit count is at least `min_hits`, per scale → (scales,).

        The official trainer logs this with min_hits = 0.08 · (global batch · H · W) / vocab_size.
        """
        return (self.ema_vocab_hit_SV >= min_hits).float().mean(1) * 100  # (S,)

    def dead_codes(self, min_hits: float) -> torch.Tensor:
        """Codes below `min_hits` EMA hits at every scale (candidates for re-initialisation) → bool (vocab,)."""
        return (self.ema_vocab_hit_SV < min_hits).all(0)  # (V,)

    # ----- tokens ↔ features -----

    def features_to_tokens(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Tokens of each scale for features f (B, C, H, W) → list of LongTensor (B, p*p), row-major."""
        self._check_features(f)
        # Nearest-code search in float32 even under autocast: half-precision distances would flip near-ties.
        with torch.autocast(device_type=f.device.type, enabled=False):
            return [tokens for tokens, _ in self._residual_quantization(f.float())]

    def embeddings_to_features(self, embeddings: Sequence[torch.Tensor],
                               all_scales: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Sum of φ(upsampled codes) over scales.

        Args:
            embeddings: one (B, C, p, p) map of codebook vectors (or soft mixtures of them) per scale.
            all_scales: also return the cumulative f̂ after every scale.

        Returns:
            f̂ (B, C, H, W), or the list of cumulative f̂ after each scale when `all_scales`.
        """
        finest = self.patch_nums[-1]
        f_hat = embeddings[0].new_zeros(embeddings[0].shape[0], self.channels, finest, finest)  # (B, C, H, W)
        cumulative = []
        for scale_index, h in enumerate(embeddings):
            f_hat = f_hat + self._upsample_and_phi(scale_index, h)  # (B, C, H, W)
            cumulative.append(f_hat)
        return cumulative if all_scales else f_hat

    def tokens_to_features(self, tokens: Sequence[torch.Tensor],
                           all_scales: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """f̂ (B, C, H, W) from the tokens of every scale (list of (B, p*p)); with `all_scales`, the list of
        cumulative f̂ after each scale."""
        self._check_tokens(tokens, len(self.patch_nums))
        return self.embeddings_to_features([self.embed_tokens(t) for t in tokens], all_scales)

    def next_autoregressive_input(self, scale_index: int, f_hat: torch.Tensor,
                                  h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One generation step: add scale `scale_index` to f̂ and give the next scale's input.

        Args:
            scale_index: the scale just sampled (0-based).
            f_hat: cumulative features so far (B, C, H, W); not modified.
            h: embedded tokens of that scale (B, C, p, p).

        Returns:
            (new f̂ (B, C, H, W), new f̂ area-downsampled to the next scale (B, C, p', p'), or f̂ itself at the
            last scale).
        """
        f_hat = f_hat + self._upsample_and_phi(scale_index, h)  # (B, C, H, W)
        if scale_index == len(self.patch_nums) - 1:
            return f_hat, f_hat
        side = self.patch_nums[scale_index + 1]
        return f_hat, F.interpolate(f_hat, size=(side, side), mode="area")  # (B, C, p', p')

    def tokens_to_var_input(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of the VAR transformer.

        Args:
            tokens: per-scale tokens (B, p*p); only the first len(patch_nums) − 1 scales are used.

        Returns:
            (B, L − p_1², C): for k = 1 … K−1, the cumulative f̂ after scales < k+1 area-downsampled to p_{k+1},
            flattened row-major, concatenated over k.
        """
        scale_count = len(self.patch_nums)
        self._check_tokens(tokens, scale_count - 1)
        finest = self.patch_nums[-1]
        batch = tokens[0].shape[0]
        f_hat = self.embedding.weight.new_zeros(batch, self.channels, finest, finest)  # (B, C, H, W)
        inputs = [f_hat.new_zeros(batch, 0, self.channels)]  # keeps the result defined for a single scale
        for scale_index in range(scale_count - 1):
            h = self.embed_tokens(tokens[scale_index])  # (B, C, p, p)
            f_hat, next_input = self.next_autoregressive_input(scale_index, f_hat, h)  # (B, C, p', p')
            inputs.append(next_input.flatten(2).transpose(1, 2))  # (B, p'*p', C)
        return torch.cat(inputs, dim=1)  # (B, L - p_1², C)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # As officially: usage statistics recorded for another number of scales (e.g. the 256px checkpoint used
        # with another schedule) are training statistics only, so keep ours instead of failing the load.
        key = prefix + "ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape[0] != self.ema_vocab_hit_SV.shape[0]:
            state_dict[key] = self.ema_vocab_hit_SV
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
