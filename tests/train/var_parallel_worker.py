"""Launched by tests/train/test_fast_path.py under torchrun (2 ranks, gloo): trains a tiny VAR with the token head
named by the third argument (categorical: on a tiny VQ tokenizer's ids; flow: on a tiny KL tokenizer's continuous
scales) for a few steps with DDP, then with FSDP. Rank 0 writes each run's logged losses and whether the ranks hold the
same (full) weights, as JSON, to the file named by the first argument; the runs go under the folder named by the
second."""
import json
import sys
from pathlib import Path

import torch

from scalegen.distributed import cleanup, gather_tensors, setup_distributed
from scalegen.files import json_config
from scalegen.models.var import VARConfig
from scalegen.tokenizers.vqvae import VQVAE
from scalegen.train.optimization import full_tensor
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, Trainer
from scalegen.train.var_task import VARTask
from tests_support import tiny_fashion
from test_flow_head import TINY_FLOW_VAR, tiny_tokenizer
from test_tokenizer_training import TINY_TOKENIZER
from test_var_training import TINY_VAR

STEPS = 3

torch.set_num_threads(1)
result_path, root, head = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
context = setup_distributed("cpu")
if head == "flow":
    tokenizer, model_config = tiny_tokenizer(), VARConfig(**TINY_FLOW_VAR)
else:
    torch.manual_seed(0)
    tokenizer, model_config = VQVAE(TINY_TOKENIZER).eval(), VARConfig(**TINY_VAR)


def run(name: str, fsdp: bool) -> bool:
    """Train run `name`; returns whether every rank holds the same full weights."""
    torch.manual_seed(0)  # the same initial weights on every rank (DDP and FSDP also broadcast rank 0's)
    task = VARTask(model_config, tokenizer, {"model": json_config(tokenizer.config)}, sample_cfg=2.0)
    config = TrainConfig(out=str(root / name), steps=STEPS, batch_size=8, lr=3e-3, warmup_steps=0, log_every=1,
                         checkpoint_every=100, sample_every=0, device="cpu", precision="fp32", fsdp=fsdp)
    Trainer(task, tiny_fashion(8), config, context).run()
    flat = torch.cat([full_tensor(parameter.detach()).flatten() for parameter in task.model.parameters()])  # (P,)
    everyone = gather_tensors(flat.unsqueeze(0), context)  # (world, P)
    return all(torch.equal(row, everyone[0]) for row in everyone)


results = {}
for name, fsdp in (("ddp", False), ("fsdp", True)):
    in_sync = run(name, fsdp)
    if context.is_main:
        results[name] = {"in_sync": in_sync, "losses": [row["loss"] for row in read_log(root / name)]}
if context.is_main:
    Path(result_path).write_text(json.dumps(results))
cleanup(context)
