"""The DiT objectives and their settings as the command line shows them, free of torch: each objective's name,
summary, samplers and settings dataclass (the registry's classes, `scalegen.diffusion.objectives`, read theirs from
here), the training settings' one table over all objectives (the flags of `train dit`), and the guidance interval.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from scalegen.diffusion.settings import DDPMSettings, FlowSettings, MeanFlowSettings, setting_flag
from scalegen.errors import UserError


@dataclass(frozen=True)
class ObjectiveEntry:
    """What the help and the docs say of one objective.

    Fields:
        summary: one line for help texts and docs.
        samplers: sampler name -> one-line description; the first is the default.
        settings: the frozen dataclass of its training settings (`scalegen.diffusion.settings.setting` fields).
    """

    summary: str
    samplers: dict[str, str]
    settings: type


OBJECTIVE_ENTRIES: dict[str, ObjectiveEntry] = {
    "ddpm": ObjectiveEntry("DDPM ε-prediction with a learned variance (the DiT paper's)", {
        "ddpm": "ancestral DDPM on the respaced diffusion (the official sampler)",
        "ddim": "DDIM with η = 0",
        "dpm-solver++": "DPM-Solver++ (2M): good samples in 10-25 steps",
    }, DDPMSettings),
    "flow": ObjectiveEntry("SiT's linear flow matching: velocity prediction", {
        "euler": "Euler ODE steps (one network call a step)",
        "heun": "Heun ODE steps (two network calls a step)",
        "euler-maruyama": "Euler-Maruyama on the reverse SDE with the ODE's marginals",
    }, FlowSettings),
    "meanflow": ObjectiveEntry("MeanFlow: the average velocity over [r, t], for one- or few-step sampling", {
        "meanflow": "average-velocity jumps z_r = z_t - (t - r)·u: one network call a step (1 or 2 steps)",
        "euler": "Euler ODE steps on the instantaneous velocity u(z, t, t)",
    }, MeanFlowSettings),
}
OBJECTIVE_NAMES: tuple[str, ...] = tuple(OBJECTIVE_ENTRIES)
# Every sampler name, once, in the objectives' order.
SAMPLERS: tuple[str, ...] = tuple(dict.fromkeys(name for entry in OBJECTIVE_ENTRIES.values() for name in entry.samplers))
GuidanceInterval = tuple[float, float]  # (low, high): guidance applies at noise levels low ≤ t ≤ high


@dataclass(frozen=True)
class ObjectiveSetting:
    """One training setting as `train dit` and a run configuration show it, over every objective that has it.

    Fields:
        name: the field's name in its objectives' settings dataclasses (and the key of a DiT run's stored config).
        flag: its command-line flag; its run-configuration key is the flag with underscores.
        default, choices, minimum, maximum: its default and the values its flag accepts (`setting`'s).
        help: the owners' names, then the setting's help line.
        owners: the objectives that have it, in the registry's order.
    """

    name: str
    flag: str
    default: Any
    choices: tuple[str, ...] | None
    minimum: float | None
    maximum: float | None
    help: str
    owners: tuple[str, ...]


def objective_settings() -> dict[str, ObjectiveSetting]:
    """Every registered objective's settings by name: those several objectives share first (one flag each, declared
    once in a shared settings dataclass), then each objective's own, in the registry's order."""
    declared, owners = {}, {}
    for name, entry in OBJECTIVE_ENTRIES.items():
        for field in fields(entry.settings):
            declared.setdefault(field.name, field)
            owners.setdefault(field.name, []).append(name)
    order = sorted(declared, key=lambda setting: len(owners[setting]) == 1)  # stable: shared ones first
    table = {}
    for setting in order:
        field, metadata = declared[setting], declared[setting].metadata
        table[setting] = ObjectiveSetting(setting, setting_flag(field), field.default, metadata["choices"],
                                          metadata["minimum"], metadata["maximum"],
                                          f"{', '.join(owners[setting])}: {metadata['help']}", tuple(owners[setting]))
    return table


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
