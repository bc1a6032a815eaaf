"""DPM-Solver++ (2M) (Lu et al. 2022) for a DDPM-trained model: a multistep solver of the probability-flow ODE in
its data-prediction form, good samples in 10–25 steps.

Between two kept steps s → t of a (respaced) diffusion, with α = √ᾱ, σ = √(1 − ᾱ), λ = log(α/σ) and h = λ_t − λ_s,
x_t = (σ_t/σ_s)·x_s − α_t·(e^{−h} − 1)·D, where D is the model's x̂₀ (first order, which is exactly DDIM with η = 0)
or, from the second step on, the extrapolation (1 + 1/2r)·x̂₀(s) − 1/2r·x̂₀(previous) with r = h_previous / h.
The last step goes to ᾱ = 1 (σ = 0) and lands on x̂₀, as DDIM's does.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm


class DiscreteDiffusion(Protocol):
    """What the solver needs of a (respaced) `GaussianDiffusion`."""

    num_timesteps: int
    alphas_cumprod: np.ndarray  # (T,) ᾱ of each step
    alphas_cumprod_prev: np.ndarray  # (T,) ᾱ of the step before (1 before the first)

    def p_mean_variance(self, model: Callable[..., Any], x: torch.Tensor, t: torch.Tensor, clip_denoised: bool,
                        denoised_fn: None = None, model_kwargs: dict | None = None) -> dict[str, Any]:
        """The model's prediction at steps t, "pred_xstart" among it."""


def dpm_solver_sample_loop_progressive(
    diffusion: DiscreteDiffusion, model: Callable[..., Any], noise: torch.Tensor, clip_denoised: bool = True,
    model_kwargs: dict | None = None, progress: bool = False, order: int = 2,
) -> Iterator[dict[str, torch.Tensor]]:
    """Run DPM-Solver++ over every step of `diffusion` (respace it for few steps), from x_T = `noise` (B, C, H, W),
    yielding each step's "sample" and "pred_xstart" (B, C, H, W).

    Args:
        diffusion: the (respaced) diffusion whose steps are the solver's grid.
        model, clip_denoised, model_kwargs: as for `GaussianDiffusion.p_mean_variance` (x̂₀ is clipped to [-1, 1]
            when asked, before the solver uses it).
        progress: show a progress bar.
        order: 2 for the 2M solver, 1 for its first-order form (DDIM).
    """
    if order not in (1, 2):
        raise ValueError(f"DPM-Solver++ here has order 1 or 2, not {order}")
    x = noise  # (B, C, H, W)
    previous_start: torch.Tensor | None = None
    previous_step = math.nan
    steps = list(range(diffusion.num_timesteps))[::-1]
    for index in tqdm(steps) if progress else steps:
        t = torch.full((len(x),), index, dtype=torch.long, device=x.device)  # (B,)
        with torch.no_grad():
            start = diffusion.p_mean_variance(model, x, t, clip_denoised, model_kwargs=model_kwargs)["pred_xstart"]
        alpha_bar, alpha_bar_next = diffusion.alphas_cumprod[index], diffusion.alphas_cumprod_prev[index]
        if alpha_bar_next >= 1.0:
            x = start  # σ = 0: the clean estimate itself
        else:
            alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
            alpha_next, sigma_next = math.sqrt(alpha_bar_next), math.sqrt(1.0 - alpha_bar_next)
            step = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)  # h = λ_next − λ
            denoised = start  # (B, C, H, W)
            if order == 2 and previous_start is not None:
                ratio = previous_step / step
                denoised = (1 + 0.5 / ratio) * start - (0.5 / ratio) * previous_start  # (B, C, H, W)
            x = (sigma_next / sigma) * x - alpha_next * math.expm1(-step) * denoised  # (B, C, H, W)
            previous_step = step
        previous_start = start
        yield {"sample": x, "pred_xstart": start}
