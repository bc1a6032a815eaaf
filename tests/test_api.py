"""The public Python API: loaders return ready models that sample in one range, bad files are one-line errors, the
recipes live in the library, runs without EMA keep no EMA copy, and `--debug` shows tracebacks."""
import argparse
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scalegen
from scalegen.cli.main import build_parser, main
from scalegen.classes import class_ids, imagenet_names
from scalegen.models.dit import DiTConfig
from scalegen.models.var import VARConfig
from scalegen.runs.folder import CONFIG_FILE, EMA_FILE, MODEL_FILE, RunFolder, load_training_state
from scalegen.train.dit_task import DiTTask
from scalegen.train.trainer import TrainConfig, train
from scalegen.train.var_task import VARTask
from test_tokenizer_training import TINY_TOKENIZER
from test_var_training import TINY_VAR, tokenizer_folder
from tests_support import tiny_fashion, user_error, write_fashion_subset

LABELS = [0, 7, 9]


@pytest.mark.parametrize("load, folder, sampling", [
    (scalegen.load_dit, scalegen.SHIPPED_DIT, dict(cfg=2.0, steps=4, sampler="euler")),
    (scalegen.load_var, scalegen.SHIPPED_VAR, dict(cfg=1.5)),
], ids=["dit", "var"])
def test_a_loaded_model_generates_pictures_in_zero_one(load, folder, sampling):
    model = load(folder)
    assert not model.training
    images = model.generate(LABELS, seed=0, **sampling)  # (3, 1, 32, 32)
    assert images.shape == (3, 1, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.1
    torch.testing.assert_close(model.generate(LABELS, seed=0, **sampling), images, atol=0, rtol=0)
    pictures = scalegen.to_pil(images)
    assert [(picture.mode, picture.size) for picture in pictures] == [("L", (32, 32))] * 3
    assert np.array_equal(np.asarray(pictures[1]), np.asarray(scalegen.image_grid(images[1:2], 1)))
    assert scalegen.image_grid(images, 1).size == (3 * 32, 32)


def test_dit_generate_with_a_seed_leaves_the_global_rng_alone():
    model = scalegen.load_dit(scalegen.SHIPPED_DIT)
    state = torch.get_rng_state()
    model.generate([1], cfg=1.0, steps=2, sampler="heun", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="class ids"):
        model.generate([10], steps=2)


def test_the_decoder_and_tokenizer_follow_the_model_and_are_shared_by_copies():
    dit = scalegen.load_dit(scalegen.SHIPPED_DIT)
    var = scalegen.load_var(scalegen.SHIPPED_VAR)
    for model, helper in ((dit, dit.decoder), (var, var.tokenizer)):
        assert helper is not None and not any(name.startswith("_") for name in model.state_dict())
        clone = copy.deepcopy(model)
        assert (clone.decoder if model is dit else clone.tokenizer) is helper
        model.double()
        assert next(helper.parameters()).dtype == torch.float64


def test_load_tokenizer_takes_a_tokenizer_run(tmp_path):
    original = tokenizer_folder(tmp_path / "vq")
    loaded = scalegen.load_tokenizer(tmp_path / "vq")
    assert not loaded.training and loaded.config == TINY_TOKENIZER
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0)


def broken_copy(tmp_path, name: str):
    folder = tmp_path / name
    shutil.copytree(scalegen.SHIPPED_VAR, folder)
    return folder


