"""Launched by tests/train/test_step_guard.py under torchrun (2 processes, gloo): averages the gradients of three
parameters outside any DDP model, where rank 1 has no gradient for one of them and one is float64, and writes what
each rank holds after, as JSON, to '<first argument>.<rank>'."""
import json
import sys

import torch
from torch import nn

from scalegen.distributed import cleanup, setup_distributed
from scalegen.train.optimization import average_gradients

torch.set_num_threads(1)
context = setup_distributed("cpu")
shared, lone = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
double = nn.Parameter(torch.zeros(2, dtype=torch.float64))
shared.grad = torch.full((3,), float(context.rank + 1))  # 1 and 2: mean 1.5
double.grad = torch.tensor([0.5, 1.5], dtype=torch.float64) * context.rank  # 0 and (0.5, 1.5): mean (0.25, 0.75)
if context.rank == 0:
    lone.grad = torch.tensor([4.0, -2.0])  # rank 1's batch left it without a gradient: mean (2, -1)
average_gradients([shared, lone, double], context)
averaged = {name: parameter.grad.tolist() for name, parameter in (("shared", shared), ("lone", lone),
                                                                   ("double", double))}
with open(f"{sys.argv[1]}.{context.rank}", "w") as stream:
    json.dump(averaged, stream)
cleanup(context)
