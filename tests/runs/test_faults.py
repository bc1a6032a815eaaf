"""Training that guards itself and run folders that cannot be corrupted: non-finite steps are skipped and stop a
diverged run, a second trainer is refused, a full disk keeps the previous checkpoint, a crash at any point of a
re-save leaves a resumable run, a broken newest checkpoint falls back to the one before, bad inputs are one line."""
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scalegen.errors import UserError
from scalegen.eval.metrics import frechet_distance
from scalegen.files import current_umask
from scalegen.models.dit import DiTConfig
from scalegen.runs import folder as folder_module
from scalegen.runs.folder import RunFolder, last_checkpoint, load_training_state, save_checkpoint
from scalegen.runs.names import SHIPPED_DIT, SHIPPED_VAR
from scalegen.runs.weights import load_weights
from scalegen.train.dit_task import DiTTask
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, train
from tests_support import tiny_fashion, training_error, user_error, write_fashion_subset

TINY = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
TINY_DIT = ["--model", "DiT-S/4", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--image-size", "8",
            "--batch-size", "8", "--sample-steps", "2", "--log-every", "1", "--device", "cpu"]


class PoisonedTask(DiTTask):
    """A DiT task whose loss turns NaN from micro-step `poison_from` on."""

    def __init__(self, poison_from: int):
        super().__init__(TINY, sample_steps=2)
        self.calls, self.poison_from = 0, poison_from

    def loss(self, model, batch):
        loss, extra = super().loss(model, batch)
        self.calls += 1
        return (loss * math.nan if self.calls >= self.poison_from else loss), extra


def run_config(out: Path, steps: int, **options) -> TrainConfig:
    settings = dict(out=str(out), steps=steps, batch_size=16, lr=2e-3, log_every=1, checkpoint_every=1, device="cpu")
    return TrainConfig(**{**settings, **options})


def test_non_finite_steps_are_skipped_and_a_diverged_run_stops_keeping_the_finite_checkpoint(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(UserError, match="training diverged.*3 steps in a row.*step-0000002") as stopped:
        train(PoisonedTask(poison_from=3), tiny_fashion(), run_config(tmp_path, 10, max_nonfinite_steps=3))
    assert "\n" not in str(stopped.value)
    assert last_checkpoint(tmp_path).name == "step-0000002"  # steps 3-5 were skipped: nothing new to keep
    for name, tensor in load_weights(tmp_path)[1].items():
        assert torch.isfinite(tensor).all(), name
    rows = read_log(tmp_path)
    assert [row["nonfinite_steps"] for row in rows] == [0, 0, 1, 2]  # the stopping step is not logged


def test_one_bad_step_is_skipped_and_training_goes_on(tmp_path):
    class OneBadStep(PoisonedTask):
        def loss(self, model, batch):
            loss, extra = super().loss(model, batch)
            return (loss if self.calls != 2 else loss * math.inf), extra

    torch.manual_seed(0)
    train(OneBadStep(poison_from=10**9), tiny_fashion(), run_config(tmp_path, 4))
    rows = read_log(tmp_path)
    assert [row["nonfinite_steps"] for row in rows] == [0, 1, 1, 1] and math.isfinite(rows[-1]["loss"])
    assert last_checkpoint(tmp_path).name == "step-0000004"


@pytest.mark.multiprocess
def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom scalegen.runs.lock import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)", str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = user_error(["train", "dit", *TINY_DIT, "--data", str(write_fashion_subset(tmp_path)), "--steps", "1",
                              "--out", str(tmp_path / "run")], capsys)
        assert f"in use by process {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_full_disk_keeps_the_previous_checkpoint_and_removes_the_partial_one(tmp_path, monkeypatch, capsys):
    real_save = folder_module.save_file
    writes = []

    def fills_up(tensors, path, *args, **kwargs):
        writes.append(path)
        if len(writes) > 2:  # model + EMA of step 1 fit; step 2 does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(folder_module, "save_file", fills_up)
    data = write_fashion_subset(tmp_path)
    message = training_error(["train", "dit", *TINY_DIT, "--data", str(data), "--steps", "3", "--checkpoint-every", "1",
                              "--out", str(tmp_path / "run")], capsys)
    assert "no space left on the device while writing checkpoint step 2" in message
    assert "step-0000001 is intact" in message
    assert last_checkpoint(tmp_path / "run").name == "step-0000001"
    assert not list((tmp_path / "run" / "checkpoints").glob(".staging-*"))
    load_weights(tmp_path / "run")


class Killed(BaseException):
    """Stands for SIGKILL: nothing below catches it, so no cleanup runs."""


