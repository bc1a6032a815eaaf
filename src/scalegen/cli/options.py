"""Options shared by several commands, and the step from parsed arguments to the library's option dataclasses.

No command adds a default of its own: each option's default is the library's (a field default of the dataclass it
fills, or the task's recipe), so `scalegen train var` and `train(VARTask(...), ...)` in Python train alike.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import MISSING, asdict, fields
from functools import partial
from importlib import import_module
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, TypeVar

from scalegen.cli.parsing import (
    EFFECTIVE_OPTIONS, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, OneLineParser, at_least, finite_float, floats,
    integers, options_text,
)
from scalegen.data.names import SOURCE_DESCRIPTIONS
from scalegen.errors import UserError
from scalegen.models.settings import preset_dimensions
from scalegen.precision import PRECISIONS
from scalegen.train.settings import (
    EVALUATED_WEIGHTS, LOGGERS, MINIMUMS, RECIPE_FIELDS, RECIPE_NOTES, RECIPES, TrainConfig,
)
from scalegen.train.task_options import ReconstructionLosses

if TYPE_CHECKING:  # the tasks import torch: a command imports its task only once it runs (or resolves its recipe)
    from scalegen.train.task import TrainingTask

Options = TypeVar("Options")
# Each `scalegen train` task by its kind (the key of its recipe in `RECIPES`): the module and class that train it.
TASKS = {
    "dit": ("scalegen.train.dit_task", "DiTTask"),
    "klvae": ("scalegen.train.kl_task", "KLVAETask"),
    "vqvae": ("scalegen.train.tokenizer_task", "VQVAETask"),
    "var": ("scalegen.train.var_task", "VARTask"),
    "classifier": ("scalegen.train.classifier_task", "ClassifierTask"),
}
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
    "ema_warmup": "warm the EMA decay up: min(--ema, (1 + n) / (10 + n)) at step n, so early samples are not the "
                  "initial weights (--no-ema-warmup: constant decay, as the official DiT)",
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
    "eval_every": "score generated samples every N steps into RUN/eval.csv: FID (and the asked class's accuracy) in "
                  "the shipped classifier's features on Fashion-MNIST, else FID, sFID, IS with --eval-inception and "
                  "--eval-reference (0: never)",
    "eval_samples": "samples of each evaluation, over all ranks",
    "eval_weights": "the weights evaluated (raw for a run without EMA)",
    "eval_inception": "Inception weights (pt_inception-2015-12-05-6726825d.pth) for evaluating other data",
    "eval_reference": "reference of the evaluation for other data: an ADM .npz (images or statistics) or an image folder",
}
COMPILE_WHOLE_MODEL_HELP = "torch.compile the whole model in place (it has no transformer blocks; same checkpoint keys)"


def data_help() -> str:
    """`--data`'s help: the built-in kinds of data source in words (`SOURCE_DESCRIPTIONS`), in the order they are
    tried. Kinds registered at run time are not listed: their modules import the data code (torch), which `--help`
    does not load."""
    *first, last = SOURCE_DESCRIPTIONS.values()
    return "; ".join(first) + f"; or {last}"


DATA_HELP = data_help()
TOKENIZER_DATA_HELP = f"{DATA_HELP}; default: the data the --tokenizer run was trained on, else fashion-mnist"


def tokenizer_data(tokenizer: str | None) -> str | None:
    """The data a `--tokenizer` run (or its export) was trained on, as its config records them; None for an official
    file or none given."""
    from scalegen.runs.weights import stored_config

    if tokenizer is None or not Path(tokenizer).is_dir():
        return None
    try:
        return stored_config(tokenizer).get("data")
    except UserError:  # no run: the loader says what is wrong with it
        return None


def training_data(args: argparse.Namespace, say: bool = False) -> str:
    """`--data` of a parsed `train dit` or `train var` (TOKENIZER_DATA_HELP): the one given, else the data its
    --tokenizer was trained on (said on rank 0's standard output with `say`, as the other lines a run starts with),
    else Fashion-MNIST, the options' default."""
    from scalegen.classes import FASHION_MNIST_NAME
    from scalegen.distributed import launched_as_main

    if args.data is not None:
        return args.data
    data = tokenizer_data(args.tokenizer)
    if data is None:
        return FASHION_MNIST_NAME
    if say and launched_as_main():
        print(f"training on {data}, the data the tokenizer {args.tokenizer} was trained on (--data to change)")
    return data


def add_init_from(parser: argparse.ArgumentParser, class_conditional: bool = True) -> None:
    """`--init-from`, the fine-tuning option of `train dit`, `train var` (`class_conditional`) and `train vqvae`."""
    help_text = "fine-tune: start from these weights (official .pt/.pth, a run or an export)"
    if class_conditional:
        help_text += "; another number of classes re-initialises only the class embedding"
    parser.add_argument("--init-from", metavar="CKPT", help=help_text)


def add_autoencoder_options(parser: argparse.ArgumentParser, defaults) -> None:
    """The data and convolutional architecture options every tokenizer command shares (`train vqvae`, `train kl`);
    `defaults` is its options dataclass."""
    parser.add_argument("--data", default=defaults.data, help=DATA_HELP)
    parser.add_argument("--image-size", type=POSITIVE, default=defaults.image_size, help="image side in pixels")
    parser.add_argument("--ch", type=POSITIVE, default=defaults.ch, help="base width of encoder and decoder")
    parser.add_argument("--ch-mult", type=integers, default=defaults.ch_mult,
                        help="width multiplier per resolution level (every level but the last halves the side)")
    parser.add_argument("--num-res-blocks", type=POSITIVE, default=defaults.num_res_blocks,
                        help="residual blocks per resolution level")
    parser.add_argument("--norm-groups", type=POSITIVE, default=defaults.norm_groups,
                        help="GroupNorm groups (divide every level width)")


def add_reconstruction_loss_options(parser: argparse.ArgumentParser, losses: ReconstructionLosses) -> None:
    """The loss options every tokenizer command shares: L1/L2, LPIPS, the patch GAN and its discriminator."""
    parser.add_argument("--l1", type=NON_NEGATIVE_FLOAT, default=losses.l1, help="weight of the L1 reconstruction loss")
    parser.add_argument("--l2", type=NON_NEGATIVE_FLOAT, default=losses.l2, help="weight of the L2 reconstruction loss")
    parser.add_argument("--lpips-weights", default=None, help="local LPIPS-VGG state dict; enables the perceptual loss")
    parser.add_argument("--lpips-weight", dest="lpips", type=NON_NEGATIVE_FLOAT, default=losses.lpips,
                        help="weight of LPIPS (with --lpips-weights)")
    parser.add_argument("--gan-weight", dest="gan", type=NON_NEGATIVE_FLOAT, default=losses.gan,
                        help="patch-GAN weight (0: no GAN)")
    parser.add_argument("--gan-start-step", type=NON_NEGATIVE, default=losses.gan_start_step,
                        help="step at which the GAN loss starts")
    parser.add_argument("--disc-width", dest="discriminator_width", type=POSITIVE, default=losses.discriminator_width,
                        help="patch discriminator base width")
    parser.add_argument("--disc-layers", dest="discriminator_layers", type=POSITIVE,
                        default=losses.discriminator_layers, help="patch discriminator layers")
    parser.add_argument("--disc-lr", dest="discriminator_lr", type=NON_NEGATIVE_FLOAT, default=losses.discriminator_lr,
                        help="discriminator lr (default: --lr)")


def task_class(task: str) -> type[TrainingTask]:
    """The class of the `scalegen train` task `task` (imported here: it imports torch)."""
    module, name = TASKS[task]
    return getattr(import_module(module), name)


def add_training_options(parser: OneLineParser, task: str, help_texts: Mapping[str, str] | None = None) -> None:
    """The loop options of every `scalegen train` command, and its run configuration (`--config`, `--print-config`,
    which show the recipe's values the run takes); their defaults are the recipe of the task `task` (a key of `TASKS`)
    and `TrainConfig`'s, their help TRAINING_HELP's unless `help_texts` has it."""
    choices = {"precision": list(PRECISIONS), "logger": list(LOGGERS), "eval_weights": list(EVALUATED_WEIGHTS)}
    recipe, notes = RECIPES[task], RECIPE_NOTES.get(task, {})
    for field in fields(TrainConfig):
        flag = FLAG_NAMES.get(field.name, "--" + field.name.replace("_", "-"))
        help_text = (help_texts or {}).get(field.name, TRAINING_HELP[field.name])
        smallest = MINIMUMS.get(field.name)  # its type is the setting's (1: int, 0.0: float)
        if smallest is not None:
            kind = at_least(smallest, type(smallest))
        else:
            kind = type(getattr(recipe, field.name, field.default))
            kind = finite_float if kind is float else kind
        if field.default is MISSING:  # out, steps
            parser.add_argument(flag, dest=field.name, required=True, type=str if field.name == "out" else kind,
                                help=help_text)
        elif field.default is None and hasattr(recipe, field.name):  # the recipe's setting
            value = notes.get(field.name, getattr(recipe, field.name))
            parser.add_argument(flag, dest=field.name, type=floats if field.name == "betas" else kind, default=None,
                                help=f"{help_text} (recipe: {value})")
        elif isinstance(field.default, bool):
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=field.default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=str if smallest is None and field.default is None else kind,
                                default=field.default, choices=choices.get(field.name), help=help_text)
    parser.add_config_options(partial(effective_values, task))


