"""The `scalegen` command line: one entry point, sub-commands registered by the modules that implement them."""
from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import version

from scalegen.cli import classifier, demo, dit, export, serve, var
from scalegen.cli import data as data_commands
from scalegen.cli.options import OneLineParser
from scalegen.cli import eval as evaluation
from scalegen.errors import UserError
from scalegen.files import is_disk_full, write_failure

DEBUG_VARIABLE = "SCALEGEN_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (train / sample / edit / demo / export and the evaluation commands)."""
    parser = OneLineParser(prog="scalegen", description=__doc__)
    parser.add_argument("--version", action="version", version=f"scalegen {version('scalegen')}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of any error (also with {DEBUG_VARIABLE}=1)")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parsers = commands.add_parser("train", help="train a model").add_subparsers(dest="model", required=True)
    sample_parsers = commands.add_parser("sample", help="sample a trained model").add_subparsers(dest="model", required=True)
    dit.register(train_parsers, sample_parsers)
    var.register(train_parsers, sample_parsers, commands)
    classifier.register(train_parsers)
    demo.register(commands)
    evaluation.register(commands)
    export.register(commands)
    data_commands.register(commands)
    serve.register(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the chosen command; a UserError becomes a one-line message and exit code 2."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    try:
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
    except KeyboardInterrupt:
        if debug:
            raise
        print("scalegen: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)
