"""Class-conditional sampling of a diffusion model with classifier-free guidance, decoded to images in [0, 1].

The official sample.py, as one call: the batch is doubled with the null class when guiding, the chosen loop runs
and the latents are decoded. A DDPM-trained model (objective "ddpm") samples with ancestral DDPM, DDIM (eta 0) or
DPM-Solver++ (2M) on the respaced diffusion; a flow-matching model ("flow") with an Euler or Heun ODE step or
Euler–Maruyama.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Literal, Protocol

import torch

from scalegen.data import to_unit_range
from scalegen.diffusion.dpm_solver import dpm_solver_sample_loop_progressive
from scalegen.diffusion.flow import FLOW_SAMPLERS, LinearFlow
from scalegen.diffusion.gaussian import GaussianDiffusion

Objective = Literal["ddpm", "flow"]
OBJECTIVES: tuple[str, ...] = ("ddpm", "flow")
Sampler = Literal["ddpm", "ddim", "dpm-solver++", "euler", "heun", "euler-maruyama"]
DDPM_SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpm-solver++")
OBJECTIVE_SAMPLERS = {"ddpm": DDPM_SAMPLERS, "flow": FLOW_SAMPLERS}
SAMPLERS: tuple[str, ...] = DDPM_SAMPLERS + FLOW_SAMPLERS
DEFAULT_SAMPLERS = {"ddpm": "ddpm", "flow": "euler"}  # the official sampler; the simplest ODE step
FAST_SAMPLERS = {"ddpm": "ddim", "flow": "euler"}  # what the demo and the page draw with: one network call a step


@dataclass(frozen=True)
class SamplingPlan:
    """Which loop draws the samples: the process it runs on (a respaced diffusion or the flow), the sampler, and
    the number of steps."""

    process: GaussianDiffusion | LinearFlow
    sampler: Sampler
    steps: int


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
        plan: the process, sampler and steps (`sampling_plan`).
        labels: class ids (B,), on the model's device.
        cfg_scale: classifier-free guidance scale; 1.0 means no guidance (and no doubled batch).
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
    for output in sample_loop(plan, forward, latents, {"y": labels}, clip_denoised=decoder is None, progress=progress):
        yield {key: output[key].chunk(2, dim=0)[0] if guided else output[key] for key in ("sample", "pred_xstart")}


def sample_loop(
    plan: SamplingPlan, forward, noise: torch.Tensor, model_kwargs: dict, clip_denoised: bool, progress: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    """The plan's loop from `noise` (B, C, h, w), yielding each step's "sample" and "pred_xstart".

    Pixels live in [-1, 1], so a diffusion's x0 predictions are clipped there when `clip_denoised` (ADM's default);
    SD latents are unbounded (DiT). The flow's ODE and SDE steps never clip.
    """
    process = plan.process
    if isinstance(process, LinearFlow):
        return process.sample_loop_progressive(forward, noise, plan.steps, plan.sampler, model_kwargs, progress)
    if plan.sampler == "dpm-solver++":
        return dpm_solver_sample_loop_progressive(process, forward, noise, clip_denoised, model_kwargs, progress)
    loop = process.ddim_sample_loop_progressive if plan.sampler == "ddim" else process.p_sample_loop_progressive
    return loop(forward, noise.shape, noise=noise, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                progress=progress)


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
