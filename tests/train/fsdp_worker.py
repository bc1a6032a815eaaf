"""Launched by tests/train/test_fast_path.py under torchrun (2 ranks, gloo): trains a tiny DiT for 4 steps of 2 accumulated
micro-batches with DDP, with FSDP, with FSDP stopped at step 2 and resumed, DDP to step 2 then FSDP, and FSDP to
step 2 then DDP. Rank 0 writes each run's logged losses and whether the ranks hold the same (full) weights, as JSON,
to the file named by the first argument; the runs go under the folder named by the second."""
import json
import sys
from pathlib import Path

import torch

from scalegen.distributed import cleanup, gather_tensors, setup_distributed
from scalegen.models.dit import DiTConfig
from scalegen.train.dit_task import DiTTask
from scalegen.train.optimization import full_tensor
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, Trainer
from tests_support import tiny_fashion

TINY = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
STEPS = 4

torch.set_num_threads(1)
result_path, root = sys.argv[1], Path(sys.argv[2])
context = setup_distributed("cpu")


def run(name: str, steps: int, fsdp: bool) -> bool:
    """Train (or resume) run `name` to `steps`; returns whether every rank holds the same full weights."""
    torch.manual_seed(0)  # the same initial weights on every rank (DDP and FSDP also broadcast rank 0's)
    task = DiTTask(TINY, sample_steps=2)
    config = TrainConfig(out=str(root / name), steps=steps, batch_size=8, grad_accumulation=2, lr=1e-2, log_every=1,
                         checkpoint_every=100, device="cpu", precision="fp32", fsdp=fsdp)
    Trainer(task, tiny_fashion(), config, context).run()
    flat = torch.cat([full_tensor(parameter.detach()).flatten() for parameter in task.model.parameters()])  # (P,)
    everyone = gather_tensors(flat.unsqueeze(0), context)  # (world, P)
    return all(torch.equal(row, everyone[0]) for row in everyone)


results = {}
for name, plan in {"ddp": [False], "fsdp": [True], "fsdp_resumed": [True, True], "ddp_then_fsdp": [False, True],
                   "fsdp_then_ddp": [True, False]}.items():
    for part, fsdp in enumerate(plan):
        in_sync = run(name, STEPS if part == len(plan) - 1 else STEPS // 2, fsdp)
    if context.is_main:
        results[name] = {"in_sync": in_sync, "losses": [row["loss"] for row in read_log(root / name)]}
if context.is_main:
    Path(result_path).write_text(json.dumps(results))
cleanup(context)
