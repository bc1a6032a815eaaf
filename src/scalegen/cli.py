"""The `scalegen` command line: one entry point, sub-commands registered by the modules that implement them."""
from __future__ import annotations

import argparse
import sys

from scalegen import checkpoint, classifier, demo, dit_commands, evaluate, var_commands
from scalegen.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (train / sample / demo and the evaluation commands)."""
    parser = argparse.ArgumentParser(prog="scalegen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train_parsers = commands.add_parser("train", help="train a model").add_subparsers(dest="model", required=True)
    sample_parsers = commands.add_parser("sample", help="sample a trained model").add_subparsers(dest="model", required=True)
    dit_commands.register(train_parsers, sample_parsers)
    var_commands.register(train_parsers, sample_parsers, commands)
    classifier.register(train_parsers)
    demo.register(commands)
    evaluate.register(commands)
    checkpoint.register(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the chosen command; a UserError becomes a one-line message and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except UserError as error:
        print(f"scalegen: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("scalegen: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)
