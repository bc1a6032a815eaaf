"""The one trainer: loss goes down on real data, resume equals an uninterrupted run, DDP stays in sync."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scalegen.checkpoint import last_checkpoint
from scalegen.eval.fmnist import ClassifierConfig
from scalegen.models.dit import DiTConfig
from scalegen.train.classifier_task import ClassifierTask
from scalegen.train.dit_task import DiTTask
from scalegen.train.run_log import read_log
from scalegen.train.optimization import learning_rate_factor
from scalegen.train.trainer import TrainConfig, train
from tests_support import tiny_fashion, without_progress_bars

TESTS = Path(__file__).parent


def tiny_task(seed: int = 0) -> DiTTask:
    torch.manual_seed(seed)
    config = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    return DiTTask(config, sample_steps=2)


def run(out: Path, steps: int, **options) -> dict:
    settings = dict(out=str(out), steps=steps, batch_size=16, lr=2e-3, log_every=1, checkpoint_every=1000, device="cpu")
    settings.update(options)
    return train(tiny_task(), tiny_fashion(), TrainConfig(**settings))


def test_thirty_steps_on_fashion_mnist_lower_the_loss(tmp_path):
    run(tmp_path, 30)
    losses = [row["loss"] for row in read_log(tmp_path)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert (tmp_path / "samples" / "step-0000030.png").exists()
    assert last_checkpoint(tmp_path).name == "step-0000030"


def test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(tmp_path):
    run(tmp_path / "straight", 6)
    run(tmp_path / "resumed", 3)
    run(tmp_path / "resumed", 6)
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [row["step"] for row in resumed] == [1, 2, 3, 4, 5, 6]
    for first, second in zip(straight, resumed):
        assert first["loss"] == pytest.approx(second["loss"], abs=1e-6)
    for name in ("model.safetensors", "ema.safetensors"):
        expected = load_file(last_checkpoint(tmp_path / "straight") / name)
        actual = load_file(last_checkpoint(tmp_path / "resumed") / name)
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0)


def test_gradient_accumulation_runs_and_counts_images(tmp_path):
    figures = run(tmp_path, 2, grad_accumulation=2)
    assert figures["images_per_second"] > 0
    assert len(read_log(tmp_path)) == 2


def classifier_run(out: Path, grad_accumulation: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list]:
    """Four steps of a tiny Fashion-MNIST classifier (a loss with no randomness of its own and no batch statistics)
    on batches of 16; returns the initial and final weights and the log. Width 16 puts two channels in each
    GroupNorm group, so every convolution bias has a gradient (alone in its group, a bias is normalised away and
    AdamW would magnify its rounding noise)."""
    torch.manual_seed(0)
    task = ClassifierTask(ClassifierConfig(width=16, feature_dim=16))
    initial = {name: weight.clone() for name, weight in task.model.state_dict().items()}
    config = TrainConfig(out=str(out), steps=4, batch_size=16, grad_accumulation=grad_accumulation, lr=1e-2,
                         warmup_steps=0, lr_decay_to=1.0, log_every=1, checkpoint_every=1000, device="cpu",
                         precision="fp32")
    train(task, tiny_fashion(32), config)
    return initial, task.model.state_dict(), read_log(out)


def test_gradient_accumulation_takes_the_same_steps_as_the_whole_batch(tmp_path):
    # Batch 16 in one pass, or as two micro-batches of 8 that are its halves (the sampler deals the same items in
    # the same order): the gradient of the mean loss is the mean of the halves' gradients, so every step is the same.
    initial, whole, whole_log = classifier_run(tmp_path / "whole", grad_accumulation=1)
    _, halves, halves_log = classifier_run(tmp_path / "halves", grad_accumulation=2)
    assert [row["step"] for row in halves_log] == [1, 2, 3, 4]
    for expected, actual in zip(whole_log, halves_log):
        # The gradient norm shows the gradient's scale, which AdamW's update would hide.
        assert actual["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5), f"step {expected['step']}"
        assert actual["loss"] == pytest.approx(expected["loss"], rel=1e-5), f"step {expected['step']}"
    assert max((whole[name] - weight).abs().max().item() for name, weight in initial.items()) > 1e-2  # they trained
    # AdamW divides each gradient element by its own running size: where that is near zero, the rounding of the two
    # summation orders moves a weight by up to a small fraction of lr; 1e-4 is 1% of one step's size (lr 1e-2).
    for name, weight in whole.items():
        torch.testing.assert_close(halves[name], weight, atol=1e-4, rtol=0, msg=lambda message: f"{name}: {message}")


def test_warmup_then_linear_decay():
    config = TrainConfig(out="unused", steps=110, warmup_steps=10, lr_decay_to=0.1)
    assert learning_rate_factor(0, config) == pytest.approx(0.1)
    assert learning_rate_factor(9, config) == pytest.approx(1.0)
    assert learning_rate_factor(10, config) == pytest.approx(1.0)
    assert learning_rate_factor(110, config) == pytest.approx(0.1)


@pytest.mark.parametrize("objective", ["ddpm", "meanflow"])  # meanflow: a JVP through DDP's bare module
def test_two_process_torchrun_keeps_parameters_in_sync(tmp_path, objective):
    result = tmp_path / "result.txt"
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    environment["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(TESTS / "ddp_worker.py"), str(result), str(tmp_path / "run"), "cpu", objective]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, without_progress_bars(completed.stderr)
    assert result.read_text().startswith("in sync gloo")
    assert last_checkpoint(tmp_path / "run").name == "step-0000003"
