"""Flow matching on the linear interpolant (SiT): x_t = (1 − t)·x + t·ε, the network predicting the velocity ε − x.

t = 0 is data, t = 1 is noise. Training draws t uniformly or from a logit-normal (SD3's "logit-normal": t = σ(m + s·n),
n ~ N(0, 1)), so the middle of the path, where the velocity is hardest to predict, is seen more often. Sampling
integrates from t = 1 to t = 0 with an Euler or a Heun ODE step, or with Euler–Maruyama on a reverse SDE that has
the same marginals.

The network is an unchanged DiT: it receives t·TIME_SCALE, so its sinusoidal timestep embedding works in the range a
DDPM DiT learns it in (SiT passes t ∈ [0, 1] as is, which uses only the slowest frequencies).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from scalegen.diffusion.math import mean_flat
from scalegen.diffusion.names import OBJECTIVE_ENTRIES
from scalegen.diffusion.objective import TIME_SCALE, ModelFunction, Objective
from scalegen.diffusion.settings import TIME_SAMPLINGS, FlowSettings, TimeSampling
from scalegen.errors import UserError


def logit_normal_or_uniform(time_sampling: TimeSampling, logit_mean: float, logit_std: float, batch: int,
                            device: torch.device) -> torch.Tensor:
    """Times (batch,) in [0, 1]: uniform, or σ(m + s·n) with n ~ N(0, 1) ("logit-normal")."""
    if time_sampling == "uniform":
        return torch.rand(batch, device=device)  # (B,)
    return torch.sigmoid(logit_mean + logit_std * torch.randn(batch, device=device))  # (B,)


def check_time_sampling(time_sampling: str, logit_std: float) -> None:
    """A one-line error for an unknown t sampling or a non-positive logit-normal scale."""
    if time_sampling not in TIME_SAMPLINGS:
        raise UserError(f"unknown t sampling {time_sampling!r}; use one of {', '.join(TIME_SAMPLINGS)}")
    if logit_std <= 0:
        raise UserError(f"the logit-normal's std is {logit_std}; it must be positive")


@dataclass(frozen=True)
class LinearFlow(Objective):
    """The linear flow-matching objective ("flow") and its samplers.

    Args:
        time_sampling: how training draws t: "uniform" on [0, 1] or "logit-normal".
        logit_mean, logit_std: the logit-normal's location and scale (SD3's defaults 0 and 1).
    """

    time_sampling: TimeSampling = FlowSettings.time_sampling  # the defaults are the settings' (one source)
    logit_mean: float = FlowSettings.logit_mean
    logit_std: float = FlowSettings.logit_std

    name = "flow"
    summary, samplers = OBJECTIVE_ENTRIES[name].summary, OBJECTIVE_ENTRIES[name].samplers
    fast_sampler = "euler"
    default_steps, default_cfg = 50, 4.0

    def __post_init__(self) -> None:
        check_time_sampling(self.time_sampling, self.logit_std)

    def sample_time(self, batch: int, device: torch.device) -> torch.Tensor:
        """Training times t (batch,) in [0, 1]."""
        return logit_normal_or_uniform(self.time_sampling, self.logit_mean, self.logit_std, batch, device)  # (B,)

    @staticmethod
    def interpolate(x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 − t)·x + t·ε for t (B,) and x, ε (B, C, H, W)."""
        t = t.view(-1, *([1] * (x_start.ndim - 1)))  # (B, 1, 1, 1)
        return (1 - t) * x_start + t * noise  # (B, C, H, W)

    def training_losses(
        self, model: ModelFunction, x_start: torch.Tensor, model_kwargs: dict | None = None,
        t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-example velocity MSE at times t (drawn when None): {"loss": (B,), "mse": (B,)}."""
        noise = torch.randn_like(x_start) if noise is None else noise  # (B, C, H, W)
        t = self.sample_time(len(x_start), x_start.device) if t is None else t  # (B,)
        x_t = self.interpolate(x_start, noise, t)  # (B, C, H, W)
        velocity = model(x_t, t * TIME_SCALE, **(model_kwargs or {}))  # (B, C, H, W)
        if velocity.shape != x_start.shape:
            raise ValueError(f"a flow model must output {tuple(x_start.shape)} (no learned σ), got "
                             f"{tuple(velocity.shape)}")
        mse = mean_flat((noise - x_start - velocity) ** 2)  # (B,)
        return {"loss": mse, "mse": mse}

    @staticmethod
    def predicted_start(x_t: torch.Tensor, velocity: torch.Tensor, t: float) -> torch.Tensor:
        """The clean sample the velocity points to: x̂ = x_t − t·v."""
        return x_t - t * velocity  # (B, C, H, W)

    def sample_loop(self, model: ModelFunction, noise: torch.Tensor, steps: int, sampler: str, model_kwargs: dict,
                    clip_denoised: bool, learn_sigma: bool, progress: bool) -> Iterator[dict[str, torch.Tensor]]:
        """The ODE or SDE steps of `sample_loop_progressive` (a flow never clips and has no variance channels)."""
        return self.sample_loop_progressive(model, noise, steps, sampler, model_kwargs, progress)

    @staticmethod
    def step_times(steps: int) -> list[float]:
        """t of each step's start and the final 0: `steps` equal steps from 1."""
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()

    def call_levels(self, sampler: str, steps: int) -> list[float]:
        """Each step's t; Heun also calls at the next step's t."""
        times = self.step_times(steps)
        if sampler != "heun":
            return times[:-1]
        return [level for index in range(steps) for level in times[index:index + 2]]

    def sample_loop_progressive(
        self, model: ModelFunction, noise: torch.Tensor, steps: int, sampler: str = "euler",
        model_kwargs: dict | None = None, progress: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Integrate from t = 1 (`noise`, (B, C, H, W)) to t = 0 in `steps` equal steps, yielding each step's
        "sample" and "pred_xstart" (B, C, H, W).

        Heun takes two network calls per step (the velocity at t = 0 is defined: its last step needs no exception).
        Euler–Maruyama follows the reverse SDE dx = (−v + g·∇log p) dt + √(2g) dW̄ with g(t) = t, which shares the
        ODE's marginals (the score follows from the velocity: t·∇log p = −(x_t + (1 − t)·v)); its last step adds no
        noise and lands on x̂.
        """
        sampler = self.check_sampler(sampler)
        kwargs = model_kwargs or {}

        def velocity_at(x: torch.Tensor, time: float) -> torch.Tensor:
            t = torch.full((len(x),), time * TIME_SCALE, device=x.device)  # (B,)
            return model(x, t, **kwargs)  # (B, C, H, W)

        times = self.step_times(steps)
        x = noise  # (B, C, H, W)
        for index in tqdm(range(steps)) if progress else range(steps):
            time, next_time = times[index], times[index + 1]
            step = time - next_time
            with torch.no_grad():
                velocity = velocity_at(x, time)  # (B, C, H, W)
                start = self.predicted_start(x, velocity, time)  # (B, C, H, W)
                if sampler == "euler":
                    x = x - step * velocity  # (B, C, H, W)
                elif sampler == "heun":
                    guess = x - step * velocity  # (B, C, H, W)
                    x = x - step * 0.5 * (velocity + velocity_at(guess, next_time))  # (B, C, H, W)
                elif index == steps - 1:
                    x = start  # the last Euler–Maruyama step: the denoised estimate, no noise
                else:
                    score_drift = -(x + (1 - time) * velocity)  # g·∇log p with g = t, (B, C, H, W)
                    x = x - step * (velocity - score_drift) + (2 * time * step) ** 0.5 * torch.randn_like(x)
            yield {"sample": x, "pred_xstart": start}
