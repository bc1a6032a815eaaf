"""Launched by tests/runs/test_sharded_checkpoints.py under torchrun (2 ranks, gloo): FSDP runs of a tiny DiT that
write sharded checkpoints, and the DDP runs they are compared with. Arguments: the scenario ("runs" or "killed"), the
JSON file rank 0 writes what it saw to, and the folder the runs go under.

runs: DDP to step 2; FSDP to step 2 checkpointing every step in the background, while a hook in the shard writer
records what the run folder looked like as each write went on (and holds step 1's write until training has moved
on); the same run written synchronously; a single-process run's one-file step-2 checkpoint (trained by the test)
resumed under FSDP and under DDP to step 4. Rank 0 also stores the FSDP run's gathered full weights.
killed: FSDP to step 2, then on towards step 4, with rank 0 killed (SIGKILL) while it writes its step-4 shards.
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from scalegen.distributed import cleanup, setup_distributed
from scalegen.runs.folder import RunFolder, is_complete, load_training_state
from scalegen.train import sharding
from scalegen.train.dit_task import DiTTask
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, Trainer
from test_sharded_checkpoints import FULL_WEIGHTS, HALF_STEPS, STEPS, TINY, train_settings
from tests_support import tiny_fashion

WAIT_FOR_TRAINING_S = 60  # how long step 1's write is held for training to move on (a synchronous save never would)

torch.set_num_threads(1)
scenario, result_path, root = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
context = setup_distributed("cpu")
original_write = FileSystemWriter.write_data
writes: list[dict] = []  # rank 0's view of the run folder at each shard write
current: dict = {}  # the trainer the hook watches, and its run folder


def recording_write(writer, plan, planner):
    """Record (rank 0) where the shards go and what `last.json` names meanwhile; hold step 1's write until training
    has gone past step 1; then write."""
    trainer = current["trainer"]
    staging = Path(writer.path).parent
    if context.is_main:
        step = load_training_state(staging)["step"]  # written before the shards (training may be past it by now)
        run = RunFolder(current["out"])
        pointed = run.pointed_checkpoint()
        deadline = time.monotonic() + WAIT_FOR_TRAINING_S
        while step == 1 and trainer.step == step and time.monotonic() < deadline:
            time.sleep(0.01)
        writes.append({"step": step, "staging": staging.name, "in_checkpoints": staging.parent == run.checkpoints,
                       "final_exists": run.checkpoint(step).exists(),
                       "pointed": pointed.name if pointed else None,
                       "pointed_complete": pointed is None or is_complete(pointed),
                       "training_went_on": trainer.step > step})
    return original_write(writer, plan, planner)


def killing_write(writer, plan, planner):
    """Write this rank's shards; rank 0 then dies as a killed process does, before the checkpoint is complete."""
    written = original_write(writer, plan, planner)
    written.wait()
    if context.is_main and current["trainer"].step == STEPS:
        os.kill(os.getpid(), signal.SIGKILL)
    return written


def run(name: str, steps: int, fsdp: bool, asynchronous: bool = True, **overrides) -> Trainer:
    """Train (or resume) run `name` to `steps`, an FSDP run writing its checkpoints in the background or not;
    returns its trainer."""
    torch.manual_seed(0)  # the same initial weights on every rank (DDP and FSDP also broadcast rank 0's)
    config = TrainConfig(out=str(root / name), steps=steps, fsdp=fsdp, **{**train_settings(), **overrides})
    trainer = Trainer(DiTTask(TINY, sample_steps=2), tiny_fashion(), config, context)
    if fsdp:
        trainer.parallel.checkpoints.format.asynchronous = asynchronous
    current.update(trainer=trainer, out=config.out)
    trainer.run()
    return trainer


results = {}
if scenario == "runs":
    run("ddp_half", HALF_STEPS, fsdp=False)
    FileSystemWriter.write_data = recording_write
    trainer = run("fsdp_half", HALF_STEPS, fsdp=True, checkpoint_every=1)
    FileSystemWriter.write_data = original_write
    full = {f"{prefix}.{key}": value for prefix, module in (("model", trainer.model), ("ema", trainer.ema))
            for key, value in sharding.gathered_weights(module).items()}
    if context.is_main:
        save_file(full, root / FULL_WEIGHTS)
    run("fsdp_sync", HALF_STEPS, fsdp=True, asynchronous=False)
    run("one_then_fsdp", STEPS, fsdp=True)
    run("one_then_ddp", STEPS, fsdp=False)
    results = {"writes": writes, "losses": {name: [row["loss"] for row in read_log(root / name)]
                                            for name in ("one_then_fsdp", "one_then_ddp")}}
elif scenario == "killed":
    run("killed", HALF_STEPS, fsdp=True)
    FileSystemWriter.write_data = killing_write
    run("killed", STEPS, fsdp=True)
if context.is_main:
    result_path.write_text(json.dumps(results))
cleanup(context)
