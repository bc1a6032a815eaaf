"""The command line's options: every float is finite (or a one-line parse error, with nothing written), run
configurations show every option's effective value under its flag's name, and mistyped names get a suggestion."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from scalegen.cli.main import build_parser, main
from scalegen.data.folder import ImageFolder
from scalegen.data.store import build_cache
from scalegen.errors import UserError
from scalegen.runs.folder import OPTIONS_FILE
from scalegen.train.task import Recipe
from scalegen.train.task_options import ObjectiveConfig
from scalegen.train.trainer import TrainConfig
from scalegen.train.var_task import VARTask
from tests_support import user_error

NON_FINITE = ("nan", "inf", "-inf")
FLOAT_SAMPLES = ("0.5", "1.5", "0.5,0.75")  # a valid value of a float-typed option: a fraction, a scale, a pair
TINY_DIT = ["--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "4",
            "--image-size", "8", "--batch-size", "4", "--device", "cpu"]
TINY_TOKENIZER = ["--patch-nums", "1,2,4", "--ch", "8", "--ch-mult", "1,1", "--norm-groups", "4", "--no-attention",
                  "--vocab-size", "16", "--z-channels", "4", "--share-quant-resi", "1", "--device", "cpu"]


def commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                              argparse.ArgumentParser]]:
    """Each command's own parser (`train dit`, `eval`, …) with the words that name it."""
    if parser._subparsers is None:
        yield words, parser
        return
    for action in parser._subparsers._group_actions:
        for name, child in action.choices.items():
            yield from commands(child, (*words, name))


def float_sample(action: argparse.Action) -> str | None:
    """A value `action` takes that holds a float, or None for an option that takes no float."""
    if action.type is None or action.nargs == 0 or action.choices:
        return None
    for sample in FLOAT_SAMPLES:
        try:
            value = action.type(sample)
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            continue
        if any(isinstance(item, float) for item in (value if isinstance(value, tuple) else (value,))):
            return sample
    return None


FLOAT_OPTIONS = [(words, action.option_strings[0], sample) for words, parser in commands(build_parser())
                 for action in parser._actions if (sample := float_sample(action)) is not None]


def test_the_walk_finds_the_float_options_of_sampling_training_and_tokenizers():
    found = {(" ".join(words), flag) for words, flag, _ in FLOAT_OPTIONS}
    assert {("sample dit", "--cfg"), ("sample var", "--cfg"), ("train dit", "--lr"), ("train dit", "--logit-mean"),
            ("train var", "--betas"), ("train kl", "--kl-weight"), ("sample dit", "--cfg-interval")} <= found


@pytest.mark.parametrize("words, flag, sample", FLOAT_OPTIONS, ids=[f"{' '.join(words)} {flag}"
                                                                      for words, flag, _ in FLOAT_OPTIONS])
def test_every_float_option_refuses_nan_and_infinity_in_one_line(words, flag, sample, capsys):
    for text in NON_FINITE:
        value = ",".join([*sample.split(",")[:-1], text])  # the last item of a list non-finite
        message = user_error([*words, f"{flag}={value}"], capsys)
        assert flag in message and "finite" in message, message


def test_a_non_finite_learning_rate_writes_no_run_folder(tmp_path, capsys):
    run = tmp_path / "D"
    message = user_error(["train", "dit", "--lr", "nan", "--out", str(run), "--steps", "1"], capsys)
    assert "--lr" in message and not run.exists()


def test_the_loop_settings_refuse_nan_from_python_too(tmp_path):
    with pytest.raises(UserError, match="--lr is nan"):
        TrainConfig(out=str(tmp_path), steps=1, lr=math.nan)
    with pytest.raises(UserError, match="--batch-size"):
        TrainConfig(out=str(tmp_path), steps=1, batch_size=math.nan)


@pytest.mark.parametrize("settings", [dict(name="ddpm", snr_gamma=math.nan), dict(name="meanflow", guidance=math.nan),
                                      dict(name="flow", logit_std=math.inf), dict(name="meanflow", repa_weight=math.nan)],
                         ids=["snr gamma", "trained-in guidance", "logit std", "repa weight"])
def test_the_objective_settings_refuse_nan_and_infinity_from_python_too(settings):
    with pytest.raises(UserError, match="is (nan|inf)"):
        ObjectiveConfig(**settings)


