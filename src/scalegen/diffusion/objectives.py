"""The registry of DiT objectives: each name a DiT's config may hold and the class that owns it. A new objective is
one module defining an `Objective` subclass, registered here (`register_objective`, also from a test file), and one
entry in `scalegen.diffusion.names` (its summary, samplers and settings dataclass, which the command line reads
without importing torch; the class reads its summary and samplers from there, and is built from its settings'
values).
"""
from __future__ import annotations

from dataclasses import fields

from scalegen.diffusion.ddpm import DDPMObjective
from scalegen.diffusion.flow import LinearFlow
from scalegen.diffusion.meanflow import MeanFlow
from scalegen.diffusion.objective import Objective
from scalegen.registry import Registry

OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register_objective(objective: type[Objective]) -> type[Objective]:
    """Make an objective class known by its `name` to every DiT config, trainer and sampler; returns it."""
    return OBJECTIVES.register(objective.name, objective)


def objective_class(name: str) -> type[Objective]:
    """The class of the objective `name`; a one-line error naming the known ones."""
    return OBJECTIVES.chosen(name)


for built_in in (DDPMObjective, LinearFlow, MeanFlow):
    register_objective(built_in)


def sampling_objective(name: str) -> Objective:
    """The objective `name` with its default training settings: what sampling needs of it."""
    return objective_class(name)()


def training_objective(name: str, settings: dict) -> Objective:
    """The objective `name` built from the entries of `settings` that are its fields (its settings' values and the
    properties of the model it trains: learn_sigma, num_classes, class_dropout, guidance_interval; the rest are
    ignored)."""
    cls = objective_class(name)
    return cls(**{field.name: settings[field.name] for field in fields(cls) if field.name in settings})
