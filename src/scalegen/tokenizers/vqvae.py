"""VAR's multi-scale VQVAE tokenizer: encoder → quant_conv → multi-scale quantizer → post_quant_conv → decoder.

State-dict keys match the official `vae_ch160v4096z32.pth`, which loads with `strict=True` into `build_vqvae()`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from scalegen.errors import UserError
from scalegen.tokenizers.quantizer import COMMITMENT_BETA, MultiScaleQuantizer
from scalegen.tokenizers.vqvae_layers import DEFAULT_NORM_GROUPS, Decoder, Encoder

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
OFFICIAL_VOCAB_SIZE = 4096
OFFICIAL_Z_CHANNELS = 32


@dataclass
class VQVAEConfig:
    """Everything needed to rebuild a tokenizer; stored in checkpoints (`dataclasses.asdict`)."""

    vocab_size: int = OFFICIAL_VOCAB_SIZE
    z_channels: int = OFFICIAL_Z_CHANNELS
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    share_quant_resi: int = 4  # 0: φ per scale, 1: one φ, n ≥ 2: n φ shared over scales
    quant_resi: float = 0.5  # φ(h) = (1 − quant_resi)·h + quant_resi·conv(h)
    phi_count: int = 0  # with share_quant_resi = 0: number of φ (0 = one per scale)
    beta: float = COMMITMENT_BETA
    in_channels: int = 3
    dropout: float = 0.0
    norm_groups: int = DEFAULT_NORM_GROUPS
    use_attention: bool = True  # attention blocks at the lowest resolution
    use_mid_attention: bool = True
    quant_conv_kernel_size: int = 3

    def __post_init__(self):
        # Checkpoints round-trip through JSON-like dicts where tuples come back as lists.
        self.ch_mult = tuple(self.ch_mult)
        self.patch_nums = tuple(self.patch_nums)
        if not self.patch_nums or any(int(p) != p or p < 1 for p in self.patch_nums):
            raise UserError(f"patch_nums {self.patch_nums} must be positive integers, coarse to fine, e.g. 1,2,3,4,6,8")
        if not self.ch_mult:
            raise UserError("ch_mult must list at least one width multiplier, e.g. 1,2,2")
        if self.share_quant_resi < 0:
            raise UserError(f"share_quant_resi is {self.share_quant_resi}; use 0 (per scale), 1 (one) or n ≥ 2")

    @property
    def downsample_ratio(self) -> int:
        """Image side / latent side: every level but the last halves the resolution."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        """The image side this tokenizer encodes: the finest scale times the downsample ratio."""
        return self.patch_nums[-1] * self.downsample_ratio


class VQVAEOutput(NamedTuple):
    """Training output of `VQVAE.forward`."""

    reconstruction: torch.Tensor  # (B, in_channels, H, W), not clamped
    quantizer_loss: torch.Tensor  # scalar
    vocab_hits: torch.Tensor  # (scales, vocab) code hits of this batch, for `quantize.record_usage`


class VQVAE(nn.Module):
    """Multi-scale VQVAE tokenizer of VAR.

    Args:
        config: the architecture; kept as `self.config` so checkpoints can rebuild the model.
    """

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        layers = dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                      z_channels=config.z_channels, in_channels=config.in_channels, norm_groups=config.norm_groups,
                      dropout=config.dropout, use_attention=config.use_attention,
                      use_mid_attention=config.use_mid_attention)
        self.encoder = Encoder(**layers)
        self.decoder = Decoder(**layers)
        self.quantize = MultiScaleQuantizer(config.vocab_size, config.z_channels, config.patch_nums, config.beta,
                                            config.quant_resi, config.share_quant_resi, config.phi_count)
        kernel = config.quant_conv_kernel_size
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, kernel, padding=kernel // 2)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, kernel, padding=kernel // 2)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.config.patch_nums

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def z_channels(self) -> int:
        return self.config.z_channels

    @property
    def downsample_ratio(self) -> int:
        return self.config.downsample_ratio

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def _check_image(self, img: torch.Tensor) -> None:
        size, ratio = self.image_size, self.downsample_ratio
        if img.dim() != 4 or img.shape[1] != self.config.in_channels:
            raise ValueError(f"image batch of shape {tuple(img.shape)}: expected (B, {self.config.in_channels}, H, W)")
        height, width = img.shape[2:]
        if height % ratio or width % ratio:
            raise ValueError(f"image size {height}x{width} is not divisible by the tokenizer's downsample ratio "
                            f"{ratio}; resize images to {size}x{size}")
        if height != size or width != size:
            raise ValueError(f"this tokenizer encodes {size}x{size} images (last patch_num {self.patch_nums[-1]} × "
                            f"ratio {ratio}), got {height}x{width}; resize, or rebuild it with patch_nums ending in "
                            f"{height // ratio}")

    def img_to_features(self, img: torch.Tensor) -> torch.Tensor:
        """Continuous features f = quant_conv(encoder(img)) of images (B, in_channels, H, W) → (B, C, h, w)."""
        self._check_image(img)
        return self.quant_conv(self.encoder(img))  # (B, C, h, w)

    def forward(self, img: torch.Tensor) -> VQVAEOutput:
        """Training pass on images in [-1, 1] (B, in_channels, H, W).

        Returns:
            `VQVAEOutput(reconstruction, quantizer_loss, vocab_hits)`; the reconstruction is not clamped.
        """
        f_hat, quantizer_loss, vocab_hits = self.quantize(self.img_to_features(img))  # (B, C, h, w)
        reconstruction = self.decoder(self.post_quant_conv(f_hat))  # (B, in_channels, H, W)
        return VQVAEOutput(reconstruction, quantizer_loss, vocab_hits)

    @torch.no_grad()
    def img_to_tokens(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Tokens of images in [-1, 1] (B, in_channels, H, W) → list of LongTensor (B, p*p), row-major, per scale."""
        return self.quantize.features_to_tokens(self.img_to_features(img))

    def features_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode quantized features (B, C, h, w) → images (B, in_channels, H, W) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)  # (B, in_channels, H, W)

    def tokens_to_img(self, tokens: Sequence[torch.Tensor],
                      all_scales: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Decode per-scale tokens (list of (B, p*p)) → images (B, in_channels, H, W) in [-1, 1].

        With `all_scales`, a list with the image decoded from the cumulative f̂ after each scale.
        """
        if all_scales:
            return [self.features_to_img(f_hat) for f_hat in self.quantize.tokens_to_features(tokens, all_scales=True)]
        return self.features_to_img(self.quantize.tokens_to_features(tokens))

    def tokens_to_var_input(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of VAR (B, L − p_1², z_channels); see `MultiScaleQuantizer.tokens_to_var_input`."""
        return self.quantize.tokens_to_var_input(tokens)


def build_vqvae(vocab_size: int = OFFICIAL_VOCAB_SIZE, z_channels: int = OFFICIAL_Z_CHANNELS, ch: int = 160, patch_nums: Sequence[int] = PATCH_NUMS_256,
                share_quant_resi: int = 4, quant_resi: float = 0.5, **more) -> VQVAE:
    """Build a tokenizer; the defaults are the official 256px `vae_ch160v4096z32` (108.95M parameters).

    Args:
        vocab_size, z_channels, ch, patch_nums, share_quant_resi, quant_resi: see `VQVAEConfig`.
        **more: any other `VQVAEConfig` field (ch_mult, num_res_blocks, in_channels, norm_groups, …).

    Returns:
        The `VQVAE`, randomly initialised.
    """
    unknown = set(more) - set(VQVAEConfig.__dataclass_fields__)
    if unknown:
        valid = sorted(VQVAEConfig.__dataclass_fields__)
        raise UserError(f"unknown tokenizer option(s) {sorted(unknown)}; valid options: {valid}")
    return VQVAE(VQVAEConfig(vocab_size=vocab_size, z_channels=z_channels, ch=ch, patch_nums=tuple(patch_nums),
                             share_quant_resi=share_quant_resi, quant_resi=quant_resi, **more))