@pytest.mark.end_to_end
@pytest.mark.parametrize("moment", ["before the rename", "before the pointer", "before pruning"])
def test_a_crash_at_any_moment_of_a_re_save_leaves_a_resumable_run(tmp_path, monkeypatch, moment):
    torch.manual_seed(0)
    train(DiTTask(TINY, sample_steps=2), tiny_fashion(), run_config(tmp_path, 2))
    config, weights = load_weights(tmp_path)
    state = load_training_state(last_checkpoint(tmp_path))
    targets = {"before the rename": (folder_module.os, "replace"),
               "before the pointer": (folder_module, "write_json_atomic"),
               "before pruning": (folder_module, "prune")}
    module, name = targets[moment]

    def kill(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(module, name, kill)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, 2, config, weights, weights, state)  # re-saving the live step
    monkeypatch.undo()
    assert (last_checkpoint(tmp_path) / "model.safetensors").exists()
    torch.manual_seed(0)
    train(DiTTask(TINY, sample_steps=2), tiny_fashion(), run_config(tmp_path, 3))
    run = RunFolder(tmp_path)
    assert last_checkpoint(tmp_path).name.startswith("step-0000003")
    assert not list(run.checkpoints.glob(".staging-*"))  # the crash's leftovers are cleaned at the next start
    assert [row["step"] for row in read_log(tmp_path)] == [1, 2, 3]


@pytest.mark.end_to_end
def test_a_broken_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    torch.manual_seed(0)
    train(DiTTask(TINY, sample_steps=2), tiny_fashion(), run_config(tmp_path, 3))
    newest = last_checkpoint(tmp_path)
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    torch.manual_seed(0)
    train(DiTTask(TINY, sample_steps=2), tiny_fashion(), run_config(tmp_path, 4))
    output = capsys.readouterr().out
    assert "skipping checkpoint step-0000003" in output and "from step 2" in output
    assert [row["step"] for row in read_log(tmp_path)] == [1, 2, 3, 4]  # step 3 trained again, logged once
    assert last_checkpoint(tmp_path).name == "step-0000004"


def test_a_pointer_outside_its_run_folder_is_not_followed(tmp_path, capsys):
    torch.manual_seed(0)
    train(DiTTask(TINY, sample_steps=2), tiny_fashion(), run_config(tmp_path, 2))
    (tmp_path / "last.json").write_text(json.dumps({"step": 2, "path": "../../elsewhere"}))
    capsys.readouterr()
    train(DiTTask(TINY, sample_steps=2), tiny_fashion(), run_config(tmp_path, 3))
    assert "does not point into" in capsys.readouterr().out
    assert last_checkpoint(tmp_path).name == "step-0000003"


def test_files_follow_the_umask(tmp_path):
    torch.manual_seed(0)
    train(DiTTask(TINY, sample_steps=2), tiny_fashion(), run_config(tmp_path, 1))
    mask = current_umask()
    folder = last_checkpoint(tmp_path)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "last.json").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.end_to_end
def test_the_seed_fixes_the_initial_dit_weights(tmp_path):
    data = write_fashion_subset(tmp_path)
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "scalegen", "train", "dit", *TINY_DIT, "--data", str(data), "--steps", "1",
                        "--lr", "0", "--out", str(tmp_path / name)], check=True, capture_output=True)
    first, second = load_weights(tmp_path / "a", prefer_ema=False)[1], load_weights(tmp_path / "b", prefer_ema=False)[1]
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_nan_statistics_are_an_error_not_a_hang():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(UserError, match="NaN"):
        frechet_distance(mu, sigma * np.nan, mu, sigma)


