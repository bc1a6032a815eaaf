"""Options shared by several commands, and the step from parsed arguments to the library's option dataclasses.

No command adds a default of its own: each option's default is the library's (a field default of the dataclass it
fills, or the task's recipe), so `scalegen train var` and `train(VARTask(...), ...)` in Python train alike.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import TypeVar

from scalegen.distributed import PRECISIONS
from scalegen.train.run_log import LOGGERS
from scalegen.train.task import TrainingTask
from scalegen.train.trainer import MINIMUMS, TrainConfig

Options = TypeVar("Options")
# Loop settings with their own flag name (the rest are the field name with dashes).
FLAG_NAMES = {"ema_decay": "--ema"}
TRAINING_HELP = {
    "out": "run folder; re-running with the same folder resumes",
    "steps": "total optimizer steps",
    "batch_size": "global batch size (over ranks and accumulation steps)",
    "lr": "peak learning rate",
    "weight_decay": "AdamW weight decay",
    "betas": "AdamW betas, e.g. 0.9,0.95",
    "ema_decay": "EMA decay of the sampled weights (0: no EMA)",
    "grad_clip": "clip the gradient norm (0: off)",
    "warmup_steps": "linear warm-up steps",
    "lr_decay_to": "final lr as a fraction of --lr, reached linearly after warm-up (1: constant)",
    "checkpoint_every": "checkpoint every N steps",
    "grad_accumulation": "micro-batches per optimizer step",
    "precision": "autocast precision (auto: bf16 on a GPU or a CPU with AMX/AVX512-BF16, else fp32; fp32: exact)",
    "compile": "torch.compile each transformer block in place (regional: quick to compile, same checkpoint keys)",
    "fsdp": "under torchrun, shard the model over the ranks with FSDP2 instead of DDP (checkpoints stay full)",
    "gradient_checkpointing": "recompute activations in the backward pass (less memory)",
    "seed": "seed of the data order and the initial weights",
    "log_every": "write a log row every N steps",
    "sample_every": "sample grid every N steps (0: at the end)",
    "keep_checkpoints": "checkpoint folders to keep",
    "num_workers": "data loader worker processes",
    "logger": "where the log goes: log.csv, TensorBoard (with the sample grids) or W&B offline (`wandb sync` later)",
    "device": "cpu or cuda (default: cuda when available)",
    "flip": "random horizontal flips",
    "max_nonfinite_steps": "stop after this many steps in a row with a non-finite loss or gradient (each is skipped)",
    "max_images": "train (and cache) on the first N images only: a quick smoke test (default: all)",
    "data_on_device": "hold the data set (Fashion-MNIST, a latent or token cache) on the device and gather whole "
                      "batches there: no loader workers, no copies",
}
DATA_HELP = ("fashion-mnist, a folder of its IDX files, an image folder (one sub-folder per class), or tar shards: a "
             "brace pattern such as train-{000000..000146}.tar, one .tar, or the .json index of `scalegen data pack`")
CHOICES = {"precision": list(PRECISIONS), "logger": list(LOGGERS)}


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends each option with its default, except where there is none (or the help says it in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other scalegen error (exit code 2), and whose help
    shows every option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        print(f"scalegen: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number of `kind` that is at least `minimum`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    value = at_least(0.0, float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


POSITIVE = at_least(1)
NON_NEGATIVE = at_least(0)
NON_NEGATIVE_FLOAT = at_least(0.0, float)


def integers(text: str) -> tuple[int, ...]:
    """"1,2,3" → (1, 2, 3) for argparse."""
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def floats(text: str) -> tuple[float, ...]:
    """"0.9,0.95" → (0.9, 0.95) for argparse."""
    try:
        return tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def add_init_from(parser: argparse.ArgumentParser) -> None:
    """`--init-from`, the fine-tuning option of `train dit`, `train var` and `train vqvae`."""
    parser.add_argument("--init-from", metavar="CKPT",
                        help="fine-tune: start from these weights (official .pt/.pth, a run or an export); another "
                             "number of classes re-initialises only the class embedding")


def add_training_options(parser: argparse.ArgumentParser, task: type[TrainingTask]) -> None:
    """The loop options of every `scalegen train` command; their defaults are `task`'s recipe and `TrainConfig`'s."""
    recipe = task.recipe
    for field in fields(TrainConfig):
        flag = FLAG_NAMES.get(field.name, "--" + field.name.replace("_", "-"))
        help_text = TRAINING_HELP[field.name]
        smallest = MINIMUMS.get(field.name)  # its type is the setting's (1: int, 0.0: float)
        kind = at_least(smallest, type(smallest)) if smallest is not None else type(getattr(recipe, field.name,
                                                                                            field.default))
        if field.default is MISSING:  # out, steps
            parser.add_argument(flag, dest=field.name, required=True, type=str if field.name == "out" else kind,
                                help=help_text)
        elif field.default is None and hasattr(recipe, field.name):  # the recipe's setting
            value = task.recipe_notes.get(field.name, getattr(recipe, field.name))
            parser.add_argument(flag, dest=field.name, type=floats if field.name == "betas" else kind, default=None,
                                help=f"{help_text} (recipe: {value})")
        elif isinstance(field.default, bool):
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=field.default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=str if smallest is None and field.default is None else kind,
                                default=field.default, choices=CHOICES.get(field.name), help=help_text)


def add_precision_option(parser: argparse.ArgumentParser) -> None:
    """`--precision` of the sampling commands: fp32 (the official numbers) unless asked."""
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="autocast of the network: fp32 is exact; bf16 (or auto: bf16 where the GPU or CPU has "
                             "bf16 matrix units) is faster")


def dataclass_from_args(cls: type[Options], args: argparse.Namespace, **values) -> Options:
    """An option dataclass from the parsed arguments that share its field names (plus `values`)."""
    names = {field.name for field in fields(cls)}
    return cls(**{**{name: getattr(args, name) for name in names if hasattr(args, name)}, **values})


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The loop settings of a parsed `scalegen train` command."""
    return dataclass_from_args(TrainConfig, args)
