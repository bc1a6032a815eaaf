"""A model's recommended sampling settings, the one source of truth for how it samples: the `sampling` section of
its config.json, written by training (from the run's --sample-* options) and kept by `scalegen export`.

    "sampling": {"cfg": 2.5, "steps": 50, "sampler": "euler"}                                       # a DiT's
    "sampling": {"cfg": 1.5, "top_k": 0, "top_p": 0.0, "draws": "multinomial", "refiner": null}     # a VAR's

The loaders give a model its settings (`model.sampling`, `model.sampling_origin`); `DiT.generate` and `VAR.generate`
use them for every argument left None (a VAR's generation takes all it samples with as one `VARSampling`, which the
command line, the web page and Python's keyword arguments each build once), and `scalegen sample` prints each value it uses and where it came from (a
flag, the model's config, the paper's settings, the code's default). A DiT's guidance interval is not repeated here:
it is its model config's `cfg_interval` (MeanFlow trains its guidance in there). A VAR's `refiner` names the
checkpoint of its CoDe refiner (a path or a `shipped:` name; null: none), which the command line loads beside it.
A file without a config (an official checkpoint) gets its paper's FID settings; a config written before this
section existed gets none, so the model's own defaults apply.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Literal, get_args

from scalegen.diffusion.names import GuidanceInterval
from scalegen.models.settings import DEFAULT_REFINED_SCALES, Draws
from scalegen.precision import Precision

SAMPLING_KEY = "sampling"  # the config.json section
# The settings a VAR applies itself; its `refiner` names a checkpoint, which the command line loads beside it.
VAR_TOKEN_SETTINGS = ("cfg", "top_k", "top_p", "draws")
VAR_SETTINGS = (*VAR_TOKEN_SETTINGS, "refiner")
# A flow head's ODE per scale (`models/flow_head.py`): its steps and method; a flow VAR's config records them.
FlowMethod = Literal["euler", "heun"]
FLOW_METHODS: tuple[str, ...] = get_args(FlowMethod)
FLOW_SETTINGS = ("flow_steps", "flow_sampler")


@dataclass(frozen=True)
class VARSampling:
    """Everything a VAR generation (`VAR.generate`, `generate_frames`, `edit`, `generate_tokens`) samples with, built
    once by each entry point (the command line from its flags and the model's recommended settings, the web page
    from its widgets, Python from keyword arguments: `VAR.sampling_settings`). The defaults are the official
    `autoregressive_infer_cfg`'s: the official tokens for a seed.

    Fields:
        cfg: guidance strength; at scale index k of K it ramps linearly as t = cfg·k/(K-1) and the logits are
            (1 + t)·conditional - t·unconditional.
        top_k: keep the k most likely tokens (0, or the vocabulary size or more, keeps all).
        top_p: nucleus sampling threshold (0 = off).
        draws: how tokens are drawn: "multinomial" (the official draws, so the official tokens for a seed) or
            "inverse-cdf" (one uniform per position: the same distribution, faster, other tokens for a seed).
        more_smooth: feed a Gumbel-softmax mixture of codebook vectors instead of the sampled tokens (visualisation
            only, not for FID).
        precision: the transformer's autocast ("fp32" is the official computation; "bf16" or "auto" are faster where
            the hardware has bf16 units).
        cuda_graphs: replay each scale's network step from CUDA graphs (captured on the first call for this batch
            size and precision): the same tokens, fewer launches. CUDA only.
        pruning: FastVAR's cached token pruning at the finest scales (`TokenPruning`), or None (every token); a
            refiner with no block to prune computes every token.
        refiner: collaborative decoding (CoDe): another VAR on the same tokenizer (usually a smaller one) that
            generates the last `refined_scales` scales after the model drafted the others; None: the model alone.
        refined_scales: how many of the finest scales the refiner generates.
        flow_steps: a flow head's ODE steps per scale (from noise to the scale's continuous tokens).
        flow_sampler: a flow head's ODE step, "euler" or "heun" (two velocity evaluations per step).
    """

    cfg: float = 1.5
    top_k: int = 0
    top_p: float = 0.0
    draws: Draws = "multinomial"
    more_smooth: bool = False
    precision: Precision = "fp32"
    cuda_graphs: bool = False
    # The models import torch and these settings: they are carried, not imported (a `TokenPruning`, a `VAR`).
    pruning: Any = None
    refiner: Any = None
    refined_scales: int = DEFAULT_REFINED_SCALES
    flow_steps: int = 10
    flow_sampler: FlowMethod = "euler"

    @classmethod
    def recommended(cls, sampling: dict) -> VARSampling:
        """The defaults with a model's recommended settings (`model.sampling`) over them (its refiner, a checkpoint
        name, is the command line's to load)."""
        return cls(**{name: sampling[name] for name in (*VAR_TOKEN_SETTINGS, *FLOW_SETTINGS) if name in sampling})

    def with_given(self, **given: Any) -> VARSampling:
        """These settings with each given value that is not None (None: not given); a TypeError names an unknown
        setting."""
        return given_over(self, "VAR", given)


