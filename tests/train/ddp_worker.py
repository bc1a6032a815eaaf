"""Launched by tests/train/test_train.py and tests/test_gpu.py under torchrun: trains a tiny DiT with DDP on the device
named by the optional third argument (default cpu) with the objective named by the optional fourth (default ddpm;
"meanflow": guidance trained in), then checks every rank holds the same parameters. Writes
'in sync <backend> <checksum>' (rank 0) to the file named by the first argument."""
import sys

import torch

from scalegen.distributed import cleanup, gather_tensors, setup_distributed
from scalegen.models.dit import DiTConfig
from scalegen.train.dit_task import DiTTask, ObjectiveConfig
from scalegen.train.trainer import TrainConfig, Trainer
from tests_support import tiny_fashion

torch.set_num_threads(1)
result_path, run_dir = sys.argv[1], sys.argv[2]
device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
context = setup_distributed(device)
torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's at wrap time)
objective = ObjectiveConfig(name="meanflow", guidance=2.0) if sys.argv[4:] == ["meanflow"] else ObjectiveConfig()
task = DiTTask(DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                         learn_sigma=objective.name == "ddpm"), objective=objective, sample_steps=2)
config = TrainConfig(out=run_dir, steps=3, batch_size=8, lr=1e-2, log_every=1, checkpoint_every=100, sample_every=0, device=device)
Trainer(task, tiny_fashion(), config, context).run()
flat = torch.cat([parameter.detach().flatten() for parameter in task.model.parameters()])  # (P,)
everyone = gather_tensors(flat.unsqueeze(0), context)  # (world, P)
if context.is_main:
    in_sync = everyone.shape[0] == context.world_size and all(torch.equal(row, everyone[0]) for row in everyone)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    with open(result_path, "w") as stream:
        stream.write(f"{'in sync' if in_sync else 'OUT OF SYNC'} {backend} {flat.abs().sum().item():.6f}\n")
cleanup(context)
