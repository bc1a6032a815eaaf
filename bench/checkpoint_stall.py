"""The training stall of a checkpoint (a benchmark, not a test): a DiT-XL/2-sized model and its EMA copy (AdamW's
state too with --optimizer) checkpointed on the CPU the way an FSDP run does it (`runs.sharded.ShardedFormat`, one
process in a gloo group), synchronously (`dcp.save`: training waits for the whole write) against asynchronously
(`dcp.async_save`: training waits only for the host copy of the shards, a thread writes them), with today's one-file
`save_checkpoint` (what DDP runs write) for reference. Prints a table and writes a JSON.

    .venv/bin/python bench/checkpoint_stall.py [--optimizer] [--folder /tmp] [--json bench/checkpoint_stall.json]

`measure_checkpoint_stall` is what other scripts (bench/scale.py) import.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import scalegen
from scalegen.distributed import DistributedContext
from scalegen.runs.folder import RunFolder, save_checkpoint
from scalegen.runs.sharded import ShardedFormat
from scalegen.train import sharding

PRESET, INPUT_SIZE = "DiT-XL/2", 32  # DiT-XL/2 on 256px images' 32×32 latents: 675 M parameters
GOAL = 0.10  # the asynchronous stall as a fraction of the synchronous one, at most
STEP = 1  # the step number the checkpoints carry


def checkpoint_modules(with_optimizer: bool) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """A DiT-XL/2, its EMA copy and an AdamW over it (its state made, zeros, only when `with_optimizer`)."""
    torch.manual_seed(0)
    model = scalegen.build_dit(PRESET, input_size=INPUT_SIZE)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if with_optimizer:
        sharding.sharded_state(model, None, optimizer)  # makes AdamW's (zero) moments, as a resumed run does
    return model, ema, optimizer


def state_bytes(state: dict) -> int:
    """The bytes of every tensor in a nested state dict."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(value) for value in state)
    return 0


def timed_sharded_saves(run: RunFolder, state: dict, asynchronous: bool, saves: int) -> list[tuple[float, float]]:
    """(stall, total) seconds of each of `saves` sharded checkpoints written one after the other by one writer, as a
    run writes them: until `save` returns (training goes on), and until the folder is in place."""
    writer = ShardedFormat(run, keep=1, context=DistributedContext(), asynchronous=asynchronous)
    times = []
    try:
        for step in range(1, saves + 1):
            started = time.perf_counter()
            writer.write(step, {"model": PRESET}, state, {"step": step}, {})
            returned = time.perf_counter()
            writer.wait()
            times.append((returned - started, time.perf_counter() - started))
    finally:
        writer.close()
    return times


def measure_checkpoint_stall(folder: str | Path | None = None, with_optimizer: bool = False, saves: int = 2) -> dict:
    """Time a DiT-XL/2-sized checkpoint written synchronously, asynchronously and in the one-file format.

    Args:
        folder: where the temporary run folders go (a fresh temporary folder under it, removed afterwards).
        with_optimizer: checkpoint AdamW's state too (twice the model's bytes more, and its host copy when
            asynchronous: ~22 GB in all for DiT-XL/2, where the default needs ~11 GB).
        saves: asynchronous checkpoints written one after the other: the first copies into fresh host memory,
            the later ones (a run's steady state) into the memory the writer keeps.
    Returns:
        parameters, bytes, and seconds: sync_stall_s; async_first_stall_s and async_stall_s (the last save's: the
        steady state), the stall until training may go on; async_total_s, until that checkpoint is complete;
        one_file_s; async_fraction = async_stall_s / sync_stall_s; goal_met.
    """
    created_group = not dist.is_initialized()
    if created_group:  # one process, its own store: no port to find
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model, ema, optimizer = checkpoint_modules(with_optimizer)
    state = sharding.sharded_state(model, ema, optimizer) if with_optimizer else {
        "model": model.state_dict(), "ema": ema.state_dict()}
    scratch = Path(tempfile.mkdtemp(dir=folder, prefix="checkpoint-stall-"))
    try:
        (sync_stall, _), = timed_sharded_saves(RunFolder(scratch / "sync"), state, False, saves=1)
        shutil.rmtree(scratch / "sync")
        asynchronous = timed_sharded_saves(RunFolder(scratch / "async"), state, True, saves)
        shutil.rmtree(scratch / "async")
        started = time.perf_counter()
        save_checkpoint(scratch / "one-file", STEP, {"model": PRESET}, state["model"], state["ema"],
                        {"step": STEP, **({"optimizer": optimizer.state_dict()} if with_optimizer else {})}, keep=1)
        one_file = time.perf_counter() - started
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if created_group:
            dist.destroy_process_group()
    return {"model": PRESET, "with_optimizer": with_optimizer, "parameters": sum(p.numel() for p in model.parameters()),
            "bytes": state_bytes(state), "sync_stall_s": sync_stall, "async_first_stall_s": asynchronous[0][0],
            "async_stall_s": asynchronous[-1][0], "async_total_s": asynchronous[-1][1], "one_file_s": one_file,
            "async_fraction": asynchronous[-1][0] / sync_stall, "goal_met": asynchronous[-1][0] <= GOAL * sync_stall,
            "saves": saves, "threads": torch.get_num_threads(), "torch": torch.__version__}


def print_checkpoint_stall(figures: dict) -> None:
    """The table of `measure_checkpoint_stall`'s figures."""
    print(f"{figures['model']}: {figures['parameters'] / 1e6:.0f} M parameters, {figures['bytes'] / 2**30:.2f} GiB "
          f"checkpointed (model + EMA{' + AdamW' * figures['with_optimizer']})")
    print(f"{'write':<34}{'training stalls':>16}{'complete after':>16}")
    print(f"{'sharded, synchronous (dcp.save)':<34}{figures['sync_stall_s']:>15.2f}s{figures['sync_stall_s']:>15.2f}s")
    print(f"{'sharded, async, first save':<34}{figures['async_first_stall_s']:>15.2f}s{'':>16}")
    print(f"{'sharded, async (dcp.async_save)':<34}{figures['async_stall_s']:>15.2f}s"
          f"{figures['async_total_s']:>15.2f}s")
    print(f"{'one-file (save_checkpoint)':<34}{figures['one_file_s']:>15.2f}s{figures['one_file_s']:>15.2f}s")
    verdict = "met" if figures["goal_met"] else "missed"
    print(f"async stall = {figures['async_fraction']:.1%} of the synchronous one (goal ≤ {GOAL:.0%}: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", action="store_true", help="checkpoint AdamW's state too (~22 GB of memory)")
    parser.add_argument("--folder", default=None, help="where the temporary checkpoints are written (default: /tmp)")
    parser.add_argument("--saves", type=int, default=2, help="asynchronous checkpoints in a row (the last is reported)")
    parser.add_argument("--json", default="bench/checkpoint_stall.json", help="where the figures are written")
    args = parser.parse_args()
    figures = measure_checkpoint_stall(args.folder, args.optimizer, args.saves)
    print_checkpoint_stall(figures)
    Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
