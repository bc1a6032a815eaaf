"""Run configurations (`--config`, `--print-config`, RUN/options.yaml), a top-level help that imports no command, and
help texts that are true for their command."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import yaml

from scalegen.cli.main import build_parser, main
from scalegen.cli.parsing import DefaultsFormatter
from scalegen.runs.folder import OPTIONS_FILE
from scalegen.train.dit_task import DiTOptions, DiTTask
from scalegen.train.guards import changed_settings
from scalegen.train.tokenizer_task import VQVAETask
from tests_support import training_error, user_error, write_fashion_subset

TINY_DIT = ["--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "4",
            "--image-size", "8", "--batch-size", "8", "--device", "cpu"]
TOKENIZER = ["--patch-nums", "1,2", "--ch", "8", "--ch-mult", "1,1", "--no-attention", "--no-flip", "--lr", "1e-3"]


def printed_config(argv: list[str], capsys) -> str:
    """The YAML that `--print-config` writes to stdout for `argv`."""
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--print-config"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


def command_help(argv: list[str], capsys) -> str:
    """A command's --help, its whitespace collapsed (argparse wraps lines at the terminal's width)."""
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", [["train", "dit", *TINY_DIT], ["train", "vqvae", *TOKENIZER]])
def test_a_printed_configuration_reads_back_to_the_same_options(command, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    with pytest.raises(SystemExit):
        main([*command, "--out", "RUN", "--steps", "3", "--print-config", str(path)])
    stored = yaml.safe_load(path.read_text())
    assert stored["out"] == "RUN" and stored["steps"] == 3
    assert stored["batch_size"] == (8 if "dit" in command else VQVAETask.recipe.batch_size)  # the run's, not null
    assert printed_config([*command[:2], "--config", str(path)], capsys) == path.read_text()
    assert "\nsteps: 3\n" in path.read_text()  # one `name: value` line per option
    if "vqvae" in command:
        assert stored["patch_nums"] == [1, 2] and stored["no_attention"] is True and stored["flip"] is False
        assert stored["lr"] == 1e-3


def test_the_command_line_overrides_the_file_and_a_template_needs_no_required_option(tmp_path, capsys):
    template = yaml.safe_load(printed_config(["train", "dit"], capsys))
    assert template["out"] is None and template["steps"] is None and template["model"] == DiTOptions().model
    path = tmp_path / "run.yaml"
    path.write_text("batch_size: 16\nlr: 1e-4\nsteps: 5\nout: RUN\nlatent_cache: true\n")
    printed = yaml.safe_load(printed_config(["train", "dit", "--config", str(path), "--batch-size", "4"], capsys))
    assert (printed["batch_size"], printed["lr"], printed["steps"], printed["latent_cache"]) == (4, 1e-4, 5, True)


@pytest.mark.parametrize("text, named", [
    ("batchsize: 8\n", "unknown option 'batchsize'"),
    ("steps: many\n", "--steps"),
    ("flip: 3\n", "flip must be true or false"),
    ("- steps\n", "not a mapping"),
])
def test_a_bad_configuration_is_a_one_line_error(text, named, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    message = user_error(["train", "dit", "--config", str(path), "--out", "RUN", "--steps", "1"], capsys)
    assert named in message
    if "unknown" in named:
        assert "batch_size" in message  # the valid names


def test_training_keeps_its_options_in_the_run_folder_and_resuming_names_a_changed_model_setting(tmp_path, capsys):
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {write_fashion_subset(tmp_path)}\nsteps: 1\nsample_steps: 2\n")
    main(["train", "dit", *TINY_DIT, "--config", str(config), "--out", str(run)])
    stored = yaml.safe_load((run / OPTIONS_FILE).read_text())
    assert stored["steps"] == 1 and stored["hidden_size"] == 32 and stored["out"] == str(run)
    assert stored["lr"] == DiTTask.recipe.lr and stored["ema"] == DiTTask.recipe.ema_decay  # what the run took
    message = training_error(["train", "dit", *TINY_DIT, "--image-size", "16", "--config", str(config), "--out",
                              str(run)], capsys)
    assert "holds a different model: input_size 16 (was 8);" in message
    assert yaml.safe_load((run / OPTIONS_FILE).read_text())["image_size"] == 8  # the refused options are not kept


def test_changed_settings_names_each_difference():
    assert changed_settings({"depth": 1, "sizes": (1, 2), "gone": 3}, {"depth": 2, "sizes": [1, 2], "new": "a"}) == (
        'depth 2 (was 1), new "a" (was null), gone null (was 3)')


def test_top_level_help_and_version_import_neither_torch_nor_a_command():
    # The package's public API is imported on first use, so the command line's own path is what loads.
    script = """
import json, sys
from scalegen.cli.main import main
for argv in (["--help"], ["--version"], ["no-such-command"]):
    try:
        main(argv)
    except SystemExit:
        pass
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "scalegen"))))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert "usage: scalegen" in done.stdout and "invalid choice: 'no-such-command'" in done.stderr
    assert "scalegen.cli.main" in loaded and "torch" not in loaded
    assert not [name for name in loaded if name.startswith(("scalegen.cli.dit", "scalegen.cli.options"))]


def test_top_level_help_lists_each_command_as_its_module_does():
    def listed(parser: argparse.ArgumentParser) -> dict[str, str]:
        return {action.dest: action.help for action in parser._subparsers._group_actions[0]._choices_actions}

    assert listed(build_parser([])) == listed(build_parser())


def test_help_texts_are_true_for_their_command(capsys):
    vqvae = command_help(["train", "vqvae"], capsys)
    assert "--init-from CKPT fine-tune: start from these weights (official .pt/.pth, a run or an export) --" in vqvae
    assert "no transformer blocks" in vqvae and "--no-attention no attention blocks --" in vqvae
    assert "classes re-initialises" in command_help(["train", "dit"], capsys)
    assert "--num-samples" not in command_help(["edit", "var"], capsys)
    assert "--fp32 keep fp32 weights (default: fp16) --" in command_help(["export"], capsys)
    serve = command_help(["serve"], capsys)
    assert "address to listen on" in serve and "(default: 127.0.0.1)" in serve and serve.count("7860") == 1
    assert "DiT folder (default: the shipped one) --" in command_help(["demo"], capsys)


def test_no_option_states_its_default_twice_and_no_switch_states_one():
    def options(parser: argparse.ArgumentParser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from options(child)
            elif action.help:
                yield action

    formatter = DefaultsFormatter("scalegen")
    for action in options(build_parser()):
        text = formatter._expand_help(action)
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        assert text.count("(default") <= 1 and not (switch and f"(default: {action.default})" in text), text
