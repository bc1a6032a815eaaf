"""A KL autoencoder of our own: Stable Diffusion's VAE architecture at any size, in diffusers' `AutoencoderKL` layout.

encoder → quant_conv → a diagonal Gaussian (mean, log-variance) → a latent sample → post_quant_conv → decoder.
The encoder and decoder are diffusers' own blocks, and the module's state-dict keys are `AutoencoderKL`'s, so
`to_autoencoder_kl` gives a diffusers model with the same weights (`--vae`, the diffusers export) and a diffusers
AutoencoderKL's weights load into a `KLVAE` of its shape.

A DiT diffuses the *normalised* latents: (sample − shift) · scale per channel (`LatentNormalization`), the statistics
measured over the data (or, end to end, REPA-E's batch-norm running statistics).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scalegen.errors import UserError

DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
ACTIVATION = "silu"
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


@dataclass
class KLVAEConfig:
    """Everything needed to rebuild a KL tokenizer; stored in checkpoints (`dataclasses.asdict`).

    Fields:
        in_channels: image channels (the decoder outputs as many).
        latent_channels: channels of the latent map.
        ch, ch_mult: the width of each resolution level is ch · ch_mult[level]; every level but the last halves it.
        num_res_blocks: residual blocks per level (diffusers' `layers_per_block`).
        norm_groups: GroupNorm groups (divide every level width).
        use_attention: the attention block in the middle of encoder and decoder (SD's VAE has it).
        image_size: image side in pixels.
    """

    in_channels: int = 3
    latent_channels: int = 4
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    use_attention: bool = True
    image_size: int = 256

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)  # JSON gives lists back
        if not self.ch_mult:
            raise UserError("ch_mult must list at least one width multiplier, e.g. 1,2,2")
        bad = [width for width in self.block_out_channels if width % self.norm_groups]
        if bad:
            raise UserError(f"level width {bad[0]} is not a multiple of --norm-groups {self.norm_groups}; "
                            "pick --ch and --norm-groups so that every level's width divides")
        if self.image_size % self.downsample_ratio:
            raise UserError(f"--image-size {self.image_size} is not a multiple of the downsampling "
                            f"{self.downsample_ratio} of {len(self.ch_mult)} levels; use fewer --ch-mult levels")

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.ch * multiplier for multiplier in self.ch_mult)

    @property
    def downsample_ratio(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_ratio

    def diffusers_config(self) -> dict:
        """The `AutoencoderKL` constructor arguments of this architecture."""
        levels = len(self.ch_mult)
        return {"in_channels": self.in_channels, "out_channels": self.in_channels,
                "down_block_types": (DOWN_BLOCK,) * levels, "up_block_types": (UP_BLOCK,) * levels,
                "block_out_channels": self.block_out_channels, "layers_per_block": self.num_res_blocks,
                "act_fn": ACTIVATION, "latent_channels": self.latent_channels, "norm_num_groups": self.norm_groups,
                "sample_size": self.image_size, "mid_block_add_attention": self.use_attention}


class KLVAE(nn.Module):
    """The KL tokenizer. `forward` returns what training needs; `encode_moments` / `decode` what a codec needs."""

    def __init__(self, config: KLVAEConfig):
        super().__init__()
        from diffusers.models.autoencoders.vae import Decoder, Encoder

        self.config = config
        settings = config.diffusers_config()
        self.encoder = Encoder(
            in_channels=config.in_channels, out_channels=config.latent_channels,
            down_block_types=settings["down_block_types"], block_out_channels=config.block_out_channels,
            layers_per_block=config.num_res_blocks, norm_num_groups=config.norm_groups, act_fn=ACTIVATION,
            double_z=True, mid_block_add_attention=config.use_attention,
        )
        self.decoder = Decoder(
            in_channels=config.latent_channels, out_channels=config.in_channels,
            up_block_types=settings["up_block_types"], block_out_channels=config.block_out_channels,
            layers_per_block=config.num_res_blocks, norm_num_groups=config.norm_groups, act_fn=ACTIVATION,
            mid_block_add_attention=config.use_attention,
        )
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> the posterior's mean and log-variance, each (B, c, h, w)."""
        moments = self.quant_conv(self.encoder(images))  # (B, 2c, h, w)
        mean, logvar = moments.chunk(2, dim=1)  # (B, c, h, w) each
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, c, h, w) -> images (B, C, H, W), about [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(latents))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) -> reconstruction (B, C, H, W), posterior mean and log-variance and the drawn latents,
        each (B, c, h, w) (the draw uses the global RNG)."""
        mean, logvar = self.encode_moments(images)  # (B, c, h, w) each
        latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)  # (B, c, h, w)
        return self.decode(latents), mean, logvar, latents


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, 1)) per latent element, averaged: (B, c, h, w) each -> ()."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


@torch.no_grad()
def to_autoencoder_kl(tokenizer: KLVAE, normalization: "LatentNormalization | None" = None) -> nn.Module:
    """The same network as a diffusers `AutoencoderKL` (scaling_factor 1). With a normalisation, it is folded into
    the 1×1 convolutions around the latents, exactly: the autoencoder's posterior is then over the *normalised*
    latents (mean (μ − shift)·scale, log-variance + 2·log scale) and its decoder takes them, as a DiT diffuses them."""
    from diffusers import AutoencoderKL

    autoencoder = AutoencoderKL(**tokenizer.config.diffusers_config(), scaling_factor=1.0)
    weights = {name: tensor.clone() for name, tensor in tokenizer.state_dict().items()}
    if normalization is not None:
        channels = tokenizer.config.latent_channels
        shift, scale = normalization.shift.flatten(), normalization.scale.flatten()  # (c,) each
        # quant_conv: rows [:c] give μ -> (μ − shift)·scale; rows [c:] give log σ² -> log σ² + 2 log scale.
        row_scale = torch.cat([scale, torch.ones(channels)])  # (2c,)
        row_shift = torch.cat([-shift * scale, 2 * scale.log()])  # (2c,)
        weights["quant_conv.weight"] = weights["quant_conv.weight"] * row_scale.view(-1, 1, 1, 1)
        weights["quant_conv.bias"] = weights["quant_conv.bias"] * row_scale + row_shift
        # post_quant_conv takes z = z_normalised / scale + shift.
        weight = weights["post_quant_conv.weight"]  # (c, c, 1, 1)
        weights["post_quant_conv.bias"] = weights["post_quant_conv.bias"] + weight[:, :, 0, 0] @ shift
        weights["post_quant_conv.weight"] = weight / scale.view(1, -1, 1, 1)
    autoencoder.load_state_dict(weights, strict=True)
    return autoencoder.eval()


class LatentNormalization(nn.Module):
    """Per-channel (latents − shift) · scale: what a DiT diffuses. Buffers `shift` and `scale`, each (1, c, 1, 1)."""

    def __init__(self, shift: torch.Tensor | list[float], scale: torch.Tensor | list[float]):
        super().__init__()
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.shift) * self.scale  # (B, c, h, w)

    def inverse(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale + self.shift  # (B, c, h, w)

    def description(self) -> dict:
        """JSON-able, as stored in a DiT's config ("latent_shift", "latent_scale")."""
        return {"latent_shift": self.shift.flatten().tolist(), "latent_scale": self.scale.flatten().tolist()}

    @classmethod
    def from_description(cls, description: dict) -> "LatentNormalization":
        return cls(description["latent_shift"], description["latent_scale"])

    @classmethod
    def from_batch_norm(cls, norm: nn.BatchNorm2d) -> "LatentNormalization":
        """The normalisation a batch norm without affine parameters applies at inference (its running statistics)."""
        return cls(norm.running_mean.detach().clone(), torch.rsqrt(norm.running_var.detach() + norm.eps))