# What a bare VAR samples with (the official autoregressive_infer_cfg's defaults), for a setting no one gives.
VAR_DEFAULTS = {name: getattr(VARSampling, name) for name in VAR_SETTINGS}
FLOW_DEFAULTS = {name: getattr(VARSampling, name) for name in FLOW_SETTINGS}  # and a flow head's ODE
# The papers' FID-50K settings, for the official checkpoints (spec/DIT.md: sample_ddp.py; spec/VAR.md).
OFFICIAL_DIT_SAMPLING = {"cfg": 1.5, "steps": 250, "sampler": "ddpm"}
OFFICIAL_VAR_SAMPLING = {"cfg": 1.5, "top_k": 900, "top_p": 0.96, "draws": "multinomial", "refiner": None}
# The settings a DiT's config.json recommends (its guidance interval is its model config's `cfg_interval`).
DIT_SETTINGS = ("cfg", "steps", "sampler")


@dataclass(frozen=True)
class DiTSampling:
    """Everything a DiT generation (`DiT.generate`, `generate_frames`) samples with, built once by each entry point
    (`scalegen sample dit` from its flags, the web page from its widgets, Python from keyword arguments:
    `DiT.sampling_settings`). A DiT's defaults depend on its objective, so a setting left None here is the model's
    to choose (`DiT.chosen_sampling`): its recommended one (`model.sampling`), else its objective's default, and for
    the guidance interval its config's.

    Fields:
        cfg: classifier-free guidance scale; 1.0 means no guidance (and no doubled batch).
        steps: sampling steps (respaced diffusion steps, ODE steps, MeanFlow jumps).
        sampler: one of the objective's samplers (`scalegen.diffusion.names.samplers_help()`).
        cfg_interval: (low, high): guide only at noise levels low <= t <= high (t = 1 is noise).
        guide_all_channels: guide every ε channel instead of the official first three.
        precision: the network's autocast ("fp32" is the official computation; "bf16" or "auto" are faster where the
            hardware has bf16 units).
    """

    cfg: float | None = None
    steps: int | None = None
    sampler: str | None = None
    cfg_interval: GuidanceInterval | None = None
    guide_all_channels: bool = False
    precision: Precision = "fp32"

    @classmethod
    def recommended(cls, sampling: dict) -> DiTSampling:
        """A model's recommended settings (`model.sampling`), the others left to the model."""
        return cls(**{name: sampling[name] for name in DIT_SETTINGS if name in sampling})

    def with_given(self, **given: Any) -> DiTSampling:
        """These settings with each given value that is not None (None: not given); a TypeError names an unknown
        setting."""
        return given_over(self, "DiT", given)


def given_over(settings: Any, model: str, given: dict[str, Any]) -> Any:
    """`settings` (a VARSampling or DiTSampling) with each given value that is not None over them; a TypeError names
    an unknown setting of the `model` ("VAR", "DiT")."""
    names = {field.name for field in fields(settings)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise TypeError(f"unknown {model} sampling setting(s) {', '.join(unknown)}; the settings are "
                        f"{', '.join(sorted(names))}")
    return replace(settings, **{name: value for name, value in given.items() if value is not None})


# Where a value came from, as `scalegen sample` prints it.
FROM_FLAG, FROM_CONFIG, FROM_PAPER, FROM_DEFAULT = "flag", "model config", "paper, official checkpoint", "default"

Chosen = dict[str, tuple[Any, str]]  # setting name -> (value, where it came from)
# How `sample dit|var --num-samples` (`eval.samples.sample_to_npz`) draws the classes: each N/K times, shuffled
# (ADM/RAE's FID protocol), or each uniformly at random.
LabelDraw = Literal["balanced", "random"]
LABEL_DRAWS: tuple[str, ...] = get_args(LabelDraw)


def stored_sampling(stored: dict | None, official: dict) -> tuple[dict, str]:
    """The recommended settings of a stored config and where they come from: its `sampling` section (the model
    config), the paper's `official` settings for a file without a config, none for a config without the section.

    Returns:
        (settings, origin): a copy of the settings by name, and FROM_CONFIG, FROM_PAPER or FROM_DEFAULT.
    """
    if stored is None:
        return dict(official), FROM_PAPER
    if SAMPLING_KEY in stored:
        return dict(stored[SAMPLING_KEY]), FROM_CONFIG
    return {}, FROM_DEFAULT


def chosen_settings(flags: dict[str, Any], recommended: dict, origin: str, defaults: dict[str, Any]) -> Chosen:
    """Each setting from the first place that gives it: a flag (not None), the model's recommended settings, the
    code's default.

    Args:
        flags: setting name -> the flag's value (None: not given).
        recommended: the model's settings (`model.sampling`), from `origin`.
        defaults: setting name -> the value used when neither gives one.
    Returns:
        setting name -> (value, where it came from), in the order of `flags`.
    """
    chosen = {}
    for name, flag in flags.items():
        if flag is not None:
            chosen[name] = (flag, FROM_FLAG)
        elif name in recommended:
            chosen[name] = (recommended[name], origin)
        else:
            chosen[name] = (defaults[name], FROM_DEFAULT)
    return chosen


def settings_line(chosen: Chosen) -> str:
    """The settings in one line: "sampling with cfg 2.5 (model config), steps 50 (flag), …"."""
    return "sampling with " + ", ".join(f"{name.replace('_', '-')} {format_value(value)} ({origin})"
                                        for name, (value, origin) in chosen.items())


def format_value(value: Any) -> str:
    """A setting's value as the command line writes it (a pair as LOW,HIGH, None as none)."""
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(str(part) for part in value)
    return str(value)


def values(chosen: Chosen) -> dict[str, Any]:
    """The values of chosen settings by name."""
    return {name: value for name, (value, _) in chosen.items()}
