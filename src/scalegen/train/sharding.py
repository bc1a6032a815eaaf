"""FSDP2's mechanics for the `Shard` strategy (parallel.py, `--fsdp`): each transformer block, then the root model,
is sharded over the ranks with `fully_shard`; its state goes to and comes from a checkpoint through torch.distributed's
state-dict API (`sharded_state`, `load_sharded_state`: the DCP format of runs/sharded.py reads and writes it), and its
optimizer state is resharded from a one-file checkpoint's full tensors.

The EMA copy is sharded like the model and updated shard by shard. No rank keeps a full copy of the model: a sample
grid is drawn by rank 0 from the gathered weights put into a parameter-free skeleton of the model, then freed.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from scalegen.errors import UserError
from scalegen.runs.folder import EMA_STATE, MODEL_STATE, OPTIMIZER_STATE
from scalegen.train.optimization import IMPLEMENTATION_KEYS, local

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


def parameters_are_finite(modules: list[nn.Module | None]) -> bool:
    """Whether every parameter of these modules (None: skipped) is finite, as far as this rank holds it: a sharded
    parameter's local shard, a plain one whole. (Buffers may hold infinities on purpose, as VAR's attention mask.)"""
    return all(bool(torch.isfinite(local(parameter)).all()) for module in modules if module is not None
               for parameter in module.parameters())


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order (the index a plain `state_dict()` gives each)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    missing = [parameter for group in optimizer.param_groups for parameter in group["params"]
               if id(parameter) not in names]
    if missing:
        raise UserError(f"--fsdp shards the model only, and this run also trains {len(missing)} tensor(s) beside it "
                        "(REPA's projector); train it with DDP (drop --fsdp)")
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a plain optimizer state (full tensors, by index; present on every rank) into the sharded optimizer,
    keeping its implementation (fused or foreach)."""
    names = parameter_names(model, optimizer)
    groups = [{**saved, "params": [names[index] for index in saved["params"]],
               **{key: group[key] for key in IMPLEMENTATION_KEYS}}
              for saved, group in zip(state["param_groups"], optimizer.param_groups)]
    by_name = {"state": {names[index]: value for index, value in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=FULL)


# ----- sample grids without a full copy -----

def parameter_free_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters lie on the meta device (no memory) while its buffers, attributes and
    referenced helpers (a decoder, a tokenizer) are real: a skeleton that `filled_copy` turns into a working model.
    Taken before `fully_shard` turns the module into its FSDP class."""
    memo = {id(parameter): nn.Parameter(torch.empty_like(parameter, device="meta"), parameter.requires_grad)
            for parameter in module.parameters()}
    return copy.deepcopy(module, memo)


def filled_copy(skeleton: nn.Module, weights: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A plain model in eval mode on `device`: a copy of `skeleton` holding `weights` (a full state dict), strictly."""
    model = copy.deepcopy(skeleton)
    model.load_state_dict(weights, assign=True)  # the meta parameters become the weights themselves
    return model.to(device).requires_grad_(False).eval()


# ----- checkpoint state -----

def sharded_state(model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's part of a DCP folder: its shards of the model, the EMA (None: none) and the optimizer state (a
    plain module's full tensors in a process that shards nothing). A fresh optimizer gets its empty state made."""
    state = {MODEL_STATE: get_model_state_dict(model), OPTIMIZER_STATE: get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        state[EMA_STATE] = get_model_state_dict(ema)
    return state


def load_sharded_state(model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer, state: dict,
                       with_ema: bool) -> None:
    """Put a `sharded_state` read from a checkpoint (with the EMA's when `with_ema`; without, the EMA starts from the
    model's weights) into the modules, sharded at any world size or plain, keeping the optimizer's implementation."""
    set_model_state_dict(model, state[MODEL_STATE])
    if ema is not None:
        set_model_state_dict(ema, state[EMA_STATE if with_ema else MODEL_STATE])
    saved = state[OPTIMIZER_STATE]
    groups = [{**saved_group, **{key: group[key] for key in IMPLEMENTATION_KEYS}}
              for saved_group, group in zip(saved["param_groups"], optimizer.param_groups)]
    set_optimizer_state_dict(model, optimizer, {**saved, "param_groups": groups})
