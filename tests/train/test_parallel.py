"""Parallelism as a strategy (train/parallel.py): the trainer knows only the `Parallelism` interface, so a strategy
defined in this file alone trains and resumes a run; the default picks FSDP's `Shard` only for --fsdp under torchrun;
`Shard`'s refusals stay one-line errors. (Two-rank DDP and FSDP runs: test_fast_path.py, test_sharded_checkpoints.py.)"""
from pathlib import Path

import pytest
import torch
from torch import nn
from safetensors.torch import load_file

from scalegen.distributed import DistributedContext
from scalegen.errors import UserError
from scalegen.models.dit import DiTConfig
from scalegen.runs.folder import RunFolder, last_checkpoint
from scalegen.train.dit_task import DiTTask
from scalegen.train.parallel import Replicate, Shard, default_parallelism
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, Trainer, train
from tests_support import tiny_fashion

TINY = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
ACCUMULATION = 2


class CountingReplicate(Replicate):
    """DDP's strategy (a world of one here) that records each call the trainer makes, as (name, detail) pairs."""

    def __init__(self, context: DistributedContext, run: RunFolder, keep: int, calls: list[tuple]):
        super().__init__(context, run, keep)
        self.calls = calls

    def wrap(self, model, ema, precision):
        self.calls.append(("wrap", ema is not None))
        return super().wrap(model, ema, precision)

    def gradient_sync(self, network, last_micro_batch):
        self.calls.append(("gradient_sync", last_micro_batch))
        return super().gradient_sync(network, last_micro_batch)

    def save(self, step, *arguments):
        self.calls.append(("save", step))
        super().save(step, *arguments)

    def load(self, folder, *arguments):
        self.calls.append(("load", folder.name))
        super().load(folder, *arguments)

    def gathered(self, module):
        self.calls.append(("gathered", None))
        return super().gathered(module)

    def close(self):
        self.calls.append(("close", None))


def run(out: Path, steps: int, calls: list[tuple] | None = None) -> None:
    """Train (or resume) a tiny DiT in `out` to `steps`, through `CountingReplicate` recording into `calls` (None:
    the default strategy)."""
    torch.manual_seed(0)
    config = TrainConfig(out=str(out), steps=steps, batch_size=8, grad_accumulation=ACCUMULATION, lr=2e-3,
                         log_every=1, checkpoint_every=2, device="cpu", precision="fp32")
    parallelism = None if calls is None else (lambda context, folder, keep: CountingReplicate(context, folder, keep,
                                                                                            calls))
    train(DiTTask(TINY, sample_steps=2), tiny_fashion(), config, parallelism)


def named(calls: list[tuple], name: str) -> list:
    return [detail for call, detail in calls if call == name]


@pytest.mark.end_to_end
def test_a_strategy_from_the_test_file_trains_and_resumes_as_the_default_one(tmp_path):
    first, second = [], []
    run(tmp_path / "counted", 3, first)
    run(tmp_path / "counted", 5, second)
    run(tmp_path / "default", 5)
    # Wrapped once with the EMA; every micro-batch asks for gradient sync, on the step's last one only.
    for calls, steps in ((first, 3), (second, 2)):
        assert named(calls, "wrap") == [True]
        assert named(calls, "gradient_sync") == [False, True] * steps
        assert named(calls, "gathered") == [None] and named(calls, "close") == [None]
    assert named(first, "save") == [2, 3] and named(first, "load") == []
    assert named(second, "load") == ["step-0000003"] and named(second, "save") == [4, 5]
    # The strategy's run is the default strategy's, bit for bit: same losses, same weights.
    counted, default = read_log(tmp_path / "counted"), read_log(tmp_path / "default")
    assert [row["step"] for row in counted] == [1, 2, 3, 4, 5]
    assert [row["loss"] for row in counted] == [row["loss"] for row in default]
    for name in ("model.safetensors", "ema.safetensors"):
        expected = load_file(last_checkpoint(tmp_path / "default") / name)
        actual = load_file(last_checkpoint(tmp_path / "counted") / name)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(actual[key], expected[key]) for key in expected), name


def test_the_default_shards_only_an_fsdp_run_of_several_processes():
    assert default_parallelism(fsdp=True, context=DistributedContext(world_size=2)) is Shard
    assert default_parallelism(fsdp=False, context=DistributedContext(world_size=2)) is Replicate
    assert default_parallelism(fsdp=True, context=DistributedContext()) is Replicate  # nothing to shard


class TrainsBeside(DiTTask):
    """A tiny DiT task that also trains a tensor beside the model (as REPA's projector)."""

    def prepare(self, lr: float) -> None:
        super().prepare(lr)
        self.beside = nn.Parameter(torch.zeros(1))

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        return [*super().parameter_groups(weight_decay), {"params": [self.beside], "weight_decay": 0.0}]


@pytest.mark.parametrize("task_class, eval_every, message", [
    (DiTTask, 1, "--eval-every samples with every rank's whole model, and --fsdp shards it"),
    (TrainsBeside, 0, r"--fsdp shards the model only, and this run also trains 1 tensor\(s\) beside it"),
], ids=["eval-every", "trained-beside"])
def test_shard_refuses_what_it_cannot_checkpoint_or_evaluate_in_one_line(tmp_path, one_rank_group, task_class,
                                                                          eval_every, message):
    torch.manual_seed(0)
    config = TrainConfig(out=str(tmp_path), steps=1, batch_size=8, device="cpu", precision="fp32",
                         eval_every=eval_every)
    with pytest.raises(UserError, match=message) as refused:
        Trainer(task_class(TINY, sample_steps=2), tiny_fashion(), config, DistributedContext(), parallelism=Shard)
    assert "\n" not in str(refused.value)
