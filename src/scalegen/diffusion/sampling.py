"""Class-conditional sampling of a DiT with classifier-free guidance, decoded to images in [0, 1].

The official sample.py, as one call: the batch is doubled with the null class when guiding, the objective's sampler
runs (diffusion/objectives.py: each objective owns its samplers) and the latents are decoded. With a guidance
interval, steps whose noise level t lies outside it run the conditional half alone.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from scalegen.pixels import to_unit_range
from scalegen.diffusion.names import GuidanceInterval
from scalegen.diffusion.objective import TIME_SCALE, ModelFunction, Objective, within


@dataclass(frozen=True)
class SamplingPlan:
    """How samples are drawn: the model's objective, the sampler, its steps, and the noise levels at which guidance
    applies (None: every step)."""

    objective: Objective
    sampler: str
    steps: int
    cfg_interval: GuidanceInterval | None = None


class Decoder(Protocol):
    """What turns a diffusion model's latents into pixels: an SD VAE or one of our tokenizers."""

    guide_all_channels: bool  # whether guidance may touch every latent channel (the official code guides three)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, c, h, w) -> images (B, C, H, W) in [-1, 1]."""


@torch.no_grad()
def guided_steps(
    model: torch.nn.Module,
    plan: SamplingPlan,
    labels: torch.Tensor,
    cfg_scale: float,
    decoder: Decoder | None,
    noise: torch.Tensor | None = None,
    guide_all_channels: bool = False,
    progress: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Run the sampler step by step, yielding each step's "sample" and "pred_xstart" latents (B, C, h, w).

    Args:
        model: a DiT (its `config`, `forward` and `forward_with_cfg`), in eval mode.
        plan: the objective, sampler, steps and guidance interval (`DiT.sampling_setup`).
        labels: class ids (B,), on the model's device.
        cfg_scale: classifier-free guidance scale; 1.0 means no guidance (and no doubled batch).
        decoder: the latent space's decoder; None for a pixel-space model (x0 predictions are then clipped).
        noise: starting noise (B, C, h, w); drawn from the global torch RNG when None.
        guide_all_channels: guide every ε channel instead of the official first three (always for an objective
            other than ddpm, and for a decoder whose `guide_all_channels` says so).
        progress: show a progress bar.
    """
    config = model.config
    objective = plan.objective
    guide_all_channels = (guide_all_channels or not objective.guides_official_channels
                          or (decoder is not None and decoder.guide_all_channels))
    shape = (len(labels), config.in_channels, config.input_size, config.input_size)
    latents = noise if noise is not None else torch.randn(shape, device=labels.device)  # (B, C, h, w)
    guided = cfg_scale > 1.0
    if guided:
        latents = torch.cat([latents, latents], dim=0)  # (2B, C, h, w)
        labels = torch.cat([labels, torch.full_like(labels, config.num_classes)], dim=0)  # (2B,)
        forward = guided_forward(model, cfg_scale, plan.cfg_interval, guide_all_channels)
    else:
        forward = model.forward
    steps = objective.sample_loop(forward, latents, plan.steps, plan.sampler, {"y": labels},
                                  clip_denoised=decoder is None, learn_sigma=config.learn_sigma, progress=progress)
    for output in steps:
        yield {key: output[key].chunk(2, dim=0)[0] if guided else output[key] for key in ("sample", "pred_xstart")}


def guided_forward(model: torch.nn.Module, cfg_scale: float, interval: GuidanceInterval | None,
                   guide_all_channels: bool) -> ModelFunction:
    """The network on a batch laid out [conditional half; null-class half]: `forward_with_cfg` at noise levels inside
    the interval, the conditional half alone (its output copied to both halves) outside it."""

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        if interval is None or within(interval, float(t[0]) / TIME_SCALE):
            return model.forward_with_cfg(x, t, y, cfg_scale, guide_all_channels, **conditions)  # (2B, C_out, H, W)
        half = len(x) // 2
        output = model.forward(x[:half], t[:half], y[:half],
                               **{name: value[:half] for name, value in conditions.items()})  # (B, C_out, H, W)
        return torch.cat([output, output], dim=0)  # (2B, C_out, H, W)

    return forward


def decode(latents: torch.Tensor, decoder: Decoder | None) -> torch.Tensor:
    """Latents (B, c, h, w) -> images (B, C, H, W) in [0, 1] (pixel-space latents are the images)."""
    images = decoder.decode(latents) if decoder is not None else latents  # (B, C, H, W) in [-1, 1]
    return to_unit_range(images.float())  # (B, C, H, W), float32 even when sampled under autocast


@torch.no_grad()
def sample_with_guidance(
    model: torch.nn.Module,
    plan: SamplingPlan,
    labels: torch.Tensor,
    cfg_scale: float,
    decoder: Decoder | None,
    noise: torch.Tensor | None = None,
    guide_all_channels: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Draw images of the given classes (arguments as `guided_steps`).

    Returns:
        Images (B, C, H, W) in [0, 1].
    """
    steps = guided_steps(model, plan, labels, cfg_scale, decoder, noise, guide_all_channels, progress)
    return decode(deque(steps, maxlen=1).pop()["sample"], decoder)  # only the last step is kept alive
