"""Class-conditional sampling of a diffusion model with classifier-free guidance, decoded to images in [0, 1].

The official sample.py, as one call: the batch is doubled with the null class when guiding, the chosen loop
(ancestral DDPM or DDIM with eta 0) runs on the respaced diffusion, and the latents are decoded.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from functools import partial
from typing import Literal, Protocol

import torch

from scalegen.data import to_unit_range
from scalegen.diffusion.gaussian import GaussianDiffusion

Sampler = Literal["ddpm", "ddim"]
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")


class Decoder(Protocol):
    """What turns a diffusion model's latents into pixels: an SD VAE or one of our tokenizers."""

    guide_all_channels: bool  # whether guidance may touch every latent channel (the official code guides three)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, c, h, w) -> images (B, C, H, W) in [-1, 1]."""


@torch.no_grad()
def guided_steps(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    labels: torch.Tensor,
    cfg_scale: float,
    sampler: Sampler,
    decoder: Decoder | None,
    noise: torch.Tensor | None = None,
    guide_all_channels: bool = False,
    progress: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Run the sampler step by step, yielding each step's "sample" and "pred_xstart" latents (B, C, h, w).

    Args:
        model: a DiT (its `config`, `forward` and `forward_with_cfg`), in eval mode.
        diffusion: the (respaced) diffusion whose loop runs.
        labels: class ids (B,), on the model's device.
        cfg_scale: classifier-free guidance scale; 1.0 means no guidance (and no doubled batch).
        sampler: "ddpm" (ancestral) or "ddim" (eta 0).
        decoder: the latent space's decoder; None for a pixel-space model (x0 predictions are then clipped).
        noise: starting noise (B, C, h, w); drawn from the global torch RNG when None.
        guide_all_channels: guide every ε channel instead of the official first three (always, for a decoder
            whose `guide_all_channels` says so).
        progress: show a progress bar.
    """
    config = model.config
    guide_all_channels = guide_all_channels or (decoder is not None and decoder.guide_all_channels)
    shape = (len(labels), config.in_channels, config.input_size, config.input_size)
    latents = noise if noise is not None else torch.randn(shape, device=labels.device)  # (B, C, h, w)
    guided = cfg_scale > 1.0
    if guided:
        latents = torch.cat([latents, latents], dim=0)  # (2B, C, h, w)
        labels = torch.cat([labels, torch.full_like(labels, config.num_classes)], dim=0)  # (2B,)
        forward = partial(model.forward_with_cfg, cfg_scale=cfg_scale, guide_all_channels=guide_all_channels)
    else:
        forward = model.forward
    loop = diffusion.ddim_sample_loop_progressive if sampler == "ddim" else diffusion.p_sample_loop_progressive
    # Pixels live in [-1, 1], so x0 predictions are clipped there (ADM's default); SD latents are unbounded (DiT).
    for output in loop(forward, latents.shape, noise=latents, clip_denoised=decoder is None,
                       model_kwargs={"y": labels}, progress=progress):
        yield {key: output[key].chunk(2, dim=0)[0] if guided else output[key] for key in ("sample", "pred_xstart")}


def decode(latents: torch.Tensor, decoder: Decoder | None) -> torch.Tensor:
    """Latents (B, c, h, w) -> images (B, C, H, W) in [0, 1] (pixel-space latents are the images)."""
    images = decoder.decode(latents) if decoder is not None else latents  # (B, C, H, W) in [-1, 1]
    return to_unit_range(images)  # (B, C, H, W)


@torch.no_grad()
def sample_with_guidance(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    labels: torch.Tensor,
    cfg_scale: float,
    sampler: Sampler,
    decoder: Decoder | None,
    noise: torch.Tensor | None = None,
    guide_all_channels: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Draw images of the given classes (arguments as `guided_steps`).

    Returns:
        Images (B, C, H, W) in [0, 1].
    """
    steps = guided_steps(model, diffusion, labels, cfg_scale, sampler, decoder, noise, guide_all_channels, progress)
    return decode(deque(steps, maxlen=1).pop()["sample"], decoder)  # only the last step is kept alive