BAD_INPUTS = {
    "batch size 0": ["train", "dit", "--batch-size", "0", "--steps", "1"],
    "batch size -8": ["train", "dit", "--batch-size", "-8", "--steps", "1"],
    "checkpoint every 0": ["train", "dit", "--checkpoint-every", "0", "--steps", "1"],
    "log every 0": ["train", "dit", "--log-every", "0", "--steps", "1"],
    "accumulation 0": ["train", "dit", "--grad-accumulation", "0", "--steps", "1"],
    "steps 0": ["train", "dit", "--steps", "0"],
    "steps -5": ["train", "var", "--tokenizer", "x", "--steps", "-5"],
    "image size 0": ["train", "vqvae", "--image-size", "0", "--steps", "1"],
    "heads do not divide": ["train", "dit", "--hidden-size", "30", "--num-heads", "4", "--steps", "1"],
    "ema 1.5": ["train", "dit", "--ema", "1.5", "--steps", "1"],
    "one beta": ["train", "dit", "--betas", "0.9", "--steps", "1"],
    "keep no checkpoint": ["train", "dit", "--keep-checkpoints", "0", "--steps", "1"],
    "per class 0": ["sample", "dit", "--ckpt", str(SHIPPED_DIT), "--per-class", "0"],
    "per class -1": ["sample", "dit", "--ckpt", str(SHIPPED_DIT), "--per-class", "-1"],
    "sample batch 0": ["sample", "dit", "--ckpt", str(SHIPPED_DIT), "--batch-size", "0"],
    "num samples -5": ["sample", "dit", "--ckpt", str(SHIPPED_DIT), "--num-samples", "-5"],
    "dit cfg -1": ["sample", "dit", "--ckpt", str(SHIPPED_DIT), "--cfg-scale", "-1"],
    "dit no steps": ["sample", "dit", "--ckpt", str(SHIPPED_DIT), "--steps", "0"],
    "npz without num samples": ["sample", "var", "--ckpt", str(SHIPPED_VAR)],
    "num samples into png": ["sample", "var", "--ckpt", str(SHIPPED_VAR), "--num-samples", "3"],
    "var cfg -1": ["sample", "var", "--ckpt", str(SHIPPED_VAR), "--cfg", "-1"],
    "top k -5": ["sample", "var", "--ckpt", str(SHIPPED_VAR), "--top-k", "-5"],
    "top p 1.5": ["sample", "var", "--ckpt", str(SHIPPED_VAR), "--top-p", "1.5"],
    "prune all": ["sample", "var", "--ckpt", str(SHIPPED_VAR), "--prune", "1.0"],
    "prune every scale": ["sample", "var", "--ckpt", str(SHIPPED_VAR), "--prune", ",".join(["0.5"] * 10)],
    "one unpruned block count": ["sample", "var", "--ckpt", str(SHIPPED_VAR), "--prune", "0.3", "--unpruned-blocks", "1"],
    "refine every scale": ["sample", "var", "--ckpt", str(SHIPPED_VAR), "--refiner", str(SHIPPED_VAR),
                           "--refined-scales", "10"],
    "refiner of a dit": ["sample", "var", "--ckpt", str(SHIPPED_VAR), "--refiner", str(SHIPPED_DIT)],
    "unknown draws": ["sample", "var", "--ckpt", str(SHIPPED_VAR), "--draws", "gumbel"],
    "flops 7": ["flops", "--image-size", "7"],
    "flops 0": ["flops", "--image-size", "0"],
    "flops -8": ["flops", "--image-size", "-8"],
}
OUTPUTS = {"npz without num samples": "s.npz", "num samples into png": "g.png"}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_are_one_line_errors(name, tmp_path, capsys):
    command = list(BAD_INPUTS[name])
    if command[0] in ("train", "sample"):
        command += ["--out", str(tmp_path / OUTPUTS.get(name, "out" if command[0] == "train" else "g.png"))]
    user_error(command, capsys)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_more_bad_files_and_boxes_are_one_line_errors(tmp_path, capsys):
    torch.manual_seed(0)
    train(DiTTask(TINY, sample_steps=2), tiny_fashion(), run_config(tmp_path / "run", 1))
    for name in ("ema.safetensors", "model.safetensors"):
        path = last_checkpoint(tmp_path / "run") / name
        path.write_bytes(path.read_bytes()[:100])
    capsys.readouterr()
    assert "truncated" in user_error(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "e")], capsys)
    assert "truncated" in user_error(["sample", "dit", "--ckpt", str(tmp_path / "run"), "--out",
                                      str(tmp_path / "g.png")], capsys)
    assert "covers 0 of the 16×16 tokens" in user_error(
        ["edit", "var", "--ckpt", str(SHIPPED_VAR), "--image", str(Path(__file__).parents[2] / "docs" / "var_grid.png"),
         "--box", "0,0,1,1", "--out", str(tmp_path / "e.png")], capsys)
    if not torch.cuda.is_available():
        assert "sees none" in user_error(["train", "dit", *TINY_DIT[:-2], "--device", "cuda", "--steps", "1", "--out",
                                          str(tmp_path / "cuda")], capsys)
    assert "no such file or directory" in user_error(["sample", "var", "--ckpt", str(SHIPPED_VAR), "--classes", "0",
                                                      "--per-class", "1", "--out", "/proc/grid.png"], capsys)
    assert os.listdir(tmp_path / "run")  # nothing of the broken run was deleted


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MB tmpfs, where the machine lets us mount one (root on Linux); the test is skipped elsewhere."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_really_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tiny_disk, tmp_path, capsys):
    data = write_fashion_subset(tmp_path)
    arguments = [*TINY_DIT, "--hidden-size", "64", "--depth", "2", "--data", str(data), "--steps", "6",
                 "--checkpoint-every", "1"]
    message = training_error(["train", "dit", *arguments, "--out", str(tiny_disk / "run")], capsys)
    assert "no space left on the device while writing checkpoint step" in message and "is intact" in message
    assert not list((tiny_disk / "run" / "checkpoints").glob(".staging-*"))
    load_weights(tiny_disk / "run")  # the kept checkpoint loads
