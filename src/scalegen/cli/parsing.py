"""The command line's argument parser: one-line errors, help that shows each default, and run configurations —
a command's options read from a YAML file (`--config`) or written as one (`--print-config`).

A run configuration maps each option's name (its flag with underscores: `batch_size`, `ema`, `no_attention`) to its
value (a switch: true or false); null leaves the option at its default. Older files name an option by its dest (as the
library's option dataclasses spell it: `ema_decay`, `use_attention`), which still reads. This module
imports neither torch nor any command, so that `scalegen --help` answers at once.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import yaml

from scalegen.errors import UserError

CONFIG_DEST, PRINT_CONFIG_DEST = "config", "print_config"
EFFECTIVE_OPTIONS = "effective_options"  # the namespace attribute of a parsed command with --config: its options
STANDARD_OUTPUT = "-"  # --print-config's target when it names no file


def number(text: str, kind: type = float) -> float:
    """`text` as a number of `kind` (int or float); a float must be finite (NaN and infinity mean no setting)."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def finite_float(text: str) -> float:
    """An argparse type: any finite number."""
    return number(text, float)


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number of `kind` (a float: finite) that is at least `minimum`."""

    def parse(text: str):
        value = number(text, kind)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    value = number(text, float)
    if not 0 <= value <= 1:
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
    """"0.9,0.95" → (0.9, 0.95) for argparse, each finite."""
    try:
        return tuple(number(item) for item in text.split(",") if item.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of finite numbers") from None


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


def module_docstring(name: str) -> str | None:
    """The docstring of the module `name`, read from its source without importing it (a command's description whose
    module imports torch)."""
    return ast.get_docstring(ast.parse(Path(importlib.util.find_spec(name).origin).read_text()))


def config_key(action: argparse.Action) -> str:
    """The name of `action` in a run configuration: its flag's, dashes as underscores (`--ema` → `ema`)."""
    return action.option_strings[0].lstrip("-").replace("-", "_")


def is_switch(action: argparse.Action) -> bool:
    """Whether `action` is a switch that takes no value (`--latent-cache`, `--no-attention`), not `--flip/--no-flip`."""
    return action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)


def config_value(action: argparse.Action, parsed: argparse.Namespace) -> object:
    """The configuration's value of `action` in `parsed`: a switch is true when given (its dest holds `const`)."""
    value = getattr(parsed, action.dest)
    return value is action.const if is_switch(action) else value


def typed_arguments(action: argparse.Action, name: str, value: object, path: str | Path) -> list[str]:
    """A configuration's `value` for `action`, named `name` (its key, or its dest as older files name it), as the
    command line would give it (argparse then checks its type and choices): `--flag=VALUE`, a switch, or nothing for
    null (the default)."""
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction) or (is_switch(action) and name == config_key(action)):
        if not isinstance(value, bool):
            raise UserError(f"{path}: {name} must be true or false, not {json.dumps(value)}")
        if is_switch(action):
            return [action.option_strings[0]] if value else []
        return [action.option_strings[0 if value else 1]]
    if action.nargs == 0:  # a switch named by its dest: its value is `const` when given, `default` when not
        if value is action.const or value is action.default:
            return [action.option_strings[0]] if value is action.const else []
        raise UserError(f"{path}: {name} must be {json.dumps(action.const)} ({action.option_strings[0]}) or "
                        f"{json.dumps(action.default)}, not {json.dumps(value)}")
    text = ",".join(str(item) for item in value) if isinstance(value, list) else str(value)
    return [f"{action.option_strings[0]}={text}"]


