"""Launched by tests/test_train.py under torchrun: trains a tiny DiT with DDP, then checks every rank holds the
same parameters. Writes 'in sync <checksum>' (rank 0) to the file named by the first argument."""
import sys

import torch

from scalegen.distributed import cleanup, gather_tensors, setup_distributed
from scalegen.dit import DiTConfig
from scalegen.objectives import DiTTask
from scalegen.train import TrainConfig, Trainer
from tests_support import tiny_fashion

torch.set_num_threads(1)
result_path, run_dir = sys.argv[1], sys.argv[2]
context = setup_distributed("cpu")
torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's at wrap time)
task = DiTTask(DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10))
config = TrainConfig(out=run_dir, steps=3, batch_size=8, lr=1e-2, log_every=1, checkpoint_every=100, sample_every=0, device="cpu")
Trainer(task, tiny_fashion(), config, context).run()
flat = torch.cat([parameter.detach().flatten() for parameter in task.model.parameters()])  # (P,)
everyone = gather_tensors(flat.unsqueeze(0), context)  # (world, P)
if context.is_main:
    in_sync = torch.equal(everyone[0], everyone[1]) and everyone.shape[0] == 2
    with open(result_path, "w") as stream:
        stream.write(f"{'in sync' if in_sync else 'OUT OF SYNC'} {flat.abs().sum().item():.6f}\n")
cleanup(context)
