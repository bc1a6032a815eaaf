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

Each example has r < t with probability `mean_fraction` (the paper's per-example draw; r = t otherwise), so the share
is right at every micro-batch size. Only those examples pay for the JVP, taken without autograd: the target is held
fixed anyway, so the loss's gradient needs only the network's plain forward, which then runs once on the whole batch
(through DDP's wrapper, with gradient checkpointing where it is on, and last, so REPA's block tap holds every example).
MeanFlow drops the labels itself (`class_dropout`, by the label embedder's `drop_labels`), so that the JVP and that
forward see the same labels.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from scalegen.diffusion.flow import LinearFlow, check_time_sampling, logit_normal_or_uniform
from scalegen.diffusion.names import OBJECTIVE_ENTRIES, GuidanceInterval
from scalegen.diffusion.objective import TIME_SCALE, ModelFunction, Objective, drop_labels
from scalegen.diffusion.settings import MeanFlowSettings, TimeSampling
from scalegen.errors import UserError

INTERVAL_SCALE = 1.0  # the network sees t − r unscaled (see above)


@dataclass(frozen=True)
class MeanFlow(Objective):
    """The MeanFlow objective and its samplers.

    Args:
        time_sampling, logit_mean, logit_std: how t and r are drawn (two draws, t the larger; the paper's
            logit-normal(−0.4, 1)).
        mean_fraction: the probability that an example is trained with r < t (the paper's 25 %); r = t otherwise.
        weighting_power, weighting_constant: the adaptive weight 1 / (‖Δ‖² + c)^p (p = 1, c = 10⁻³ as the paper).
        guidance: ω of the guidance folded into training (1: none).
        guidance_interval: the noise levels t at which that guidance is trained in (None: all).
        num_classes: the null class's id (training drops labels itself: see above).
        class_dropout: the share of labels replaced by the null class in training.
    """

    # The paper's time sampling for a Python user; the command line's default is MeanFlowSettings' (uniform, as every
    # flow-type objective's), so `--objective meanflow` alone differs from `MeanFlow()` here, as it always has.
    time_sampling: TimeSampling = "logit-normal"
    logit_mean: float = -0.4
    logit_std: float = MeanFlowSettings.logit_std
    mean_fraction: float = MeanFlowSettings.mean_fraction
    weighting_power: float = MeanFlowSettings.weighting_power
    weighting_constant: float = MeanFlowSettings.weighting_constant
    guidance: float = MeanFlowSettings.guidance
    guidance_interval: GuidanceInterval | None = None
    num_classes: int = 1000
    class_dropout: float = 0.1

    name = "meanflow"
    summary, samplers = OBJECTIVE_ENTRIES[name].summary, OBJECTIVE_ENTRIES[name].samplers
    fast_sampler = "meanflow"
    default_steps, default_cfg = 1, 1.0  # guidance is trained in
    time_inputs = 2
    forward_mode = True

    def __post_init__(self) -> None:
        check_time_sampling(self.time_sampling, self.logit_std)
        if not 0.0 <= self.mean_fraction <= 1.0:
            raise UserError(f"--mean-fraction is {self.mean_fraction}; it must be in [0, 1]")
        if not self.guidance >= 1.0:  # NaN too
            raise UserError(f"--train-cfg is {self.guidance}; it must be at least 1 (1: no guidance)")

    def sample_times(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, r), each (batch,) on `device`: two draws with t the larger, of which each example keeps r < t with
        probability `mean_fraction` (r = t otherwise); and those examples' indices (k,), drawn on the host so that
        their count reads nothing from the device."""
        draws = torch.stack([logit_normal_or_uniform(self.time_sampling, self.logit_mean, self.logit_std, batch, device)
                             for _ in range(2)])  # (2, B)
        t, r = draws.max(dim=0).values, draws.min(dim=0).values  # (B,), (B,)
        averaged = torch.rand(batch) < self.mean_fraction  # (B,) on the host
        # Host-to-device copies that need not wait for the device's queue.
        r = torch.where(averaged.to(device, non_blocking=True), r, t)  # (B,)
        return t, r, averaged.nonzero().squeeze(1)  # (B,), (B,), (k,)

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

    def time_derivative(self, model: ModelFunction, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                        velocity: torch.Tensor, labels: torch.Tensor, averaged: torch.Tensor) -> torch.Tensor:
        """d/dt u(z_t, r, t) = v·∂_z u + ∂_t u (B, C, H, W) of the examples `averaged` (k,) (zero elsewhere): a JVP
        along (v, 1, 0), without autograd (the target it enters is held fixed)."""
        derivative = torch.zeros_like(z)  # (B, C, H, W)
        if not len(averaged):
            return derivative
        averaged = averaged.to(z.device, non_blocking=True)  # (k,)
        # DDP's wrapper cannot run under forward-mode AD; its bare module shares the parameters (and this pass, without
        # autograd, leaves DDP's gradient reduction to the plain forward).
        network = getattr(model, "module", model)

        def average_velocity(z_mean: torch.Tensor, t_mean: torch.Tensor, r_mean: torch.Tensor) -> torch.Tensor:
            return network(z_mean, t_mean * TIME_SCALE, y=labels[averaged], interval=(t_mean - r_mean) * INTERVAL_SCALE,
                           drop_labels=False)  # (k, C, H, W)

        primals = (z[averaged], t[averaged], r[averaged])  # (k, C, H, W), (k,), (k,)
        tangents = (velocity[averaged], torch.ones_like(primals[1]), torch.zeros_like(primals[2]))
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no forward-mode rule
            _, along = jvp(average_velocity, primals, tangents)  # (k, C, H, W)
        return derivative.index_copy(0, averaged, along)  # (B, C, H, W)

    def training_losses(self, model: ModelFunction, x_start: torch.Tensor,
                        model_kwargs: dict) -> dict[str, torch.Tensor]:
        """Adaptively weighted MeanFlow loss ("loss") and the unweighted squared error per element ("mse"), (B,)."""
        batch = len(x_start)
        noise = torch.randn_like(x_start)  # (B, C, H, W)
        t, r, averaged = self.sample_times(batch, x_start.device)  # (B,), (B,), (k,)
        labels = model_kwargs["y"]  # (B,)
        # The labels are dropped here, so that every pass sees the same ones (and guidance knows which are dropped).
        labels, dropped = drop_labels(labels, self.class_dropout, self.num_classes)  # (B,), (B,)
        z = LinearFlow.interpolate(x_start, noise, t)  # (B, C, H, W)
        velocity = self.guided_velocity(model, z, t, noise - x_start, labels, dropped)  # (B, C, H, W)
        gap = (t - r).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        target = velocity - gap * self.time_derivative(model, z, t, r, velocity, labels, averaged)  # (B, C, H, W)
        # The loss's only path to the weights: one plain forward of the whole batch.
        output = model(z, t * TIME_SCALE, y=labels, interval=(t - r) * INTERVAL_SCALE,
                       drop_labels=False)  # (B, C, H, W)
        error = ((output - target.detach()) ** 2).flatten(1)  # (B, C·H·W)
        squared_norm = error.sum(dim=1)  # (B,): ‖Δ‖², as the paper's weight sees it
        weight = 1.0 / (squared_norm.detach() + self.weighting_constant) ** self.weighting_power  # (B,)
        return {"loss": weight * squared_norm, "mse": error.mean(dim=1)}

    def sampling_cfg(self, cfg: float) -> float:
        """1 for a model with guidance trained in (ω > 1: it is already in the model), else `cfg`."""
        return 1.0 if self.guidance > 1.0 else cfg

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
