"""A continuous multi-scale tokenizer: a KL tokenizer's normalised latents taken to VAR's scale plan, no quantizer.

The latent f (B, c, h, w) (the posterior mean, normalised per channel: `LatentNormalization`) becomes K token maps of
growing side p_1 < … < p_K = h, each token a continuous vector of c channels (a flow head's target, not a codebook id):

- "residual" (VAR's plan, the default): scale k's tokens are the residual still to explain, r = f − f̂, area-downsampled
  to p_k×p_k; they are bicubic-upsampled back and added to f̂. With no φ convolution and no rounding to a codebook the
  last scale takes the residual itself, so the sum over scales gives back f (exactly, up to the float rounding of one
  subtraction and one addition).
- "downsampled" (FlowAR's plan): scale k's tokens are f itself area-downsampled to p_k×p_k; f̂ after scale k is
  their upsampling (each scale replaces the last, the finest is f).

Each scale's tokens are divided by their spread over the data (`ContinuousScalePlan.token_scale`, the root mean
square of that scale's tokens over the first `NORMALIZATION_IMAGES` images, measured with the latents' normalisation by
`measure_token_scales`): the residuals left at the fine scales are small (variance 0.04–0.29 on the shipped KL
tokenizer), and a flow head draws its tokens from N(0, 1) noise, so it sees every scale at unit size.

`ContinuousScalePlan` has the quantizer's interface that the VAR and its generation use (`patch_nums`, `channels`,
`tokens_to_features`, `next_autoregressive_input`, `tokens_to_var_input`), and `ContinuousScales` the VQVAE's
(`img_to_tokens`, `tokens_to_img`, `tokens_to_var_input`, `features_to_img`, `quantize`), so a VAR trains and samples
on it through its token head (`models/flow_head.py`). Per-scale error of both plans on the shipped KL tokenizer:
bench/continuous_scales.py (bench/README.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from scalegen.data.source import unflipped_loader
from scalegen.errors import UserError
from scalegen.tokenizers.kl_vae import KLVAE, KLVAEConfig, LatentNormalization

ScalePlan = Literal["residual", "downsampled"]
SCALE_PLANS: tuple[str, ...] = get_args(ScalePlan)
# VAR upsamples each scale's codes to the finest side bicubically (its quantizer); the continuous plans do the same.
UPSAMPLING = "bicubic"
# Token grid sides a default plan takes below the latent side (VAR-like: every side to 4, then growing about 1.5×).
SCALE_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
# A continuous tokenizer has no codebook: its "vocabulary size", as a VAR's config records it.
NO_VOCABULARY = 0
NORMALIZATION_IMAGES = 2048  # images whose posterior means set the latents' per-channel normalisation
# Where a `ContinuousScales` state dict holds that normalisation.
NORMALIZATION_SHIFT, NORMALIZATION_SCALE = "normalization.shift", "normalization.scale"
TOKEN_SCALE = "quantize.token_scale"  # and each scale's spread
NORMALIZATION_BATCH_SIZE = 256


def default_patch_nums(latent_side: int) -> tuple[int, ...]:
    """The scale plan for a latent side: the ladder's sides below it, then the side itself (8 -> 1,2,3,4,6,8)."""
    return tuple(side for side in SCALE_LADDER if side < latent_side) + (latent_side,)


@dataclass
class ContinuousScalesConfig(KLVAEConfig):
    """A KL tokenizer's architecture (`KLVAEConfig`'s fields) with its scale plan; stored in a VAR run's config.

    Fields:
        patch_nums: token grid side per scale, coarse to fine; the last is the latent side.
        plan: "residual" (VAR's) or "downsampled" (FlowAR's), see the module's docstring.
    """

    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    plan: ScalePlan = "residual"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.patch_nums = tuple(self.patch_nums)
        check_patch_nums(self.patch_nums, self.latent_size)
        if self.plan not in SCALE_PLANS:
            raise UserError(f"unknown scale plan {self.plan!r}: use one of {', '.join(SCALE_PLANS)}")


def check_patch_nums(patch_nums: Sequence[int], latent_side: int) -> None:
    """A one-line error unless the sides grow from at least 1 and end at the latent side."""
    ordered = all(0 < coarse < fine for coarse, fine in zip(patch_nums, patch_nums[1:]))
    if not patch_nums or patch_nums[0] < 1 or not ordered or patch_nums[-1] != latent_side:
        raise UserError(f"the scales (--patch-nums) {tuple(patch_nums)} must grow from 1 or more and end at the "
                        f"latent side {latent_side}, e.g. {','.join(map(str, default_patch_nums(latent_side)))}")


