"""The registry of DiT objectives: each name a DiT's config may hold, the class that owns it, and what the command
line and the docs list. A new objective is one module defining an `Objective` subclass, plus one entry here.
"""
from __future__ import annotations

from dataclasses import fields

from scalegen.diffusion.ddpm import DDPMObjective
from scalegen.diffusion.flow import LinearFlow
from scalegen.diffusion.meanflow import MeanFlow
from scalegen.diffusion.objective import Objective
from scalegen.errors import UserError

OBJECTIVES: dict[str, type[Objective]] = {objective.name: objective for objective in (DDPMObjective, LinearFlow, MeanFlow)}
OBJECTIVE_NAMES: tuple[str, ...] = tuple(OBJECTIVES)
# Every sampler name, once, in the objectives' order.
SAMPLERS: tuple[str, ...] = tuple(dict.fromkeys(name for objective in OBJECTIVES.values() for name in objective.samplers))


def objective_class(name: str) -> type[Objective]:
    """The class of the objective `name`; a one-line error naming the known ones."""
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; use one of {', '.join(OBJECTIVE_NAMES)}")
    return OBJECTIVES[name]


def sampling_objective(name: str) -> Objective:
    """The objective `name` with its default training settings: what sampling needs of it."""
    return objective_class(name)()


def training_objective(name: str, settings: dict) -> Objective:
    """The objective `name` built from the entries of `settings` that are its fields (the rest are ignored)."""
    cls = objective_class(name)
    return cls(**{field.name: settings[field.name] for field in fields(cls) if field.name in settings})


def setting_owners(setting: str) -> list[str]:
    """The objectives that have a training setting of this name."""
    return [name for name, cls in OBJECTIVES.items() if setting in {field.name for field in fields(cls)}]


def objectives_help() -> str:
    """One line per objective for help texts: its name and summary."""
    return "; ".join(f"{name}: {cls.summary}" for name, cls in OBJECTIVES.items())


def samplers_help() -> str:
    """The samplers of each objective: "ddpm models: ddpm, ddim, …; flow models: …; the first is each one's default"."""
    listed = "; ".join(f"{name} models: {', '.join(cls.samplers)}" for name, cls in OBJECTIVES.items())
    return f"{listed}; the first is each one's default"
