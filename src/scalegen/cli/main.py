"""The `scalegen` command line: one entry point, sub-commands registered by the modules that implement them."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Collection
from contextlib import nullcontext
from importlib import import_module
from importlib.metadata import version

from scalegen.cli.parsing import EFFECTIVE_OPTIONS, OneLineParser
from scalegen.errors import InputWarning, UserError

DEBUG_VARIABLE = "SCALEGEN_DEBUG"
# Each command: its one-line help and the modules under scalegen/cli/ that add it (`scalegen --help` lists the
# commands from here and a command imports only its own modules; those build their parsers from torch-free modules
# and import torch and the models only in their handlers, so every --help and parse error answers at once).
# tests/cli/test_run_config.py checks that each help here is the one its module gives.
COMMANDS = {
    "train": ("train a model", ("dit", "var", "classifier")),
    "sample": ("sample a trained model", ("dit", "var")),
    "edit": ("zero-shot editing", ("var",)),
    "demo": ("sample the shipped Fashion-MNIST DiT, MeanFlow DiT and VAR: grids, speed, FLOPs, FID", ("demo",)),
    "eval": ("FID, sFID, IS, precision/recall as the ADM evaluator", ("eval",)),
    "flops": ("DiT Gflops (multiply-accumulates, as the DiT paper) against the paper; DiT vs VAR cost per image",
              ("eval",)),
    "scaling": ("fit L = (a*X)^b over runs and plot it on log-log axes", ("eval",)),
    "export": ("copy a run's final (EMA) weights into a small self-contained folder", ("export",)),
    "data": ("prepare training data", ("data",)),
    "serve": ("a web page to sample and edit with a DiT and a VAR (Gradio)", ("serve",)),
    "reconstruct": ("images through a tokenizer and back: a grid of pairs, PSNR, rFID", ("reconstruct",)),
    "plot": ("training curves of runs (their log.csv) in one image", ("plot",)),
}
NESTED = ("train", "sample")  # commands whose sub-commands (dit, var, …) several modules add
PYTHON_WARNING_FORMAT = warnings.formatwarning


def build_parser(loaded: Collection[str] = tuple(COMMANDS)) -> argparse.ArgumentParser:
    """The argument parser: the commands in `loaded` (all by default) with their options, the others by name and
    help only, which is all `scalegen --help` needs."""
    parser = OneLineParser(prog="scalegen", description=__doc__)
    parser.add_argument("--version", action="version", version=f"scalegen {version('scalegen')}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of any error (also with {DEBUG_VARIABLE}=1)")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parsers, sample_parsers = (commands.add_parser(name, help=COMMANDS[name][0]).add_subparsers(
        dest="model", required=True) for name in NESTED)
    modules = dict.fromkeys(module for name in loaded for module in COMMANDS[name][1])
    for name, (help_text, owners) in COMMANDS.items():
        if name not in NESTED and not modules.keys() & set(owners):
            commands.add_parser(name, help=help_text)
    for module in modules:
        add_commands(module, commands, train_parsers, sample_parsers)
    return parser


def add_commands(module: str, commands, train_parsers, sample_parsers) -> None:
    """Import the command module `module` (scalegen/cli/MODULE.py) and let it add its commands."""
    register = import_module(f"scalegen.cli.{module}").register
    if module == "dit":
        register(train_parsers, sample_parsers)
    elif module == "var":
        register(train_parsers, sample_parsers, commands)
    elif module == "classifier":
        register(train_parsers)
    else:
        register(commands)


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     line: str | None = None) -> str:
    """A warning as the command line shows it: an `InputWarning` (an unreadable image skipped) as one line that names
    what is skipped, not Python's two with the source line of whichever frame issued it (a data loader's); any other
    as Python shows it."""
    if issubclass(category, InputWarning):
        return f"scalegen: warning: {message}\n"
    return PYTHON_WARNING_FORMAT(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the chosen command; a UserError becomes a one-line message and exit code 2.

    Training stopped by SIGTERM, SIGINT or SIGUSR1 (with a checkpoint written) ends with a line naming the checkpoint
    and exit code 128 + the signal's number: 143, 130, 138; a hard interrupt (a second Ctrl-C) with 130.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser([command] if command in COMMANDS else []).parse_args(argv)
    warnings.formatwarning = one_line_warning  # the data loader's workers, forked later, show warnings alike
    # Needed only once a command runs (they import torch, which --help and parse errors do without).
    from scalegen.cli.options import options_in_run_folder
    from scalegen.files import is_disk_full, write_failure
    from scalegen.train.stopping import SIGNAL_EXIT_BASE, StoppedBySignal

    debug = args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    try:
        # A training command keeps its options in its run folder (RUN/options.yaml).
        with options_in_run_folder(args) if hasattr(args, EFFECTIVE_OPTIONS) else nullcontext():
            args.handler(args)
    except UserError as error:
        if debug:
            raise
        print(f"scalegen: error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # a full disk or a path that cannot be written (run folders word it themselves)
        if debug or not (is_disk_full(error) or error.filename is not None):
            raise
        print(f"scalegen: error: {write_failure(error)}: {error.filename or 'a file'}; free space or choose another "
              "path", file=sys.stderr)
        sys.exit(2)
    except StoppedBySignal as stopped:  # not an error: the run can go on from its checkpoint
        print(f"scalegen: {stopped}", file=sys.stderr)
        sys.exit(stopped.exit_code)
    except KeyboardInterrupt as interrupt:  # training says what is on disk (stopping.Interrupted); elsewhere nothing
        if debug:
            raise
        print(f"scalegen: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        sys.exit(SIGNAL_EXIT_BASE + signal.SIGINT)
