"""The one trainer: loss goes down on real data, resume equals an uninterrupted run, DDP stays in sync."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scalegen.distributed import DistributedContext
from scalegen.eval.fmnist import ClassifierConfig
from scalegen.models.dit import DiTConfig
from scalegen.runs.folder import last_checkpoint
from scalegen.train.classifier_task import ClassifierTask
from scalegen.train.dit_task import DiTTask
from scalegen.train.run_log import read_log
from scalegen.train.optimization import learning_rate_factor
from scalegen.train.trainer import TrainConfig, Trainer, train
from tests_support import tiny_fashion, torchrun, without_progress_bars



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


@pytest.mark.end_to_end
def test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(tmp_path):
    run(tmp_path / "straight", 6)
    run(tmp_path / "resumed", 3)
    run(tmp_path / "resumed", 6)
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [row["step"] for row in resumed] == [1, 2, 3, 4, 5, 6]
    for first, second in zip(straight, resumed):
        assert first["loss"] == second["loss"]
    # Bit for bit: the resumed run repeats the same operations in the same order (the EMA's warm-up depends on the
    # step alone), so no tolerance is needed on any CPU.
    for name in ("model.safetensors", "ema.safetensors"):
        expected = load_file(last_checkpoint(tmp_path / "straight") / name)
        actual = load_file(last_checkpoint(tmp_path / "resumed") / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(actual[key], expected[key]), f"{name}: {key}"


def test_gradient_accumulation_runs_and_counts_images(tmp_path):
    figures = run(tmp_path, 2, grad_accumulation=2)
    assert figures["images_per_second"] > 0
    assert len(read_log(tmp_path)) == 2


class Float64Classifier(ClassifierTask):
    """A tiny Fashion-MNIST classifier (a loss with no randomness of its own and no batch statistics) in float64."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(ClassifierConfig(width=16, feature_dim=16))
        self.model.double()

    def loss(self, model, batch):
        return super().loss(model, replace(batch, image=batch.image.double()))


def step_gradients(out: Path, grad_accumulation: int) -> list[dict[str, torch.Tensor]]:
    """The gradients the step guard receives at each of four steps of batch 16 (float64), at lr 0: the weights stay
    the initial ones, so every step's gradient is that of its batch at the same weights."""
    task = Float64Classifier()
    config = TrainConfig(out=str(out), steps=4, batch_size=16, grad_accumulation=grad_accumulation, lr=0.0,
                         log_every=1, checkpoint_every=1000, device="cpu", precision="fp32")
    trainer = Trainer(task, tiny_fashion(32), config, DistributedContext())
    gradients, guarded_step = [], trainer.gradient_step

    def recording_step(step_figures, logging, step):
        gradients.append({name: parameter.grad.clone() for name, parameter in trainer.model.named_parameters()})
        return guarded_step(step_figures, logging, step)

    trainer.gradient_step = recording_step
    trainer.run()
    assert [row["step"] for row in read_log(out)] == [1, 2, 3, 4]
    return gradients


def test_gradient_accumulation_takes_the_same_steps_as_the_whole_batch(tmp_path):
    # Batch 16 in one pass, or as two micro-batches of 8 that are its halves (the sampler deals the same items in
    # the same order): the gradient of the mean loss is the mean of the halves' gradients. Compared before the
    # optimizer (whose division by each element's running size would magnify rounding), in float64: the two
    # summation orders differ by a few float64 roundings (2.2e-16 relative each; 4e-15 of the largest element
    # measured, on AVX-512 and AVX2 alike), far below 1e-12 of the largest element, and any slip (a missing
    # 1/accumulation, a dropped micro-batch, another item order) shows far above it.
    whole = step_gradients(tmp_path / "whole", grad_accumulation=1)
    halves = step_gradients(tmp_path / "halves", grad_accumulation=2)
    assert len(whole) == len(halves) == 4
    for step, (expected, actual) in enumerate(zip(whole, halves), start=1):
        largest = max(gradient.abs().max().item() for gradient in expected.values())
        assert largest > 0
        for name, gradient in expected.items():
            assert gradient.dtype == torch.float64
            torch.testing.assert_close(actual[name], gradient, atol=1e-12 * largest, rtol=0,
                                       msg=lambda message: f"step {step}, {name}: {message}")


def test_warmup_then_linear_decay():
    config = TrainConfig(out="unused", steps=110, warmup_steps=10, lr_decay_to=0.1)
    assert learning_rate_factor(0, config) == pytest.approx(0.1)
    assert learning_rate_factor(9, config) == pytest.approx(1.0)
    assert learning_rate_factor(10, config) == pytest.approx(1.0)
    assert learning_rate_factor(110, config) == pytest.approx(0.1)


@pytest.mark.multiprocess
@pytest.mark.parametrize("objective", ["ddpm", "meanflow"])  # meanflow: a JVP through DDP's bare module
def test_two_process_torchrun_keeps_parameters_in_sync(tmp_path, objective):
    result = tmp_path / "result.txt"
    completed = torchrun(Path(__file__).with_name("ddp_worker.py"), str(result), str(tmp_path / "run"), "cpu",
                         objective, timeout=300)
    assert completed.returncode == 0, without_progress_bars(completed.stderr)
    assert result.read_text().startswith("in sync gloo")
    assert last_checkpoint(tmp_path / "run").name == "step-0000003"