class ContinuousScalePlan(nn.Module):
    """The continuous tokens of a latent map and back, by scale (the quantizer's interface, without codes).

    A scale's tokens are its map divided by `token_scale[k]` (a buffer, 1 until measured: `measure_token_scales`).

    Args:
        channels: latent channels c (each token's dimension).
        patch_nums: token grid side per scale; the last is the latent side.
        plan: "residual" or "downsampled".
    """

    def __init__(self, channels: int, patch_nums: Sequence[int], plan: ScalePlan = "residual") -> None:
        super().__init__()
        self.channels = channels
        self.patch_nums = tuple(patch_nums)
        self.plan = plan
        self.register_buffer("token_scale", torch.ones(len(self.patch_nums)))  # (K,)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """One scale's tokens (B, p*p, c), row-major -> their map (B, c, p, p)."""
        batch, length, channels = tokens.shape
        side = round(length ** 0.5)
        return tokens.transpose(1, 2).reshape(batch, channels, side, side)  # (B, c, p, p)

    def _upsample(self, scale_index: int, h: torch.Tensor) -> torch.Tensor:
        """One scale's map (B, c, p, p) at the finest side (the last scale is there already)."""
        finest = self.patch_nums[-1]
        if scale_index == len(self.patch_nums) - 1:
            return h  # (B, c, H, W)
        return F.interpolate(h, size=(finest, finest), mode=UPSAMPLING)  # (B, c, H, W)

    def _accumulate(self, scale_index: int, f_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """f̂ after a scale of tokens h (B, c, p, p): the sum so far plus its upsampled map (residual), or the map
        alone (downsampled)."""
        return self._accumulate_map(scale_index, f_hat, h * self.token_scale[scale_index].to(h.dtype))

    def _accumulate_map(self, scale_index: int, f_hat: torch.Tensor, latent_map: torch.Tensor) -> torch.Tensor:
        """`_accumulate` of a scale's map in the latents' units (its tokens times the scale's spread)."""
        upsampled = self._upsample(scale_index, latent_map)  # (B, c, H, W)
        return f_hat + upsampled if self.plan == "residual" else upsampled

    def features_to_tokens(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Tokens of each scale for latents f (B, c, H, W) -> list of (B, p*p, c), row-major."""
        finest = self.patch_nums[-1]
        if f.dim() != 4 or f.shape[1] != self.channels or tuple(f.shape[2:]) != (finest, finest):
            raise ValueError(f"latents of shape {tuple(f.shape)} do not fit these scales: expected "
                             f"(B, {self.channels}, {finest}, {finest})")
        f_hat = torch.zeros_like(f)  # (B, c, H, W)
        tokens = []
        for scale_index, side in enumerate(self.patch_nums):
            explained = f - f_hat if self.plan == "residual" else f  # (B, c, H, W)
            coarse = explained if side == finest else F.interpolate(explained, size=(side, side), mode="area")
            scale = self.token_scale[scale_index].to(coarse.dtype)
            tokens.append(coarse.flatten(2).transpose(1, 2) / scale)  # (B, p*p, c)
            f_hat = self._accumulate_map(scale_index, f_hat, coarse)  # (B, c, H, W), exact: not via the tokens
        return tokens

    def tokens_to_features(self, tokens: Sequence[torch.Tensor],
                           all_scales: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """f̂ (B, c, H, W) of every scale's tokens (list of (B, p*p, c)); with `all_scales`, f̂ after each scale."""
        finest = self.patch_nums[-1]
        f_hat = tokens[0].new_zeros(tokens[0].shape[0], self.channels, finest, finest)  # (B, c, H, W)
        cumulative = []
        for scale_index, scale_tokens in enumerate(tokens):
            f_hat = self._accumulate(scale_index, f_hat, self.embed_tokens(scale_tokens))  # (B, c, H, W)
            cumulative.append(f_hat)
        return cumulative if all_scales else f_hat

    def next_autoregressive_input(self, scale_index: int, f_hat: torch.Tensor,
                                  h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One generation step: f̂ (B, c, H, W) after scale `scale_index` of its map h (B, c, p, p), and f̂
        area-downsampled to the next scale (B, c, p', p') (f̂ itself at the last scale)."""
        f_hat = self._accumulate(scale_index, f_hat, h)  # (B, c, H, W)
        if scale_index == len(self.patch_nums) - 1:
            return f_hat, f_hat
        side = self.patch_nums[scale_index + 1]
        return f_hat, F.interpolate(f_hat, size=(side, side), mode="area")  # (B, c, p', p')

    def tokens_to_var_input(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of the VAR (B, L − p_1², c): for k = 1 … K−1, f̂ after the scales before k+1,
        area-downsampled to p_{k+1}, flattened row-major, concatenated over k (as the quantizer's)."""
        finest = self.patch_nums[-1]
        batch = tokens[0].shape[0]
        f_hat = tokens[0].new_zeros(batch, self.channels, finest, finest)  # (B, c, H, W)
        inputs = [f_hat.new_zeros(batch, 0, self.channels)]  # keeps the result defined for a single scale
        for scale_index in range(len(self.patch_nums) - 1):
            h = self.embed_tokens(tokens[scale_index])  # (B, c, p, p)
            f_hat, next_input = self.next_autoregressive_input(scale_index, f_hat, h)  # (B, c, p', p')
            inputs.append(next_input.flatten(2).transpose(1, 2))  # (B, p'*p', c)
        return torch.cat(inputs, dim=1)  # (B, L - p_1², c)


class ContinuousScales(nn.Module):
    """A frozen KL tokenizer (`vae`) and its latents' normalisation (`normalization`, buffers) with a scale plan: the
    tokenizer a VAR with a flow head trains on (the VQVAE's token interface, tokens continuous).

    Args:
        config: the KL architecture and the scale plan.
    """

    def __init__(self, config: ContinuousScalesConfig) -> None:
        super().__init__()
        self.config = config
        self.vae = KLVAE(config)
        channels = config.latent_channels
        self.normalization = LatentNormalization(torch.zeros(channels), torch.ones(channels))
        self.quantize = ContinuousScalePlan(channels, config.patch_nums, config.plan)

    @classmethod
    def from_kl(cls, vae: KLVAE, normalization: LatentNormalization, patch_nums: Sequence[int],
                plan: ScalePlan = "residual") -> ContinuousScales:
        """The continuous tokenizer of a KL tokenizer's weights and a normalisation of its latents."""
        config = ContinuousScalesConfig(**vars(vae.config), patch_nums=tuple(patch_nums), plan=plan)
        tokenizer = cls(config)
        tokenizer.vae.load_state_dict(vae.state_dict())
        tokenizer.normalization.load_state_dict(normalization.state_dict())
        return tokenizer.to(normalization.shift.device)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.config.patch_nums

    @property
    def vocab_size(self) -> int:
        return NO_VOCABULARY

    @property
    def z_channels(self) -> int:
        return self.config.latent_channels

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def img_to_features(self, img: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> normalised posterior means (B, c, h, w) (deterministic)."""
        return self.normalization(self.vae.encode_moments(img)[0])  # (B, c, h, w)

    def img_to_tokens(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] -> list of (B, p*p, c) continuous tokens per scale (in float32, autocast off)."""
        with torch.autocast(device_type=img.device.type, enabled=False):
            return self.quantize.features_to_tokens(self.img_to_features(img.float()))

    def features_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, c, h, w) -> images (B, C, H, W) clamped to [-1, 1]."""
        return self.vae.decode(self.normalization.inverse(f_hat)).clamp(-1, 1)

    def tokens_to_img(self, tokens: Sequence[torch.Tensor],
                      all_scales: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Per-scale tokens (list of (B, p*p, c)) -> images (B, C, H, W) in [-1, 1]; with `all_scales`, the image of
        f̂ after each scale."""
        if all_scales:
            return [self.features_to_img(f_hat) for f_hat in self.quantize.tokens_to_features(tokens, all_scales=True)]
        return self.features_to_img(self.quantize.tokens_to_features(tokens))

    def tokens_to_var_input(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input (B, L − p_1², c) of a VAR (`ContinuousScalePlan.tokens_to_var_input`)."""
        return self.quantize.tokens_to_var_input(tokens)


@torch.no_grad()
def measure_mean_normalization(vae: KLVAE, dataset: Dataset, device: torch.device | str = "cpu",
                               count: int = NORMALIZATION_IMAGES) -> LatentNormalization:
    """Per-channel shift and scale (mean, 1 / std) of the posterior means over the first `count` images of
    `dataset`, unflipped: deterministic, so a resumed run (and every rank) measures the same."""
    vae = vae.to(device).eval()
    loader = unflipped_loader(dataset, NORMALIZATION_BATCH_SIZE, count)
    means = torch.cat([vae.encode_moments(batch.image.to(device))[0] for batch in loader if len(batch)])  # (N, c, h, w)
    channels = means.double().transpose(0, 1).flatten(1)  # (c, N·h·w)
    return LatentNormalization(channels.mean(dim=1).float(), (1.0 / channels.std(dim=1)).float()).to(device)


@torch.no_grad()
def measure_token_scales(tokenizer: ContinuousScales, dataset: Dataset, device: torch.device | str = "cpu",
                         count: int = NORMALIZATION_IMAGES) -> torch.Tensor:
    """Each scale's spread (K,): the root mean square of its tokens (with the tokenizer's latent normalisation, before
    any token scale) over the first `count` images of `dataset`, unflipped (deterministic, as the normalisation)."""
    loader = unflipped_loader(dataset, NORMALIZATION_BATCH_SIZE, count)
    plan = ContinuousScalePlan(tokenizer.quantize.channels, tokenizer.patch_nums, tokenizer.quantize.plan).to(device)
    squares = torch.zeros(len(tokenizer.patch_nums), dtype=torch.float64, device=device)  # (K,)
    elements = torch.zeros_like(squares)  # (K,)
    for batch in loader:
        if not len(batch):
            continue
        tokens = plan.features_to_tokens(tokenizer.img_to_features(batch.image.to(device)))  # K × (B, p², c)
        squares += torch.stack([scale_tokens.double().square().sum() for scale_tokens in tokens])
        elements += torch.tensor([scale_tokens.numel() for scale_tokens in tokens], device=device)
    return (squares / elements).sqrt().float()  # (K,)


def scales_round_trip(tokenizer: ContinuousScales, images: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] -> their continuous tokens -> images (B, C, H, W) in [-1, 1]."""
    return tokenizer.tokens_to_img(tokenizer.img_to_tokens(images))
