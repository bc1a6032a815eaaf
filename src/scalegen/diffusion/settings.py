"""The training settings of each DiT objective, free of torch: one frozen dataclass per objective whose fields are its
settings, each declared with `setting` (its default, help line, flag and bounds). The registry's entries
(`scalegen.diffusion.names.OBJECTIVE_ENTRIES`) name each objective's dataclass; `train dit`'s flags and a run
configuration's keys are made from them, and the objective classes (which import torch) are built from their values.
"""
from __future__ import annotations

from dataclasses import Field, dataclass, field
from typing import Any, Literal, get_args

LossWeighting = Literal["none", "min-snr"]  # ddpm: min-SNR-γ weighting of the ε loss, or none
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
TimeSampling = Literal["uniform", "logit-normal"]  # flow, meanflow: how training draws t
TIME_SAMPLINGS: tuple[str, ...] = get_args(TimeSampling)


def setting(default: Any, help: str, flag: str | None = None, choices: tuple[str, ...] | None = None,
            minimum: float | None = None, maximum: float | None = None) -> Any:
    """A settings dataclass's field: one training setting of an objective.

    Args:
        default: its value when not given (also its flag's default).
        help: one line for the flag's help (the owning objectives' names go before it).
        flag: its command-line flag; None: the field's name with dashes.
        choices: the values it may take (a string setting).
        minimum, maximum: the range the flag accepts (a number setting; any finite number where both are None).

    Returns:
        The dataclass field.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "minimum": minimum,
                                            "maximum": maximum})


def setting_flag(declared: Field) -> str:
    """The command-line flag of a setting's field."""
    return declared.metadata.get("flag") or "--" + declared.name.replace("_", "-")


@dataclass(frozen=True)
class TimeSettings:
    """How a flow-type objective draws its training times t: uniform on [0, 1] or logit-normal σ(m + s·n)."""

    time_sampling: TimeSampling = setting("uniform", "how training draws t in [0, 1]", flag="--t-sampling",
                                          choices=TIME_SAMPLINGS)
    logit_mean: float = setting(0.0, "the logit-normal's location (MeanFlow's paper: -0.4)")
    logit_std: float = setting(1.0, "the logit-normal's scale")


@dataclass(frozen=True)
class DDPMSettings:
    """The settings of "ddpm" (diffusion/ddpm.py): min-SNR-γ weighting of the ε loss, or none."""

    loss_weighting: LossWeighting = setting("none", "min-snr weights the ε loss by min(SNR, γ)/SNR",
                                            choices=LOSS_WEIGHTINGS)
    snr_gamma: float = setting(5.0, "γ of min-SNR weighting")


@dataclass(frozen=True)
class FlowSettings(TimeSettings):
    """The settings of "flow" (diffusion/flow.py): its time sampling."""


@dataclass(frozen=True)
class MeanFlowSettings(TimeSettings):
    """The settings of "meanflow" (diffusion/meanflow.py): its time sampling, the share of averaged examples, the
    adaptive weight 1 / (‖Δ‖² + c)^p and the guidance trained in."""

    mean_fraction: float = setting(0.25, "the share of examples trained with r < t (the rest: r = t)", minimum=0.0,
                                   maximum=1.0)
    weighting_power: float = setting(1.0, "p of the adaptive loss weight 1 / (‖Δ‖² + c)^p")
    weighting_constant: float = setting(1e-3, "c of the adaptive loss weight")
    guidance: float = setting(1.0, "the guidance scale trained into the model (it then samples with cfg 1)",
                              flag="--train-cfg", minimum=1.0)
