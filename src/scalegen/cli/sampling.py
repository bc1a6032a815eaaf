"""What `sample dit`, `sample var` and `edit var` share about loading and sampling settings: `--weights`, the help
of `--ckpt`, `--labels` (how `--num-samples` draws the classes), and the settings each run uses, chosen from its
flags, the model's recommended settings (`scalegen.models.sampling_settings`) and the defaults, printed with where
each came from."""
from __future__ import annotations

import argparse

from scalegen.runs.names import WEIGHT_CHOICES, shipped_names
from scalegen.models.sampling_settings import (
    LABEL_DRAWS, VAR_DEFAULTS, VAR_SETTINGS, Chosen, DiTSampling, chosen_settings,
)

NO_REFINER = "none"  # `--refiner none`: sample without the refiner a VAR's settings name


def checkpoint_help(what: str) -> str:
    """The help of a `--ckpt`: `what` it takes, and the shipped names."""
    return f"{what}, or a shipped model: {shipped_names()}"


def add_weights_option(parser: argparse.ArgumentParser) -> None:
    """`--weights ema|raw`."""
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default=None,
                        help="a run's EMA weights (ema.safetensors) or raw ones (model.safetensors; e.g. when the EMA "
                             "barely moved); default: the EMA's where there are some (an export holds one kind)")


def add_labels_option(parser: argparse.ArgumentParser) -> None:
    """`--labels`, how `sample dit|var --num-samples` draws the classes (the FID protocol `eval` prints)."""
    parser.add_argument("--labels", choices=LABEL_DRAWS, default=LABEL_DRAWS[0],
                        help="with --num-samples: balanced draws each class N/K times, shuffled with --seed (ADM's FID "
                             "protocol; the same labels for any number of ranks); random draws each class uniformly")


def dit_settings(args: argparse.Namespace) -> DiTSampling:
    """The settings `sample dit`'s flags give (None: not given, the model's to choose: `DiT.chosen_sampling`)."""
    return DiTSampling(cfg=args.cfg_scale, steps=args.steps, sampler=args.sampler, cfg_interval=args.cfg_interval,
                       guide_all_channels=args.guide_all_channels, precision=args.precision)


def chosen_var_settings(args: argparse.Namespace, model) -> Chosen:
    """The settings `sample var` / `edit var` use: their flags, else the model's recommended ones, else the official
    code's defaults (`--refiner none` turns a recommended refiner off)."""
    return chosen_settings({name: getattr(args, name) for name in VAR_SETTINGS}, model.sampling,
                           model.sampling_origin, VAR_DEFAULTS)
