"""FSDP2 for the trainer (`--fsdp`): each transformer block, then the root model, is sharded over the ranks with
`fully_shard`; checkpoints keep the one format every run writes (full, unsharded tensors, written by rank 0), so a
run resumes under DDP or FSDP alike.

The EMA copy is sharded like the model and updated shard by shard; it is gathered only to be saved or sampled.
Sample grids are drawn by rank 0 from a plain (unsharded) copy of the model that it keeps for the purpose, loaded
with the gathered weights at each grid.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from scalegen.errors import UserError
from scalegen.train.optimization import IMPLEMENTATION_KEYS

GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0's CPU only
FULL = StateDictOptions(full_state_dict=True)  # every rank passes the full tensors; each keeps its shard


def mixed_precision(precision: str, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on a GPU training in bf16; full precision otherwise (CPU autocast
    does the casting there)."""
    if precision == "bf16" and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def broadcast_from_main(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (DDP does this when it wraps a model; FSDP does not)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def shard(module: nn.Module, policy: MixedPrecisionPolicy) -> None:
    """Shard `module` in place: each of its transformer blocks (`module.blocks`), then the rest at the root."""
    blocks = getattr(module, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise UserError(f"--fsdp shards transformer blocks, and a {type(module).__name__} has none; train it with DDP "
                        "(drop --fsdp)")
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)


def gathered_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded module, on rank 0's CPU ({} on the other ranks); every rank calls this."""
    return get_model_state_dict(module, options=GATHERED)


def load_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (present on every rank) into a sharded module, strictly."""
    set_model_state_dict(module, weights, options=FULL)


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order (the index a plain `state_dict()` gives each)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    missing = [parameter for group in optimizer.param_groups for parameter in group["params"]
               if id(parameter) not in names]
    if missing:
        raise UserError(f"--fsdp shards the model only, and this run also trains {len(missing)} tensor(s) beside it "
                        "(REPA's projector); train it with DDP (drop --fsdp)")
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def gathered_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with full tensors, in a plain optimizer's layout (indices, not names), on rank 0's CPU;
    every rank calls this."""
    names = parameter_names(model, optimizer)
    by_name = get_optimizer_state_dict(model, optimizer, options=GATHERED)
    if not by_name:
        return {}
    index = {name: position for position, name in enumerate(names)}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in by_name["param_groups"]]
    return {"state": {index[name]: value for name, value in by_name["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a plain optimizer state (full tensors, by index; present on every rank) into the sharded optimizer,
    keeping its implementation (fused or foreach)."""
    names = parameter_names(model, optimizer)
    groups = [{**saved, "params": [names[index] for index in saved["params"]],
               **{key: group[key] for key in IMPLEMENTATION_KEYS}}
              for saved, group in zip(state["param_groups"], optimizer.param_groups)]
    by_name = {"state": {names[index]: value for index, value in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=FULL)
