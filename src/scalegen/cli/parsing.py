"""The command line's argument parser: one-line errors, help that shows each default, and run configurations —
a command's options read from a YAML file (`--config`) or written as one (`--print-config`).

A run configuration maps each option's dest name (the name with underscores, as the library's option dataclasses
spell it: `batch_size`, `ema_decay`, `patch_nums`) to its value; null leaves the option at its default. This module
imports neither torch nor any command, so that `scalegen --help` answers at once.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import yaml

from scalegen.errors import UserError

CONFIG_DEST, PRINT_CONFIG_DEST = "config", "print_config"
EFFECTIVE_OPTIONS = "effective_options"  # the namespace attribute of a parsed command with --config: its options
STANDARD_OUTPUT = "-"  # --print-config's target when it names no file


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends each option with its default, except where there is none, where the option is a switch (its
    help says what it does) or where the help says the default in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0 or "(default" in action.help:
            return action.help
        return super()._get_help_string(action)


def read_options(path: str | Path) -> dict:
    """The options of a run configuration (a YAML mapping of option names to values); an empty file has none."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise UserError(f"cannot read the configuration {path}: {error.strerror}; check the path") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        reason = getattr(error, "problem", None) or " ".join(str(error).split())
        raise UserError(f"{path} is not valid YAML{where} ({reason}); write one `option: value` per line") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path} holds a YAML {type(values).__name__}, not a mapping; write one `option: value` "
                        "per line")
    return values


def options_text(options: dict) -> str:
    """`options` (names to values) as the YAML text of a run configuration, in their order."""
    plain = {name: list(value) if isinstance(value, tuple) else value for name, value in options.items()}
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=False, allow_unicode=True)


def typed_arguments(action: argparse.Action, value: object, path: str | Path) -> list[str]:
    """A configuration's `value` for `action` as the command line would give it (argparse then checks its type and
    choices): `--flag=VALUE`, a switch, or nothing for null (the default)."""
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise UserError(f"{path}: {action.dest} must be true or false, not {json.dumps(value)}")
        return [action.option_strings[0 if value else 1]]
    if action.nargs == 0:  # a switch: its value is `const` when given, `default` when not
        if value is action.const or value is action.default:
            return [action.option_strings[0]] if value is action.const else []
        raise UserError(f"{path}: {action.dest} must be {json.dumps(action.const)} ({action.option_strings[0]}) or "
                        f"{json.dumps(action.default)}, not {json.dumps(value)}")
    text = ",".join(str(item) for item in value) if isinstance(value, list) else str(value)
    return [f"{action.option_strings[0]}={text}"]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other scalegen error (exit code 2), whose help shows
    every option's default, and which reads run configurations for the commands that ask (`add_config_options`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)
        self.reads_config = False

    def error(self, message: str) -> None:
        print(f"scalegen: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)

    def add_config_options(self) -> None:
        """Add `--config FILE` (this command's options from a run configuration; the command line wins) and
        `--print-config [FILE]` (write the effective configuration and exit)."""
        self.add_argument("--config", metavar="FILE.yaml",
                          help="read options from this YAML file, one `name: value` per line with the option's name "
                               "in underscores (batch_size: 64); options given on the command line win")
        self.add_argument("--print-config", nargs="?", const=STANDARD_OUTPUT, metavar="FILE",
                          help="write every option of this command with its value as such a file (to stdout, or "
                               "to FILE) and exit")
        self.reads_config = True

    def option_actions(self) -> dict[str, argparse.Action]:
        """The options a run configuration can set, by dest: all but --help, --config and --print-config."""
        return {action.dest: action for action in self._actions if action.option_strings
                and action.default is not argparse.SUPPRESS and action.dest not in (CONFIG_DEST, PRINT_CONFIG_DEST)}

    @contextmanager
    def nothing_required(self) -> Iterator[None]:
        """Parse without requiring any option (the file may give it, or --print-config shows it as null)."""
        required = [action for action in self._actions if action.required]
        for action in required:
            action.required = False
        try:
            yield
        finally:
            for action in required:
                action.required = True

    def file_arguments(self, path: str) -> list[str]:
        """The options of the run configuration at `path` as command-line arguments."""
        actions = self.option_actions()
        try:
            values = read_options(path)
            unknown = [str(name) for name in values if name not in actions]
            if unknown:
                raise UserError(f"{path}: unknown option {unknown[0]!r}; the options of `{self.prog}` are "
                                f"{', '.join(actions)}")
            return [argument for name, value in values.items()
                    for argument in typed_arguments(actions[name], value, path)]
        except UserError as error:
            self.error(str(error))

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """argparse's parse; a command with config options first reads its --config file, whose options go before
        the command line's (so that those win and argparse checks them alike), then keeps its effective options in
        the namespace (`EFFECTIVE_OPTIONS`), or writes them and exits for --print-config."""
        if not self.reads_config:
            return super().parse_known_args(args, namespace)
        args = list(sys.argv[1:] if args is None else args)
        with self.nothing_required():
            first, _ = super().parse_known_args(args)
        target = getattr(first, PRINT_CONFIG_DEST)
        if getattr(first, CONFIG_DEST) is not None:
            args = [*self.file_arguments(getattr(first, CONFIG_DEST)), *args]
        with self.nothing_required() if target is not None else nullcontext():
            parsed, extras = super().parse_known_args(args, namespace)
        options = {name: getattr(parsed, name) for name in self.option_actions()}
        if target is None:
            setattr(parsed, EFFECTIVE_OPTIONS, options)
            return parsed, extras
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        if target == STANDARD_OUTPUT:
            sys.stdout.write(options_text(options))
        else:
            try:
                Path(target).write_text(options_text(options))
            except OSError as error:
                self.error(f"cannot write {target}: {error.strerror}")
        sys.exit(0)