def effective_values(task: str, args: argparse.Namespace) -> dict:
    """The options, by dest, that a parsed `scalegen train` command leaves unset and its run takes from elsewhere,
    found without building a model: a DiT preset's dimensions, the loop settings of the recipe of the task `task` (`trainer.resolved_config`;
    the task's `training_defaults` reads the recipe and the task's options, e.g. VAR's base_lr, which the parsed
    arguments hold) and the data of a run on a tokenizer (`training_data`). Without --steps (a template) the settings
    the recipe computes (its `RECIPE_NOTES`) stay unset."""
    recipe, notes = RECIPES[task], RECIPE_NOTES.get(task, {})
    data = {"data": training_data(args)} if "tokenizer" in vars(args) and args.data is None else {}
    # a DiT's preset (`--model`) gives the dimensions its overrides (--depth, --hidden-size, ...) leave unset
    data.update(preset_dimensions(args.model) if "model" in vars(args) else {})
    if args.steps is None:
        return {**data, **{name: getattr(recipe, name) for name in RECIPE_FIELDS if name not in notes}}
    from scalegen.train.trainer import resolved_config  # torch: only once a run's values are asked for

    options = SimpleNamespace(**vars(args), recipe=recipe)
    options.training_defaults = partial(task_class(task).training_defaults, options)
    return {**data, **asdict(resolved_config(train_config_from_args(args), options))}


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` through a temporary file renamed over `path`."""
    from scalegen.files import replace_atomically

    replace_atomically(path, lambda temporary: temporary.write_text(text))


@contextmanager
def options_in_run_folder(args: argparse.Namespace) -> Iterator[None]:
    """While a parsed `scalegen train` command runs, keep its options in its run folder (RUN/options.yaml, written by
    rank 0), where `--config` reads them back; a command refused as bad input (a UserError: another model in RUN, a
    broken data set) puts back what was there before."""
    from scalegen.distributed import launched_as_main
    from scalegen.runs.folder import OPTIONS_FILE

    if not launched_as_main():
        yield
        return
    run = Path(args.out)
    path = run / OPTIONS_FILE
    created = not run.exists()
    earlier = path.read_text() if path.exists() else None
    run.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, options_text(getattr(args, EFFECTIVE_OPTIONS)))
    try:
        yield
    except UserError:
        if earlier is not None:
            write_text_atomic(path, earlier)
        else:
            path.unlink(missing_ok=True)
            if created:
                with suppress(OSError):  # only when empty
                    run.rmdir()
        raise
