"""The DiT objectives and their settings as the command line shows them, free of torch: each objective's name,
summary and samplers (the registry's classes, `scalegen.diffusion.objectives`, read theirs from here), the choices of
their training settings, and the guidance interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from scalegen.errors import UserError


@dataclass(frozen=True)
class ObjectiveEntry:
    """What the help and the docs say of one objective.

    Fields:
        summary: one line for help texts and docs.
        samplers: sampler name -> one-line description; the first is the default.
    """

    summary: str
    samplers: dict[str, str]


OBJECTIVE_ENTRIES: dict[str, ObjectiveEntry] = {
    "ddpm": ObjectiveEntry("DDPM ε-prediction with a learned variance (the DiT paper's)", {
        "ddpm": "ancestral DDPM on the respaced diffusion (the official sampler)",
        "ddim": "DDIM with η = 0",
        "dpm-solver++": "DPM-Solver++ (2M): good samples in 10-25 steps",
    }),
    "flow": ObjectiveEntry("SiT's linear flow matching: velocity prediction", {
        "euler": "Euler ODE steps (one network call a step)",
        "heun": "Heun ODE steps (two network calls a step)",
        "euler-maruyama": "Euler-Maruyama on the reverse SDE with the ODE's marginals",
    }),
    "meanflow": ObjectiveEntry("MeanFlow: the average velocity over [r, t], for one- or few-step sampling", {
        "meanflow": "average-velocity jumps z_r = z_t - (t - r)·u: one network call a step (1 or 2 steps)",
        "euler": "Euler ODE steps on the instantaneous velocity u(z, t, t)",
    }),
}
OBJECTIVE_NAMES: tuple[str, ...] = tuple(OBJECTIVE_ENTRIES)
# Every sampler name, once, in the objectives' order.
SAMPLERS: tuple[str, ...] = tuple(dict.fromkeys(name for entry in OBJECTIVE_ENTRIES.values() for name in entry.samplers))
LossWeighting = Literal["none", "min-snr"]  # ddpm: min-SNR-γ weighting of the ε loss, or none
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
TimeSampling = Literal["uniform", "logit-normal"]  # flow, meanflow: how training draws t
TIME_SAMPLINGS: tuple[str, ...] = get_args(TimeSampling)
GuidanceInterval = tuple[float, float]  # (low, high): guidance applies at noise levels low ≤ t ≤ high


def objectives_help() -> str:
    """One line per objective for help texts: its name and summary."""
    return "; ".join(f"{name}: {entry.summary}" for name, entry in OBJECTIVE_ENTRIES.items())


def samplers_help() -> str:
    """The samplers of each objective: "ddpm models: ddpm, ddim, …; flow models: …; the first is each one's default"."""
    listed = "; ".join(f"{name} models: {', '.join(entry.samplers)}" for name, entry in OBJECTIVE_ENTRIES.items())
    return f"{listed}; the first is each one's default"


def check_guidance_interval(interval: GuidanceInterval | list[float] | None) -> GuidanceInterval | None:
    """A checked (low, high) with 0 ≤ low < high ≤ 1, or None for guidance at every step."""
    if interval is None:
        return None
    low, high = (float(value) for value in interval)
    if not 0.0 <= low < high <= 1.0:
        raise UserError(f"a guidance interval must satisfy 0 <= LOW < HIGH <= 1 in noise level t (1: noise); got "
                        f"{low},{high}")
    return low, high
