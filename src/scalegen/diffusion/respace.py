"""Timestep respacing: sample with a subset of a diffusion's steps, and the DiT `create_diffusion` factory.

Same semantics as the official DiT ``diffusion/respace.py`` and ``diffusion/__init__.py``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from scalegen.diffusion.gaussian import GaussianDiffusion, Model
from scalegen.diffusion.math import LossType, MeanType, ScheduleName, VarianceType, named_beta_schedule
from scalegen.errors import UserError

DDIM_PREFIX = "ddim"


def _parse_section_counts(num_timesteps: int, section_counts: str) -> list[int] | set[int]:
    """Parse "250" / "10,15,20" into counts, or resolve "ddimN" straight to its set of steps."""
    if section_counts.startswith(DDIM_PREFIX):
        count_text = section_counts[len(DDIM_PREFIX) :]
        if not count_text.isdigit():
            raise UserError(f"bad timestep respacing {section_counts!r}: write 'ddim' and a step count, e.g. 'ddim50'")
        desired_count = int(count_text)
        # DDIM's fixed striding: the smallest integer stride that gives exactly the desired number of steps.
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired_count:
                return set(range(0, num_timesteps, stride))
        raise UserError(f"no integer stride gives exactly {desired_count} of {num_timesteps} steps: try another count")
    try:
        return [int(count) for count in section_counts.split(",")]
    except ValueError:
        raise UserError(
            f"bad timestep respacing {section_counts!r}: use a count ('250'), section counts ('10,15,20') or 'ddim50'"
        ) from None


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Choose which steps of an original diffusion to keep.

    The original steps are cut into len(section_counts) equal sections (earlier sections take the remainder) and
    each section is strided evenly, including its first and last step, to its count. With 300 steps and
    [10, 15, 20], steps 0-99 give 10 steps, 100-199 give 15 and 200-299 give 20. "ddimN" instead uses the single
    integer stride from the DDIM paper that gives exactly N steps.

    Args:
        num_timesteps: number of steps of the original diffusion.
        section_counts: a list of counts, a comma-separated string of counts, or "ddimN".

    Returns:
        The set of kept original step indices.

    Raises:
        UserError: when the string cannot be parsed or a section is asked for more steps than it has.
    """
    if isinstance(section_counts, str):
        parsed = _parse_section_counts(num_timesteps, section_counts)
        if isinstance(parsed, set):
            return parsed
        section_counts = parsed
    size_per_section, remainder = divmod(num_timesteps, len(section_counts))
    start = 0
    kept: list[int] = []
    for section, count in enumerate(section_counts):
        size = size_per_section + (1 if section < remainder else 0)
        if not 0 < count <= size:
            raise UserError(f"cannot divide a section of {size} diffusion steps into {count} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(index * stride) for index in range(count)]
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that keeps only some steps of a base diffusion, with the same ᾱ at every kept step.

    The model still receives the original step numbers: t is mapped through `timestep_map` before each call.

    Args:
        use_timesteps: original step indices to keep.
        betas: (T,) beta schedule of the base diffusion.
        mean_type, variance_type, loss_type: as for GaussianDiffusion.
    """

    def __init__(
        self,
        use_timesteps: Sequence[int] | set[int],
        *,
        betas: np.ndarray,
        mean_type: MeanType,
        variance_type: VarianceType,
        loss_type: LossType,
    ):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(betas)
        base_alphas_cumprod = np.cumprod(1.0 - np.array(betas, dtype=np.float64))
        # Kept original step for each new step index.
        self.timestep_map = sorted(step for step in self.use_timesteps if 0 <= step < self.original_num_steps)
        self.timestep_maps: dict[torch.device, torch.Tensor] = {}  # timestep_map on each device it served
        # A kept step's beta spans all skipped steps since the previous kept one: 1 - ᾱ_now / ᾱ_previous.
        previous_alphas_cumprod = np.append(1.0, base_alphas_cumprod[self.timestep_map][:-1])
        spaced_betas = 1 - base_alphas_cumprod[self.timestep_map] / previous_alphas_cumprod
        super().__init__(betas=spaced_betas, mean_type=mean_type, variance_type=variance_type, loss_type=loss_type)

    def _call_model(self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None) -> tuple[Any, Any]:
        if t.device not in self.timestep_maps:  # built once per device: a copy per call would wait for the GPU
            self.timestep_maps[t.device] = torch.tensor(self.timestep_map, device=t.device, dtype=torch.long)  # (T',)
        original_t = self.timestep_maps[t.device][t].to(t.dtype)  # (B,)
        return super()._call_model(model, x, original_t, model_kwargs)


def create_diffusion(
    timestep_respacing: str | Sequence[int] | None,
    noise_schedule: ScheduleName = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """Build the diffusion DiT trains and samples with (same arguments and defaults as the official factory).

    Args:
        timestep_respacing: "" or None for every step (training), else e.g. "250" or "ddim50" (see space_timesteps).
        noise_schedule: "linear" or "squaredcos_cap_v2".
        use_kl: train on the rescaled variational bound instead of the MSE.
        sigma_small: with fixed variance, use the posterior variance β̃_t rather than β_t.
        predict_xstart: the model predicts x_0 instead of ε.
        learn_sigma: the model also outputs the learned-range variance (DiT's default).
        rescale_learned_sigmas: scale the VLB term by T / 1000 (RESCALED_MSE).
        diffusion_steps: number of steps of the underlying schedule.

    Returns:
        A SpacedDiffusion.
    """
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        variance_type = VarianceType.LEARNED_RANGE
    else:
        variance_type = VarianceType.FIXED_SMALL if sigma_small else VarianceType.FIXED_LARGE
    if not timestep_respacing:
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        betas=named_beta_schedule(noise_schedule, diffusion_steps),
        mean_type=MeanType.START_X if predict_xstart else MeanType.EPSILON,
        variance_type=variance_type,
        loss_type=loss_type,
    )
