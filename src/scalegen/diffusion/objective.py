"""What every DiT objective provides: the protocol that the registry (`diffusion/objectives.py`) holds one of per
objective, and the time convention they share.

An objective says what the network's output means. It owns its training loss (drawing its own times), its training
settings (a torch-free dataclass in `scalegen.diffusion.settings`, named by its registry entry in
`scalegen.diffusion.names`, whose fields are fields of the objective's class), its samplers and their defaults, the
guidance a model trained with its settings samples with, how guidance combines the two halves of a guided batch, how
many network calls a sample costs, and how it is exported to diffusers. The network always receives its time as t·TIME_SCALE, where t ∈ [0, 1] is the
noise level (1: pure noise, 0: data): a DDPM step index is t·1000 as it is, a flow time t is scaled to the same range.
A guidance interval is stated in that t.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch

from scalegen.diffusion.names import GuidanceInterval
from scalegen.errors import UserError

TIME_SCALE = 1000.0  # the network sees t·1000: DDPM's step range, in which its sinusoidal embedding was designed
# model(x (B, C, H, W), t·TIME_SCALE (B,), **model_kwargs) -> the objective's output (B, C_out, H, W)
ModelFunction = Callable[..., torch.Tensor]


def drop_labels(labels: torch.Tensor, probability: float, null_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance's label dropout: each label (B,) becomes the null class with `probability`.

    The one place a label is dropped in training (the DiT's label embedder, and MeanFlow, which drops before its
    passes so that they all see the same labels); it always draws B uniforms, so seeded runs draw alike.
    Returns:
        The labels after the drop (B,) and which were dropped (B,) bool.
    """
    dropped = torch.rand(labels.shape[0], device=labels.device) < probability  # (B,)
    return torch.where(dropped, null_class, labels), dropped  # (B,), (B,)


def within(interval: GuidanceInterval | None, level: float) -> bool:
    """Whether guidance applies at noise level `level` (always without an interval)."""
    return interval is None or interval[0] <= level <= interval[1]


class Objective(ABC):
    """One way of training and sampling a DiT. Subclasses set the class attributes and implement the methods.

    Class attributes:
        name: the registry's key, stored in the DiT's config.
        summary: one line for help texts and docs.
        samplers: sampler name -> one-line description; the first is the default.
        fast_sampler: the sampler the demo and the web page use (one network call a step).
        default_steps, default_cfg: the sampling defaults of `DiT.generate` for a model of this objective.
        min_steps: the fewest sampling steps (a respaced diffusion needs two).
        learns_sigma: whether the network may also predict a variance (only DDPM's learned-σ parameterisation can).
        time_inputs: 1 (t) or 2 (t and the interval t − r, MeanFlow's average velocity over [r, t]).
        guides_official_channels: guidance touches only the official first three ε channels unless asked otherwise
            (DDPM's parity with the official sampler); other objectives guide every output channel.
        forward_mode: the loss takes forward-mode derivatives of the network (`torch.func.jvp`), which FSDP2's
            sharded parameters do not support.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    samplers: ClassVar[dict[str, str]]
    fast_sampler: ClassVar[str]
    default_steps: ClassVar[int]
    default_cfg: ClassVar[float]
    min_steps: ClassVar[int] = 1
    learns_sigma: ClassVar[bool] = False
    time_inputs: ClassVar[int] = 1
    guides_official_channels: ClassVar[bool] = False
    forward_mode: ClassVar[bool] = False

    @property
    def default_sampler(self) -> str:
        """The sampler a model of this objective uses when none is named."""
        return next(iter(self.samplers))

    def check_sampler(self, sampler: str | None) -> str:
        """`sampler`, or the default when None; a one-line error for a sampler this objective has not."""
        sampler = sampler or self.default_sampler
        if sampler not in self.samplers:
            raise UserError(f"a model trained with the {self.name} objective samples with "
                            f"{', '.join(self.samplers)}, not {sampler}")
        return sampler

    def check_steps(self, steps: int | None) -> int:
        """`steps`, or the default when None; a one-line error for fewer than `min_steps`."""
        steps = self.default_steps if steps is None else steps
        if steps < self.min_steps:
            raise UserError(f"a {self.name} model samples with at least {self.min_steps} step(s), not {steps}")
        return steps

    @abstractmethod
    def training_losses(self, model: ModelFunction, x_start: torch.Tensor,
                        model_kwargs: dict) -> dict[str, torch.Tensor]:
        """Per-example losses {"loss": (B,), …} of clean latents `x_start` (B, C, H, W), drawing the times (and the
        noise) itself."""

    @abstractmethod
    def sample_loop(self, model: ModelFunction, noise: torch.Tensor, steps: int, sampler: str, model_kwargs: dict,
                    clip_denoised: bool, learn_sigma: bool, progress: bool) -> Iterator[dict[str, torch.Tensor]]:
        """From `noise` (B, C, H, W) at t = 1, yield each step's "sample" and "pred_xstart" (B, C, H, W)."""

    @abstractmethod
    def call_levels(self, sampler: str, steps: int) -> list[float]:
        """The noise level t of each network call a sample of `steps` steps makes (without guidance's doubling)."""

    def sampling_cfg(self, cfg: float) -> float:
        """The guidance scale a model trained with these settings samples with when a run asks for `cfg`."""
        return cfg

    def network_calls(self, sampler: str, steps: int, cfg: float, interval: GuidanceInterval | None) -> int:
        """Network evaluations per image: each call counts twice where guidance (cfg > 1) doubles the batch."""
        levels = self.call_levels(self.check_sampler(sampler), steps)
        return sum(2 if cfg > 1.0 and within(interval, level) else 1 for level in levels)

    def diffusers_scheduler(self, learn_sigma: bool) -> dict:
        """The `scheduler_config.json` of a diffusers DiTPipeline sampling this objective; a one-line error when
        diffusers has no scheduler for it."""
        raise UserError(f"diffusers' DiTPipeline has no scheduler for the {self.name} objective")