def printed(argv: list[str], capsys) -> dict:
    """The run configuration `--print-config` writes for `argv`."""
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--print-config"])
    assert stopped.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_shows_the_recipe_values_a_run_takes_under_the_flag_names(capsys):
    recipe = Recipe()  # DiT's
    template = printed(["train", "dit"], capsys)
    assert (template["lr"], template["batch_size"], template["ema"]) == (recipe.lr, recipe.batch_size,
                                                                        recipe.ema_decay)
    assert "ema_decay" not in template and template["no_learn_sigma"] is False
    run = printed(["train", "var", "--tokenizer", "T", "--steps", "100", "--batch-size", "1024", "--base-lr",
                   "2e-4"], capsys)
    assert run["lr"] == 2e-4 * 1024 / 256 and run["warmup_steps"] == 2  # the official VAR rule, as the run takes it
    assert (run["weight_decay"], run["betas"], run["grad_clip"]) == (VARTask.recipe.weight_decay,
                                                                    list(VARTask.recipe.betas), VARTask.recipe.grad_clip)
    assert printed(["train", "var", "--tokenizer", "T"], capsys)["warmup_steps"] is None  # needs --steps


def test_a_configuration_reads_switches_by_flag_and_older_files_by_dest(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("no_attention: true\nema: 0.5\nlpips_weight: 2.0\n")
    options = printed(["train", "vqvae", "--config", str(path)], capsys)
    assert (options["no_attention"], options["ema"], options["lpips_weight"]) == (True, 0.5, 2.0)
    path.write_text("use_attention: false\nema_decay: 0.25\nlpips: 3.0\n")  # the names of files before the flags'
    options = printed(["train", "vqvae", "--config", str(path)], capsys)
    assert (options["no_attention"], options["ema"], options["lpips_weight"]) == (True, 0.25, 3.0)
    path.write_text("no_attention: 1\n")
    assert "no_attention must be true or false" in user_error(["train", "vqvae", "--config", str(path)], capsys)


def test_a_mistyped_configuration_key_or_flag_gets_the_closest_name(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("batchsize: 8\n")
    message = user_error(["train", "dit", "--config", str(path), "--out", "RUN", "--steps", "1"], capsys)
    assert "unknown option 'batchsize' (did you mean batch_size?)" in message and "eval_reference" not in message
    message = user_error(["train", "dit", "--bach-size", "8", "--out", "RUN", "--steps", "1"], capsys)
    assert "unrecognized arguments: --bach-size 8 (did you mean --batch-size?)" in message
    message = user_error(["sample", "dit", "--ckpt", "C", "--out", "g.png", "--cfg-sacle=2"], capsys)
    assert "(did you mean --cfg-scale?)" in message


def write_color_folder(folder: Path) -> Path:
    """A tiny RGB image folder: two classes of four 8×8 images."""
    generator = np.random.default_rng(0)
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for index in range(4):
            Image.fromarray(generator.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / label / f"{index}.png")
    return folder


def test_a_run_on_a_tokenizer_without_data_trains_on_the_tokenizers_data_and_says_so(tmp_path, capsys):
    data, tokenizer, run = write_color_folder(tmp_path / "colors"), tmp_path / "vq", tmp_path / "var"
    main(["train", "vqvae", "--data", str(data), "--image-size", "8", *TINY_TOKENIZER, "--steps", "1", "--batch-size",
          "4", "--out", str(tokenizer)])
    capsys.readouterr()
    assert printed(["train", "var", "--tokenizer", str(tokenizer)], capsys)["data"] == str(data)
    main(["train", "var", "--tokenizer", str(tokenizer), "--depth", "1", "--steps", "1", "--batch-size", "4",
          "--device", "cpu", "--out", str(run)])
    assert f"training on {data}, the data the tokenizer {tokenizer} was trained on" in capsys.readouterr().out
    assert yaml.safe_load((run / OPTIONS_FILE).read_text())["data"] == str(data)


def test_a_file_that_is_no_torch_file_is_called_so_not_an_unsafe_pickle(tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint at all\n")
    message = user_error(["sample", "dit", "--ckpt", str(text), "--out", str(tmp_path / "g.png")], capsys)
    assert "no torch file" in message and "unpickling" not in message
    torch.save({"weights": torch.zeros(2)}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:100])
    message = user_error(["sample", "dit", "--ckpt", str(tmp_path / "cut.pt"), "--out", str(tmp_path / "g.png")], capsys)
    assert message.endswith("(RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central "
                            "directory); pass a file torch.save wrote, a run folder or a .safetensors file")
    torch.save({"model": os.system}, tmp_path / "code.pt")
    message = user_error(["sample", "dit", "--ckpt", str(tmp_path / "code.pt"), "--out", str(tmp_path / "g.png")],
                         capsys)
    assert "refusing to load" in message and f"it names {os.system.__module__}.system)" in message


def test_a_single_process_cache_waits_for_no_other_ranks(tmp_path, capsys):
    images = ImageFolder(write_color_folder(tmp_path / "colors"), 8)
    build_cache(images, lambda batch: {"pixels": batch.flatten(1)}, tmp_path / "cache", batch_size=4, device="cpu",
                description="encoding", source={"test": 1}, shard_size=4)
    progress = capsys.readouterr().err
    assert "encoding" in progress and "other ranks" not in progress


@pytest.mark.end_to_end
def test_an_unreadable_image_is_one_line_that_names_it(tmp_path):
    data = write_color_folder(tmp_path / "colors")
    (data / "a" / "broken.png").write_text("not an image")
    done = subprocess.run([sys.executable, "-m", "scalegen", "train", "dit", "--data", str(data), *TINY_DIT, "--steps",
                           "5", "--sample-steps", "2", "--out", str(tmp_path / "run")],  # 20 draws of 9 images
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "broken.png" in line]
    assert lines == [f"scalegen: warning: skipping unreadable image {data / 'a' / 'broken.png'}: cannot identify image "
                     f"file '{data / 'a' / 'broken.png'}'"], done.stderr[-2000:]
    assert "Warning" not in done.stderr  # no Python warning lines (category, file and source line)


def test_a_kl_tokenizer_export_names_no_readme_it_does_not_write(tmp_path, capsys):
    data = write_color_folder(tmp_path / "colors")
    main(["train", "kl", "--data", str(data), "--image-size", "8", "--ch", "8", "--ch-mult", "1,2", "--norm-groups", "4",
          "--num-res-blocks", "1", "--latent-channels", "4", "--batch-size", "4", "--device", "cpu", "--steps", "1",
          "--out", str(tmp_path / "kl")])
    capsys.readouterr()
    main(["export", "--run", str(tmp_path / "kl"), "--out", str(tmp_path / "vae"), "--format", "diffusers"])
    said = capsys.readouterr().out
    assert "AutoencoderKL" in said and "README" not in said and not list((tmp_path / "vae").glob("README*"))
    (tmp_path / "notes").mkdir()  # a folder that holds a README of its own: the export says what it wrote
    (tmp_path / "notes" / "README.md").write_text("my notes\n")
    main(["export", "--run", str(tmp_path / "kl"), "--out", str(tmp_path / "notes"), "--format", "diffusers"])
    said = capsys.readouterr().out
    assert "AutoencoderKL" in said and "README" not in said and "DiTPipeline" not in said


@pytest.mark.parametrize("overrides, expected", [
    ([], dict(depth=12, hidden_size=384, num_heads=6, patch_size=4)),  # DiT-S/4 as the paper builds it
    (["--depth", "2", "--num-heads", "3"], dict(depth=2, hidden_size=384, num_heads=3, patch_size=4)),
])
def test_print_config_shows_the_dimensions_a_dit_preset_resolves_to(overrides, expected, capsys):
    for steps in ([], ["--steps", "3"]):  # a template, and a run's configuration
        with pytest.raises(SystemExit) as stopped:
            main(["train", "dit", "--model", "DiT-S/4", *overrides, *steps, "--print-config"])
        assert stopped.value.code == 0
        shown = yaml.safe_load(capsys.readouterr().out)
        assert {name: shown[name] for name in expected} == expected
    assert "unknown DiT preset 'DiT-Q/4'" in user_error(["train", "dit", "--model", "DiT-Q/4", "--print-config"], capsys)


# Every command and sub-command (`train dit`, `sample var`, `edit var`, `demo`, `eval`, …): its parser is built from
# torch-free modules, its handler imports the rest when it runs (`scalegen --help` is tests/cli/test_run_config.py's).
EVERY_COMMAND = [list(words) for words, _ in commands(build_parser())]
HEAVY_PACKAGES = ("torch", "numpy", "PIL", "safetensors", "diffusers", "gradio")


def test_the_parser_walk_finds_every_command_and_sub_command():
    names = {" ".join(words) for words in EVERY_COMMAND}
    assert {"train dit", "train kl", "train vqvae", "train var", "train classifier", "sample dit", "sample var",
            "edit var", "demo", "serve", "export", "eval", "flops", "scaling", "data pack", "plot",
            "reconstruct"} <= names


@pytest.mark.parametrize("words", EVERY_COMMAND, ids=" ".join)
def test_a_command_s_help_and_parse_errors_import_no_torch(words):
    script = f"""
import json, sys
from scalegen.cli.main import main
for extra in (["--help"], ["--no-such-option"]):
    try:
        main({words!r} + extra)
    except SystemExit:
        pass
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in {HEAVY_PACKAGES!r})))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "usage: scalegen" in done.stdout and done.stderr.startswith("scalegen: error:")
    assert json.loads(done.stdout.splitlines()[-1]) == []
