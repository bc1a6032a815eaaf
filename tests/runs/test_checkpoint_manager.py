"""The checkpoint manager (scalegen.runs.checkpoints): one call writes and one resumes either built-in format, the
reader is picked by what is on disk, a broken newest checkpoint is skipped for the one before, and a third format
registered from this file alone trains and resumes a run through the public trainer."""
from pathlib import Path

import pytest
import torch
from torch import nn

from scalegen.distributed import DistributedContext
from scalegen.files import safe_torch_load
from scalegen.models.dit import DiTConfig
from scalegen.runs.checkpoints import (
    CHECKPOINT_FORMATS, CheckpointFormat, CheckpointManager, CheckpointTarget, format_of,
)
from scalegen.runs.folder import (
    CONFIG_FILE, EMA_STATE, MODEL_FILE, MODEL_STATE, OPTIMIZER_STATE, RunFolder, failed_checkpoint, move_into_place,
    prune, staging_folder, write_state_files,
)
from scalegen.train import sharding
from scalegen.train.dit_task import DiTTask
from scalegen.train.parallel import Replicate
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, train
from tests_support import tiny_fashion

CONTEXT = DistributedContext()  # a single process
TOY_FILE = "toy.pt"
TINY = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def modules(seed: int) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """A small model, its EMA copy (other weights) and an AdamW over the model that took one step."""
    torch.manual_seed(seed)
    model, ema = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).square().sum().backward()
    optimizer.step()
    return model, ema, optimizer


def state_of(format_name: str, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What the strategy writing `format_name` gives its manager: whole state dicts, or DCP's state-dict form."""
    if format_name == "sharded":
        return sharding.sharded_state(model, ema, optimizer)
    return {MODEL_STATE: model.state_dict(), EMA_STATE: ema.state_dict(), OPTIMIZER_STATE: optimizer.state_dict()}


def same_tensors(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def resumed_into(run: RunFolder, seed: int) -> tuple[tuple, tuple | None]:
    """Fresh modules of another seed, resumed from `run` through a manager that writes one-file checkpoints (it
    reads whatever is on disk); returns (modules, what `resume` returned)."""
    reader = Replicate(CONTEXT, run, keep=2)  # its manager writes one-file checkpoints
    model, ema, optimizer = modules(seed)
    resumed = reader.checkpoints.resume(lambda config: None,
                                        lambda folder, state: reader.load(folder, state, model, ema, optimizer))
    return (model, ema, optimizer), resumed


@pytest.mark.parametrize("format_name", ["one-file", "sharded"])
def test_the_manager_writes_and_resumes_either_format_with_one_call_each(tmp_path, one_rank_group, format_name):
    run = RunFolder(tmp_path)
    model, ema, optimizer = modules(seed=0)
    writer = CheckpointManager(run, keep=2, context=CONTEXT, format_name=format_name)
    writer.save(3, {"model": "toy"}, state_of(format_name, model, ema, optimizer), {"step": 3}, {})
    writer.close()  # a sharded checkpoint is written in the background
    assert format_of(run.last_checkpoint()).name == format_name
    (loaded_model, loaded_ema, loaded_optimizer), resumed = resumed_into(run, seed=1)
    folder, config, training_state = resumed
    assert folder == run.checkpoint(3) and config == {"model": "toy"} and training_state["step"] == 3
    assert same_tensors(loaded_model.state_dict(), model.state_dict())
    assert same_tensors(loaded_ema.state_dict(), ema.state_dict())
    saved, loaded = optimizer.state_dict()["state"], loaded_optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and all(same_tensors(saved[index], loaded[index]) for index in saved)


def test_a_broken_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, capsys):
    run = RunFolder(tmp_path)
    manager = CheckpointManager(run, keep=2, context=CONTEXT, format_name="one-file")
    first = modules(seed=0)
    manager.save(1, {"model": "toy"}, state_of("one-file", *first), {"step": 1}, {})
    manager.save(2, {"model": "toy"}, state_of("one-file", *modules(seed=2)), {"step": 2}, {})
    newest = run.last_checkpoint()
    (newest / MODEL_FILE).write_bytes((newest / MODEL_FILE).read_bytes()[:100])  # a truncated write
    (model, _, _), (folder, _, training_state) = resumed_into(run, seed=1)
    assert folder == run.checkpoint(1) and training_state["step"] == 1
    assert same_tensors(model.state_dict(), first[0].state_dict())
    assert f"skipping checkpoint {newest.name}" in capsys.readouterr().out


def test_a_folder_no_format_holds_is_skipped_and_a_run_of_such_folders_refused(tmp_path, capsys):
    run = RunFolder(tmp_path)
    (run.checkpoint(1)).mkdir(parents=True)
    (run.checkpoint(1) / CONFIG_FILE).write_text("{}")
    with pytest.raises(Exception, match="holds checkpoints but none is complete"):
        resumed_into(run, seed=0)
    assert "holds no complete checkpoint of any format" in capsys.readouterr().out


class TorchSaveFormat(CheckpointFormat):
    """A third format, registered by this test alone: the whole state in one torch.save file, written by rank 0
    into a staging folder that moves into place, as the built-in formats do."""

    name = "toy-torch-save"

    @classmethod
    def is_mine(cls, folder: Path) -> bool:
        return (folder / TOY_FILE).exists()

    def write(self, step, config, state, training_state, task_weights):
        staging = None
        try:
            staging = staging_folder(self.run)
            torch.save(state, staging / TOY_FILE)
            write_state_files(staging, config, training_state)
            final = move_into_place(self.run, staging, step)
        except OSError as error:
            raise failed_checkpoint(self.run, step, staging, error) from None
        prune(self.run, final, self.keep)

    @classmethod
    def read_into(cls, folder: Path, training_state: dict, target: CheckpointTarget) -> None:
        state = safe_torch_load(folder / TOY_FILE)
        target.load_full(state[MODEL_STATE], state.get(EMA_STATE, state[MODEL_STATE]), state[OPTIMIZER_STATE])


class TorchSaveReplicate(Replicate):
    """DDP's strategy (a world of one here) writing the toy format."""

    checkpoint_format = TorchSaveFormat.name


def run_tiny(out: Path, steps: int, parallelism=None) -> None:
    torch.manual_seed(0)
    config = TrainConfig(out=str(out), steps=steps, batch_size=8, lr=2e-3, log_every=1, checkpoint_every=2,
                         device="cpu", precision="fp32")
    train(DiTTask(TINY, sample_steps=2), tiny_fashion(), config, parallelism)


def test_a_format_registered_from_this_file_trains_and_resumes_as_the_default_one(tmp_path, monkeypatch):
    monkeypatch.setitem(CHECKPOINT_FORMATS, TorchSaveFormat.name, TorchSaveFormat)
    run_tiny(tmp_path / "toy", 3, TorchSaveReplicate)
    folder = RunFolder(tmp_path / "toy").pointed_checkpoint()  # (sampling's readers know the built-in formats)
    assert (folder / TOY_FILE).exists() and not (folder / MODEL_FILE).exists()
    assert format_of(folder) is TorchSaveFormat
    run_tiny(tmp_path / "toy", 5)  # the default strategy resumes it: the reader is picked by what is on disk
    run_tiny(tmp_path / "default", 5)
    toy, default = read_log(tmp_path / "toy"), read_log(tmp_path / "default")
    assert [row["step"] for row in toy] == [1, 2, 3, 4, 5]
    assert [row["loss"] for row in toy] == [row["loss"] for row in default]