def suggestion(name: str, names: Collection[str]) -> str:
    """" (did you mean X?)" for the name in `names` closest to a mistyped `name`, or nothing."""
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other scalegen error (exit code 2), whose help shows
    every option's default, and which reads run configurations for the commands that ask (`add_config_options`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)
        self.reads_config = False
        self.effective: Callable[[argparse.Namespace], dict] | None = None

    def error(self, message: str) -> None:
        print(f"scalegen: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)

    def unrecognized(self, extras: Sequence[str]) -> None:
        """Refuse `extras`, the arguments this command does not take, suggesting the closest flag of a mistyped one."""
        flags = [flag for action in self._actions for flag in action.option_strings]
        hints = "".join(suggestion(extra.split("=")[0], flags) for extra in extras if extra.startswith("-"))
        self.error(f"unrecognized arguments: {' '.join(extras)}{hints}")

    def add_config_options(self, effective: Callable[[argparse.Namespace], dict] | None = None) -> None:
        """Add `--config FILE` (this command's options from a run configuration; the command line wins) and
        `--print-config [FILE]` (write the effective configuration and exit).

        Args:
            effective: the values, by dest, that options left unset (None) take when the command runs (e.g. a training
                recipe's); the configuration shows those instead of null.
        """
        self.add_argument("--config", metavar="FILE.yaml",
                          help="read options from this YAML file, one `name: value` per line with the option's flag "
                               "in underscores (batch_size: 64); options given on the command line win")
        self.add_argument("--print-config", nargs="?", const=STANDARD_OUTPUT, metavar="FILE",
                          help="write every option of this command with its effective value as such a file (to "
                               "stdout, or to FILE) and exit")
        self.reads_config, self.effective = True, effective

    def option_actions(self) -> dict[str, argparse.Action]:
        """The options a run configuration can set, by key (`config_key`): all but --help, --config and
        --print-config."""
        return {config_key(action): action for action in self._actions if action.option_strings
                and action.default is not argparse.SUPPRESS and action.dest not in (CONFIG_DEST, PRINT_CONFIG_DEST)}

    def effective_options(self, parsed: argparse.Namespace) -> dict:
        """The run configuration of `parsed`: each option's key with its value, an unset one's as it will take it."""
        options = self.option_actions()
        unset = {action.dest for action in options.values()
                 if getattr(parsed, action.dest) is None and not is_switch(action)}
        try:
            resolved = self.effective(parsed) if self.effective is not None and unset else {}
        except UserError as error:  # settings that do not go together (the library's own checks)
            self.error(str(error))
        return {key: resolved.get(action.dest) if action.dest in unset else config_value(action, parsed)
                for key, action in options.items()}

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
        by_dest = {action.dest: action for action in actions.values()}  # the names of older files
        try:
            values = read_options(path)
            unknown = [str(name) for name in values if name not in actions and name not in by_dest]
            if unknown:
                hint = suggestion(unknown[0], actions) or f"; the options of `{self.prog}` are {', '.join(actions)}"
                raise UserError(f"{path}: unknown option {unknown[0]!r}{hint}")
            return [argument for name, value in values.items()
                    for argument in typed_arguments(actions.get(name) or by_dest[name], name, value, path)]
        except UserError as error:
            self.error(str(error))

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """argparse's parse; a command with config options first reads its --config file, whose options go before
        the command line's (so that those win and argparse checks them alike), then keeps its effective options in
        the namespace (`EFFECTIVE_OPTIONS`), or writes them and exits for --print-config."""
        if not self.reads_config:
            parsed, extras = super().parse_known_args(args, namespace)
            if extras and not self._subparsers:  # a command's own parser: nothing after it can take them
                self.unrecognized(extras)
            return parsed, extras
        args = list(sys.argv[1:] if args is None else args)
        with self.nothing_required():
            first, _ = super().parse_known_args(args)
        target = getattr(first, PRINT_CONFIG_DEST)
        if getattr(first, CONFIG_DEST) is not None:
            args = [*self.file_arguments(getattr(first, CONFIG_DEST)), *args]
        with self.nothing_required() if target is not None else nullcontext():
            parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.unrecognized(extras)
        options = self.effective_options(parsed)
        if target is None:
            setattr(parsed, EFFECTIVE_OPTIONS, options)
            return parsed, extras
        if target == STANDARD_OUTPUT:
            sys.stdout.write(options_text(options))
        else:
            try:
                Path(target).write_text(options_text(options))
            except OSError as error:
                self.error(f"cannot write {target}: {error.strerror}")
        sys.exit(0)