def test_a_bad_file_is_a_one_line_user_error(tmp_path):
    truncated = broken_copy(tmp_path, "truncated")
    data = (truncated / MODEL_FILE).read_bytes()
    (truncated / MODEL_FILE).write_bytes(data[: len(data) // 2])
    garbage = broken_copy(tmp_path, "garbage")
    (garbage / CONFIG_FILE).write_text("{not json")
    listed = broken_copy(tmp_path, "listed")
    (listed / CONFIG_FILE).write_text("[1, 2]")
    no_model = broken_copy(tmp_path, "no_model")
    config = json.loads((no_model / CONFIG_FILE).read_text())
    (no_model / CONFIG_FILE).write_text(json.dumps({**config, "model": {**config["model"], "colour": 3}}))
    cases = {truncated: "truncated", garbage: "cannot read", listed: "not an object", no_model: "colour",
             tmp_path / "missing": "does not exist"}
    for folder, expected in cases.items():
        with pytest.raises(scalegen.UserError, match=expected) as caught:
            scalegen.load_var(folder)
        assert "\n" not in str(caught.value)
    with pytest.raises(scalegen.UserError, match="not a DiT"):
        scalegen.load_dit(scalegen.SHIPPED_VAR)
    assert isinstance(caught.value, ValueError)


@pytest.mark.end_to_end
def test_python_training_follows_the_task_recipe_and_skips_a_zero_ema(tmp_path):
    torch.manual_seed(0)
    task = VARTask(VARConfig(**TINY_VAR), tokenizer_folder(tmp_path / "vq"), {})
    train(task, tiny_fashion(8), TrainConfig(out=str(tmp_path / "var"), steps=2, batch_size=16, device="cpu"))
    checkpoint = RunFolder(tmp_path / "var").last_checkpoint()
    stored = load_training_state(checkpoint)["train_config"]
    assert (stored["weight_decay"], tuple(stored["betas"]), stored["grad_clip"]) == (0.05, (0.9, 0.95), 2.0)
    assert stored["lr"] == pytest.approx(1e-4 * 768 / 256) and stored["ema_decay"] == 0.0  # the floor
    assert not (checkpoint / EMA_FILE).exists() and (checkpoint / MODEL_FILE).exists()
    assert json.loads((checkpoint / CONFIG_FILE).read_text())["params"] == sum(
        parameter.numel() for parameter in task.model.parameters())

    dit = DiTTask(DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                            num_classes=10), sample_steps=2)
    train(dit, tiny_fashion(8), TrainConfig(out=str(tmp_path / "dit"), steps=1, batch_size=16, device="cpu"))
    checkpoint = RunFolder(tmp_path / "dit").last_checkpoint()
    assert load_training_state(checkpoint)["train_config"]["ema_decay"] == 0.9999 and (checkpoint / EMA_FILE).exists()


def test_the_readme_python_example_runs_on_the_shipped_models(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    shipped_part = block.split("# official checkpoints", 1)[0]
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(shipped_part, names)  # noqa: S102  (our own README)
    assert names["images"].shape == (3, 1, 32, 32) and 0 <= names["images"].min() <= names["images"].max() <= 1
    assert (tmp_path / "sneaker.png").exists() and names["grid"].size == (3 * 32, 32)


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    command = ["sample", "dit", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "g.png")]
    assert "does not exist" in user_error(command, capsys)
    with pytest.raises(scalegen.UserError, match="does not exist"):
        main(["--debug", *command])
    monkeypatch.setenv("SCALEGEN_DEBUG", "1")
    with pytest.raises(scalegen.UserError, match="does not exist"):
        main(command)


@pytest.mark.end_to_end
def test_classes_by_name_in_python_and_on_the_command_line(tmp_path, capsys):
    var = scalegen.load_var(scalegen.SHIPPED_VAR)
    assert var.class_names[1] == "Trouser"
    torch.testing.assert_close(var.generate(["trouser", "Bag"], cfg=1.5, seed=0), var.generate([1, 8], cfg=1.5, seed=0),
                               atol=0, rtol=0)
    with pytest.raises(scalegen.UserError, match="unknown class 'Hat'"):
        var.generate("Hat,1")
    main(["sample", "var", "--ckpt", str(scalegen.SHIPPED_VAR), "--classes", "Trouser,8", "--per-class", "3",
          "--out", str(tmp_path / "grid.png"), "--device", "cpu"])
    assert Image.open(tmp_path / "grid.png").size == (3 * 32, 2 * 32)
    names = imagenet_names()
    assert len(set(names)) == 1000 and names[207] == "golden retriever" and "crane (134)" in names
    assert class_ids("golden retriever, 7", names) == [207, 7] and class_ids("all", names) == list(range(1000))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("scalegen ")


def test_every_option_of_every_command_explains_itself():
    def options(parser, command):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from options(child, f"{command} {name}")
            elif action.option_strings and action.dest != "help":
                yield command, action

    parser = build_parser()
    undocumented = [f"{command} {action.option_strings[0]}" for command, action in options(parser, "scalegen")
                    if not action.help]
    assert not undocumented
    sample_help = parser._subparsers._group_actions[0].choices["sample"]._subparsers._group_actions[0].choices["dit"]
    assert "ddpm 250" in " ".join(sample_help.format_help().split()) and "--cfg-scale" in sample_help.format_help()


def test_resume_lists_the_options_that_changed_and_batch_jobs_log_progress_lines(tmp_path, capsys):
    data = write_fashion_subset(tmp_path)
    command = ["train", "dit", "--model", "DiT-S/4", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
               "--image-size", "8", "--data", str(data), "--batch-size", "8", "--sample-steps", "2", "--log-every", "1",
               "--device", "cpu", "--out", str(tmp_path / "run")]
    main([*command, "--steps", "2"])
    first = capsys.readouterr().out
    assert first.startswith("train dit: DiT with") and "steps 0 → 2" in first and "done: steps 0 → 2" in first
    main([*command, "--steps", "3", "--lr", "3e-4"])
    assert "--steps 3 (was 2), --lr 0.0003 (was 0.0001)" in capsys.readouterr().out
    lines = (tmp_path / "run" / "progress.log").read_text().splitlines()  # pytest's stdout is no terminal
    assert [line.split()[1] for line in lines] == ["1/2", "2/2", "3/3"]



@pytest.mark.end_to_end
@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_tensorboard_and_offline_wandb_get_the_figures_and_the_sample_grids(logger, tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch.utils.tensorboard" if logger == "tensorboard" else "wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = write_fashion_subset(tmp_path)
    main(["train", "dit", "--model", "DiT-S/4", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
          "--image-size", "8", "--data", str(data), "--batch-size", "8", "--sample-steps", "2", "--log-every", "1",
          "--steps", "2", "--logger", logger, "--device", "cpu", "--out", str(tmp_path / "run")])
    if logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
        assert "loss" in events.Tags()["scalars"] and "samples" in events.Tags()["images"]
    else:
        runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
