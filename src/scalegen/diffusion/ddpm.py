"""The DiT paper's objective: DDPM ε-prediction (with a learned variance when the network has the channels), t
uniform over the 1000 steps, optionally min-SNR-γ weighting (Hang et al. 2023); sampled on a respaced diffusion
with ancestral DDPM (the official sampler), DDIM (η = 0) or DPM-Solver++ (2M).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch

from scalegen.diffusion.dpm_solver import dpm_solver_sample_loop_progressive
from scalegen.diffusion.math import LINEAR_BETA_END, LINEAR_BETA_START, REFERENCE_NUM_STEPS, schedule_on_device
from scalegen.diffusion.names import OBJECTIVE_ENTRIES
from scalegen.diffusion.objective import ModelFunction, Objective
from scalegen.diffusion.respace import SpacedDiffusion, create_diffusion, space_timesteps
from scalegen.diffusion.settings import LOSS_WEIGHTINGS, DDPMSettings, LossWeighting
from scalegen.errors import UserError

DIFFUSERS_SCHEDULER_CLASS = "DDPMScheduler"


@dataclass(frozen=True)
class DDPMObjective(Objective):
    """ε-prediction on DiT's linear 1000-step schedule (the official `GaussianDiffusion`).

    Args:
        learn_sigma: the network also predicts the variance interpolation (trained through the VLB term).
        loss_weighting: "min-snr" weights the ε loss by min(SNR, γ)/SNR; "none" is the paper's.
        snr_gamma: γ of min-SNR.
    """

    learn_sigma: bool = True
    loss_weighting: LossWeighting = DDPMSettings.loss_weighting  # the defaults are the settings' (one source)
    snr_gamma: float = DDPMSettings.snr_gamma

    name = "ddpm"
    summary, samplers = OBJECTIVE_ENTRIES[name].summary, OBJECTIVE_ENTRIES[name].samplers
    fast_sampler = "ddim"
    default_steps, default_cfg = 250, 4.0  # the official sample.py's
    min_steps = 2
    learns_sigma = True
    guides_official_channels = True

    def __post_init__(self) -> None:
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise UserError(f"unknown --loss-weighting {self.loss_weighting!r}; use one of {', '.join(LOSS_WEIGHTINGS)}")
        if not self.snr_gamma > 0:  # NaN too
            raise UserError(f"--snr-gamma is {self.snr_gamma}; it must be positive")

    @cached_property
    def diffusion(self) -> SpacedDiffusion:
        """The training diffusion: every one of the 1000 steps."""
        return create_diffusion("", learn_sigma=self.learn_sigma)

    def training_losses(self, model: ModelFunction, x_start: torch.Tensor,
                        model_kwargs: dict) -> dict[str, torch.Tensor]:
        """The official loss at steps t drawn uniformly ("loss", "mse" and, with a learned σ, "vb", each (B,))."""
        t = torch.randint(0, self.diffusion.num_timesteps, (x_start.shape[0],), device=x_start.device)  # (B,)
        terms = self.diffusion.training_losses(model, x_start, t, model_kwargs=model_kwargs)
        if self.loss_weighting == "min-snr":
            terms["loss"] = self.min_snr_weights(t) * terms["mse"] + terms.get("vb", 0.0)  # (B,)
        return terms

    def min_snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """min(SNR_t, γ) / SNR_t for step indices t (B,), with SNR = ᾱ / (1 − ᾱ)."""
        alphas_cumprod = schedule_on_device(self.diffusion.alphas_cumprod, t.device)[t]  # (B,)
        snr = alphas_cumprod / (1 - alphas_cumprod)  # (B,)
        return snr.clamp(max=self.snr_gamma) / snr  # (B,)

    @staticmethod
    def respacing(sampler: str, steps: int) -> str:
        """The respacing string of a sampler's diffusion: DDIM's evenly strided steps, else DiT's sections."""
        return f"ddim{steps}" if sampler == "ddim" else str(steps)

    def sample_loop(self, model: ModelFunction, noise: torch.Tensor, steps: int, sampler: str, model_kwargs: dict,
                    clip_denoised: bool, learn_sigma: bool, progress: bool) -> Iterator[dict[str, torch.Tensor]]:
        """Ancestral DDPM, DDIM or DPM-Solver++ over `steps` respaced steps (x̂₀ clipped to [-1, 1] when asked)."""
        diffusion = create_diffusion(self.respacing(sampler, steps), learn_sigma=learn_sigma)
        if sampler == "dpm-solver++":
            return dpm_solver_sample_loop_progressive(diffusion, model, noise, clip_denoised, model_kwargs, progress)
        loop = diffusion.ddim_sample_loop_progressive if sampler == "ddim" else diffusion.p_sample_loop_progressive
        return loop(model, noise.shape, noise=noise, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                    progress=progress)

    def call_levels(self, sampler: str, steps: int) -> list[float]:
        """The kept steps, from the noisiest, as fractions of the 1000."""
        kept = sorted(space_timesteps(REFERENCE_NUM_STEPS, self.respacing(sampler, steps)), reverse=True)
        return [step / REFERENCE_NUM_STEPS for step in kept]

    def diffusers_scheduler(self, learn_sigma: bool) -> dict:
        """The `DDPMScheduler` config of DiT's 1000-step linear schedule.

        DiTPipeline drops a learned-variance DiT's variance channels before the scheduler sees them, so such a DiT
        samples with the posterior variance β̃_t (fixed_small, the lower end of its learned range); a DiT without them
        keeps β_t (fixed_large), as scalegen samples it. "linspace" spacing picks the steps of DiT's respacing (0 and
        999 included).
        """
        return {
            "_class_name": DIFFUSERS_SCHEDULER_CLASS, "num_train_timesteps": REFERENCE_NUM_STEPS,
            "beta_schedule": "linear", "beta_start": LINEAR_BETA_START, "beta_end": LINEAR_BETA_END,
            "clip_sample": False, "prediction_type": "epsilon", "timestep_spacing": "linspace",
            "variance_type": "fixed_small" if learn_sigma else "fixed_large",
        }
