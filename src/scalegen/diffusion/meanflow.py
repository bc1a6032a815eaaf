"""MeanFlow (Geng et al. 2025): one-step generation by learning the average velocity u(z_t, r, t) over [r, t].

On the linear interpolant z_t = (1 − t)·x + t·ε (flow.py), the average velocity satisfies the MeanFlow identity
u(z_t, r, t) = v(z_t, t) − (t − r)·d/dt u(z_t, r, t), with d/dt u = v·∂_z u + ∂_t u, a Jacobian-vector product taken
with `torch.func.jvp` along the tangent (v, 1, 0). The network is trained on the identity's right-hand side, held
fixed (stop-gradient), with the paper's adaptive weight 1 / (‖Δ‖² + c)^p. Sampling jumps: z_r = z_t − (t − r)·u, one
network call for the whole path (or a few, e.g. two halves).

The network sees t·TIME_SCALE, as a flow DiT does, and the interval t − r as it is (the paper's (t, t − r)
conditioning): the target holds the network's derivative in t, and the interval's sinusoids at DDPM's ×1000 scale made
that derivative grow until a fine-tuning run diverged (its squared error rose 2 → 120 in 450 steps). r = t makes it an
instantaneous-velocity (flow) model, so the "euler" sampler integrates it as one. Guidance is folded into
training as the paper does (κ = 0): the target velocity of a conditional example is ω·v + (1 − ω)·u(z_t, t, t | ∅),
so a MeanFlow model samples with cfg 1 (the guidance is already in it).

Examples with r < t are the first ⌈fraction·B⌉ of the (shuffled) batch: only they pay for the JVP; the others are a
plain flow-matching forward, run last, so REPA's block tap holds their tokens (the batch's last examples).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from scalegen.diffusion.flow import LinearFlow, TimeSampling, check_time_sampling, logit_normal_or_uniform
from scalegen.diffusion.objective import TIME_SCALE, GuidanceInterval, ModelFunction, Objective
from scalegen.errors import UserError

INTERVAL_SCALE = 1.0  # the network sees t − r unscaled (see above)


@dataclass(frozen=True)
class MeanFlow(Objective):
    """The MeanFlow objective and its samplers.

    Args:
        time_sampling, logit_mean, logit_std: how t and r are drawn (two draws, t the larger; the paper's
            logit-normal(−0.4, 1)).
        mean_fraction: the share of examples trained with r < t (the paper's 25 %); the rest have r = t.
        weighting_power, weighting_constant: the adaptive weight 1 / (‖Δ‖² + c)^p (p = 1, c = 10⁻³ as the paper).
        guidance: ω of the guidance folded into training (1: none).
        guidance_interval: the noise levels t at which that guidance is trained in (None: all).
        num_classes: the null class's id (guided training drops labels itself, to know which are dropped).
        class_dropout: the share of labels replaced by the null class in guided training.
    """

    time_sampling: TimeSampling = "logit-normal"
    logit_mean: float = -0.4
    logit_std: float = 1.0
    mean_fraction: float = 0.25
    weighting_power: float = 1.0
    weighting_constant: float = 1e-3
    guidance: float = 1.0
    guidance_interval: GuidanceInterval | None = None
    num_classes: int = 1000
    class_dropout: float = 0.1

    name = "meanflow"
    summary = "MeanFlow: the average velocity over [r, t], for one- or few-step sampling"
    samplers = {
        "meanflow": "average-velocity jumps z_r = z_t - (t - r)·u: one network call a step (1 or 2 steps)",
        "euler": "Euler ODE steps on the instantaneous velocity u(z, t, t)",
    }
    fast_sampler = "meanflow"
    default_steps, default_cfg = 1, 1.0  # guidance is trained in
    time_inputs = 2
    forward_mode = True

    def __post_init__(self) -> None:
        check_time_sampling(self.time_sampling, self.logit_std)
        if not 0.0 <= self.mean_fraction <= 1.0:
            raise UserError(f"--mean-fraction is {self.mean_fraction}; it must be in [0, 1]")
        if self.guidance < 1.0:
            raise UserError(f"--train-cfg is {self.guidance}; it must be at least 1 (1: no guidance)")

    def sample_times(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r), each (batch,): two draws with t the larger; the last examples after the first
        `mean_examples(batch)` get r = t."""
        draws = torch.stack([logit_normal_or_uniform(self.time_sampling, self.logit_mean, self.logit_std, batch, device)
                             for _ in range(2)])  # (2, B)
        t, r = draws.max(dim=0).values, draws.min(dim=0).values  # (B,), (B,)
        averaged = torch.arange(batch, device=device) < self.mean_examples(batch)  # (B,)
        return t, torch.where(averaged, r, t)  # (B,), (B,)

    def mean_examples(self, batch: int) -> int:
        """How many of a batch's first examples have r < t (at least one example keeps r = t for REPA's tap)."""
        return min(round(self.mean_fraction * batch), batch - 1)

    def guided_velocity(self, model: ModelFunction, z: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor,
                        labels: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """The training target's velocity (B, C, H, W): ω·v + (1 − ω)·u(z_t, t, t | ∅) for kept labels inside the
        guidance interval, v itself elsewhere."""
        if self.guidance == 1.0:
            return velocity
        low, high = self.guidance_interval or (0.0, 1.0)
        inside = (t >= low) & (t <= high)  # (B,)
        weight = torch.where(inside & ~dropped, self.guidance, 1.0).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        with torch.no_grad():
            null = torch.full_like(labels, self.num_classes)  # (B,)
            unconditional = model(z, t * TIME_SCALE, y=null, interval=torch.zeros_like(t), drop_labels=False)
        return weight * velocity + (1 - weight) * unconditional  # (B, C, H, W)

    def training_losses(self, model: ModelFunction, x_start: torch.Tensor,
                        model_kwargs: dict) -> dict[str, torch.Tensor]:
        """Adaptively weighted MeanFlow loss ("loss") and the unweighted squared error per element ("mse"), (B,)."""
        batch = len(x_start)
        noise = torch.randn_like(x_start)  # (B, C, H, W)
        t, r = self.sample_times(batch, x_start.device)  # (B,), (B,)
        labels = model_kwargs["y"]  # (B,)
        dropped = torch.zeros_like(labels, dtype=torch.bool)  # (B,)
        if self.guidance != 1.0:  # the labels are dropped here, to know which (the network is told not to)
            dropped = torch.rand(batch, device=labels.device) < self.class_dropout  # (B,)
            labels = torch.where(dropped, self.num_classes, labels)  # (B,)
        z = LinearFlow.interpolate(x_start, noise, t)  # (B, C, H, W)
        velocity = self.guided_velocity(model, z, t, noise - x_start, labels, dropped)  # (B, C, H, W)
        split = self.mean_examples(batch)
        outputs, targets = [], []
        if split:
            # DDP's wrapper cannot run under forward-mode AD; its bare module shares the parameters, and DDP reduces
            # each parameter's gradient once it is summed over both forwards (the plain one below goes through DDP).
            network = getattr(model, "module", model)

            def average_velocity(z_mean: torch.Tensor, t_mean: torch.Tensor, r_mean: torch.Tensor) -> torch.Tensor:
                return network(z_mean, t_mean * TIME_SCALE, y=labels[:split], interval=(t_mean - r_mean) * INTERVAL_SCALE,
                             drop_labels=self.guidance == 1.0)  # (k, C, H, W)

            tangents = (velocity[:split], torch.ones_like(t[:split]), torch.zeros_like(r[:split]))
            with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no forward-mode derivative
                output, derivative = jvp(average_velocity, (z[:split], t[:split], r[:split]), tangents)
            gap = (t[:split] - r[:split]).view(-1, 1, 1, 1)  # (k, 1, 1, 1)
            outputs.append(output)
            targets.append(velocity[:split] - gap * derivative)  # (k, C, H, W)
        outputs.append(model(z[split:], t[split:] * TIME_SCALE, y=labels[split:], interval=torch.zeros_like(t[split:]),
                             drop_labels=self.guidance == 1.0))  # (B − k, C, H, W)
        targets.append(velocity[split:])
        output, target = torch.cat(outputs), torch.cat(targets).detach()  # (B, C, H, W) each
        error = ((output - target) ** 2).flatten(1)  # (B, C·H·W)
        squared_norm = error.sum(dim=1)  # (B,): ‖Δ‖², as the paper's weight sees it
        weight = 1.0 / (squared_norm.detach() + self.weighting_constant) ** self.weighting_power  # (B,)
        return {"loss": weight * squared_norm, "mse": error.mean(dim=1)}

    def sample_loop(self, model: ModelFunction, noise: torch.Tensor, steps: int, sampler: str, model_kwargs: dict,
                    clip_denoised: bool, learn_sigma: bool, progress: bool) -> Iterator[dict[str, torch.Tensor]]:
        """`steps` equal jumps from t = 1 to 0 with the average velocity ("meanflow"), or Euler steps on the
        instantaneous one ("euler"); "pred_xstart" is z_t − t·u of each step's call."""
        sampler = self.check_sampler(sampler)
        times = LinearFlow.step_times(steps)
        x = noise  # (B, C, H, W)
        for index in tqdm(range(steps)) if progress else range(steps):
            time, next_time = times[index], times[index + 1]
            gap = (time - next_time) if sampler == "meanflow" else 0.0
            t = torch.full((len(x),), time * TIME_SCALE, device=x.device)  # (B,)
            interval = torch.full((len(x),), gap * INTERVAL_SCALE, device=x.device)  # (B,)
            with torch.no_grad():
                average = model(x, t, interval=interval, **model_kwargs)  # (B, C, H, W)
                start = x - time * average  # (B, C, H, W)
                x = x - (time - next_time) * average  # (B, C, H, W)
            yield {"sample": x, "pred_xstart": start}

    def call_levels(self, sampler: str, steps: int) -> list[float]:
        """One call at each step's t."""
        return LinearFlow.step_times(steps)[:-1]
