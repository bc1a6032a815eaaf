"""The Gaussian diffusion's option types (mean, variance, loss) and the pure functions behind it: beta schedules,
Gaussian KL and decoder log-likelihood.

Numerically equal to the ADM / improved-DDPM code that DiT ships (``diffusion/diffusion_utils.py`` and the schedule
functions of ``gaussian_diffusion.py``).
"""

from __future__ import annotations

import enum
import math
from functools import lru_cache
from typing import Callable, Literal

import numpy as np
import torch

ScheduleName = Literal["linear", "squaredcos_cap_v2"]
SCHEDULE_CACHE_SIZE = 64  # schedule arrays kept on their devices (a diffusion has about a dozen)


class MeanType(enum.Enum):
    """What the model's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # the posterior mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise ε


class VarianceType(enum.Enum):
    """Where the reverse-step variance comes from."""

    LEARNED = enum.auto()  # the model outputs log σ² directly
    FIXED_SMALL = enum.auto()  # the posterior variance β̃_t
    FIXED_LARGE = enum.auto()  # β_t
    LEARNED_RANGE = enum.auto()  # the model outputs v in [-1, 1], interpolating log β̃_t .. log β_t


class LossType(enum.Enum):
    """Training objective."""

    MSE = enum.auto()  # MSE on the mean output (+ the VLB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # as MSE, with the VLB term scaled by T / 1000
    KL = enum.auto()  # the variational bound term alone
    RESCALED_KL = enum.auto()  # as KL, times T, to estimate the full bound

    def is_vb(self) -> bool:
        """Whether the loss is the variational bound alone."""
        return self in (LossType.KL, LossType.RESCALED_KL)


LEARNED_VARIANCES = (VarianceType.LEARNED, VarianceType.LEARNED_RANGE)

# Ho et al.'s linear schedule for 1000 steps; other step counts scale both ends so the process stays similar.
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
REFERENCE_NUM_STEPS = 1000
# The cosine schedule (improved DDPM) offsets t by this so that beta_0 is not vanishingly small ...
COSINE_OFFSET = 0.008
# ... and caps beta below 1 to avoid the singularity at the end of the chain.
COSINE_MAX_BETA = 0.999
# Half of one uint8 level in [-1, 1] data: the bin width of the discretised decoder.
HALF_BIN_WIDTH = 1.0 / 255.0
# Data values beyond this are the edge bins, which extend to -inf / +inf.
EDGE_BIN_THRESHOLD = 0.999
# Floor on probabilities before taking logs.
MIN_PROBABILITY = 1e-12


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the batch dimension.

    Args:
        tensor: (B, ...) tensor.

    Returns:
        (B,) tensor.
    """
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float) -> np.ndarray:
    """Discretise a continuous cumulative-alpha function ᾱ(s), s in [0, 1], into per-step betas.

    Args:
        num_steps: number of diffusion steps T.
        alpha_bar: ᾱ as a function of normalised time.
        max_beta: upper bound on every beta.

    Returns:
        (T,) float64 array with beta_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), max_beta).
    """
    betas = [
        min(1 - alpha_bar((step + 1) / num_steps) / alpha_bar(step / num_steps), max_beta) for step in range(num_steps)
    ]
    return np.array(betas, dtype=np.float64)


def _cosine_alpha_bar(time: float) -> float:
    return math.cos((time + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2


def named_beta_schedule(name: ScheduleName, num_steps: int) -> np.ndarray:
    """The beta schedule of the given name.

    Args:
        name: "linear" (DiT's default) or "squaredcos_cap_v2" (the improved-DDPM cosine schedule).
        num_steps: number of diffusion steps T.

    Returns:
        (T,) float64 array of betas.
    """
    if name == "linear":
        scale = REFERENCE_NUM_STEPS / num_steps
        return np.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, num_steps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_steps, _cosine_alpha_bar, COSINE_MAX_BETA)
    raise ValueError(f"unknown noise schedule {name!r}: use 'linear' or 'squaredcos_cap_v2'")


def normal_kl(
    mean1: torch.Tensor | float,
    log_variance1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    log_variance2: torch.Tensor | float,
) -> torch.Tensor:
    """KL(N(mean1, exp(log_variance1)) || N(mean2, exp(log_variance2))), elementwise, in nats.

    Arguments broadcast against each other; at least one must be a tensor.

    Args:
        mean1: mean of the first Gaussian.
        log_variance1: log-variance of the first Gaussian.
        mean2: mean of the second Gaussian.
        log_variance2: log-variance of the second Gaussian.

    Returns:
        Tensor of the broadcast shape.
    """
    reference = next(value for value in (mean1, log_variance1, mean2, log_variance2) if isinstance(value, torch.Tensor))
    # torch.exp needs tensors; plain floats become tensors of the reference's dtype and device.
    log_variance1, log_variance2 = (
        value if isinstance(value, torch.Tensor) else torch.tensor(value).to(reference)
        for value in (log_variance1, log_variance2)
    )
    return 0.5 * (
        -1.0
        + log_variance2
        - log_variance1
        + torch.exp(log_variance1 - log_variance2)
        + ((mean1 - mean2) ** 2) * torch.exp(-log_variance2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF (the one ADM's likelihoods are reported with).

    Args:
        x: any tensor.

    Returns:
        Tensor like x with values in [0, 1].
    """
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-probability of uint8 images (rescaled to [-1, 1]) under a Gaussian integrated over each pixel's bin.

    Args:
        x: target images in [-1, 1], (B, C, H, W).
        means: Gaussian means, same shape.
        log_scales: Gaussian log standard deviations, same shape.

    Returns:
        Log-probabilities in nats, same shape as x.
    """
    if not x.shape == means.shape == log_scales.shape:
        shapes = [tuple(tensor.shape) for tensor in (x, means, log_scales)]
        raise ValueError(f"x, means and log_scales must have one shape, got {shapes}")
    centered = x - means  # (B, C, H, W)
    inverse_std = torch.exp(-log_scales)  # (B, C, H, W)
    cdf_upper = approx_standard_normal_cdf(inverse_std * (centered + HALF_BIN_WIDTH))  # (B, C, H, W)
    cdf_lower = approx_standard_normal_cdf(inverse_std * (centered - HALF_BIN_WIDTH))  # (B, C, H, W)
    log_cdf_upper = torch.log(cdf_upper.clamp(min=MIN_PROBABILITY))  # (B, C, H, W)
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=MIN_PROBABILITY))  # (B, C, H, W)
    log_bin_mass = torch.log((cdf_upper - cdf_lower).clamp(min=MIN_PROBABILITY))  # (B, C, H, W)
    return torch.where(
        x < -EDGE_BIN_THRESHOLD,
        log_cdf_upper,
        torch.where(x > EDGE_BIN_THRESHOLD, log_one_minus_cdf_lower, log_bin_mass),
    )  # (B, C, H, W)


@lru_cache(maxsize=SCHEDULE_CACHE_SIZE)
def _schedule_tensor(values: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(values), dtype=torch.float64).float().to(device)  # (T,)


def schedule_on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A float64 schedule array (T,) as float32 on `device`, copied there once per content and device: a copy at
    every step would make the host wait for the GPU. Casting before gathering gives the same float32 values."""
    return _schedule_tensor(np.ascontiguousarray(array, dtype=np.float64).tobytes(), torch.device(device))
