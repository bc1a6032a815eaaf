"""FSDP2's mechanics for the `Shard` strategy (parallel.py, `--fsdp`): each transformer block, then the root model,
is sharded over the ranks with `fully_shard`, and so are its checkpoints: every rank writes its shards of the model,
the EMA and the optimizer with torch.distributed.checkpoint (DCP), in the background while training goes on, and rank
0 the rest beside them (see runs/folder.py's layout). A run resumes from them at any world size, sharded or not (DCP
reshards), and from a one-file checkpoint too; `runs.weights.load_weights` reads them as full tensors in one process.

The EMA copy is sharded like the model and updated shard by shard. No rank keeps a full copy of the model: a sample
grid is drawn by rank 0 from the gathered weights put into a parameter-free skeleton of the model, then freed.
"""
from __future__ import annotations

import copy
import inspect
import pickle
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from scalegen.distributed import DistributedContext
from scalegen.errors import UserError
from scalegen.files import fsync_path
from scalegen.runs.folder import (
    SHARDED_DIR, SHARDED_EMA, SHARDED_MODEL, SINGLE_PROCESS_WARNING, RunFolder, failed_checkpoint, move_into_place,
    prune, staging_folder, write_state_files,
)
from scalegen.runs.weights import holds_ema
from scalegen.train.optimization import IMPLEMENTATION_KEYS, local

GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0's CPU only
FULL = StateDictOptions(full_state_dict=True)  # every rank passes the full tensors; each keeps its shard
SHARDED_OPTIMIZER = "optimizer"  # the optimizer state's key in a DCP folder, beside SHARDED_MODEL and SHARDED_EMA
KEPT_STAGER = "async_stager" in inspect.signature(dcp.async_save).parameters  # torch ≥ 2.8: a stager to keep


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


# ----- sharded checkpoints -----

def sharded_state(model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's part of a DCP folder: its shards of the model, the EMA (None: none) and the optimizer state (a
    plain module's full tensors in a process that shards nothing). A fresh optimizer gets its empty state made."""
    state = {SHARDED_MODEL: get_model_state_dict(model), SHARDED_OPTIMIZER: get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        state[SHARDED_EMA] = get_model_state_dict(ema)
    return state


def root_error(error: BaseException) -> BaseException:
    """The first failed rank's own error inside DCP's `CheckpointException`, or the error itself."""
    failures = getattr(error, "failures", None)
    if not failures:
        return error
    failure = next(iter(failures.values()))
    return failure[0] if isinstance(failure, tuple) else failure  # DCP keeps (error, traceback) pairs


def load_sharded_checkpoint(folder: Path, model: nn.Module, ema: nn.Module | None,
                            optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's model, EMA and optimizer state, keeping the optimizer's implementation; every rank
    of a launch calls this (a single process alone, without a process group).

    The modules may be sharded at any world size (DCP reshards) or plain (a single process; DDP ranks each read the
    full tensors). A checkpoint without EMA starts the EMA from its weights.
    Raises:
        UserError: the shards cannot be read.
    """
    reader = dcp.FileSystemReader(folder / SHARDED_DIR)
    try:
        has_ema = holds_ema(reader.read_metadata().state_dict_metadata)
        state = sharded_state(model, ema if has_ema else None, optimizer)
        with warnings.catch_warnings():  # a single process is the intent, and torch says it assumes so
            warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
            dcp.load(state, storage_reader=reader)
    except (dcp.CheckpointException, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise UserError(f"cannot read the shards of {folder} ({str(root_error(error)).strip()[:160]})") from None
    set_model_state_dict(model, state[SHARDED_MODEL])
    if ema is not None:
        set_model_state_dict(ema, state[SHARDED_EMA if has_ema else SHARDED_MODEL])
    saved = state[SHARDED_OPTIMIZER]
    groups = [{**saved_group, **{key: group[key] for key in IMPLEMENTATION_KEYS}}
              for saved_group, group in zip(saved["param_groups"], optimizer.param_groups)]
    set_optimizer_state_dict(model, optimizer, {**saved, "param_groups": groups})


@dataclass
class PendingCheckpoint:
    """A sharded checkpoint being written: its staging folder, its step and, written in the background, the future
    of this rank's write (None once written)."""

    staging: Path
    step: int
    write: Future | None


class ShardedWriter:
    """Writes an FSDP run's checkpoints: every rank its shards with DCP into the staging folder rank 0 made and wrote
    config.json and training_state.pt into; rank 0 renames the folder into place once the last shard is written
    (DCP writes its index last), then moves `last.json` and prunes, as `save_checkpoint` does for one-file ones.

    Asynchronous (`dcp.async_save`): a rank returns to training once its shards are copied to host memory while a
    thread writes them; `poll` (every step: no collective) and `wait` (before the next save) finish it, `close` (at
    the end) too, and frees the host copy.
    """

    def __init__(self, run: RunFolder, keep: int, context: DistributedContext, asynchronous: bool = True):
        self.run, self.keep, self.context, self.asynchronous = run, keep, context, asynchronous
        # DCP's collectives on a gloo group of their own: a background write never interleaves with training's, and
        # a GPU run's NCCL group has no CPU side (torch's advice for async_save). Every rank creates it here.
        self.group = dist.new_group(backend="gloo")
        self.pending: PendingCheckpoint | None = None
        # Kept across saves, the stager copies the shards into the same host memory each time instead of fresh pages
        # (faulting those in is most of a CPU run's stall); older torch allocates a new copy at each save.
        self.stager = dcp.staging.DefaultStager(dcp.staging.StagingOptions(
            use_pinned_memory=context.device.type == "cuda", use_shared_memory=False, use_async_staging=False,
            use_non_blocking_copy=False)) if asynchronous and KEPT_STAGER else None

    def save(self, step: int, config: dict, training_state: dict, state: dict) -> None:
        """Start checkpoint `step` (every rank calls this, after the previous one is finished).

        Args:
            config, training_state: what rank 0 writes beside the shards (read on rank 0 only).
            state: this rank's `sharded_state`.
        Raises:
            UserError: the checkpoint could not be written; the previous one is intact.
        """
        self.wait()
        staging, problem = None, None
        if self.context.is_main:
            try:
                staging = staging_folder(self.run)
                write_state_files(staging, config, training_state)
            except (OSError, RuntimeError) as error:
                problem = str(failed_checkpoint(self.run, step, staging, error))
        shared = [staging, problem]  # every rank writes into rank 0's staging folder, or stops with its error
        dist.broadcast_object_list(shared, src=0, group=self.group)
        staging, problem = shared
        if problem is not None:
            raise UserError(problem)
        try:
            if self.asynchronous:
                stager = {"async_stager": self.stager} if self.stager is not None else {}
                write = dcp.async_save(state, checkpoint_id=staging / SHARDED_DIR, process_group=self.group, **stager)
            else:
                write = None
                dcp.save(state, checkpoint_id=staging / SHARDED_DIR, process_group=self.group)
        except (dcp.CheckpointException, OSError, RuntimeError) as error:
            raise self.failure(step, staging, error) from None
        self.pending = PendingCheckpoint(staging, step, write)
        if write is None:
            self.finish()

    def poll(self) -> None:
        """Finish the pending checkpoint if its write is done: a cheap look, no collective (call it every step)."""
        if self.pending is not None and self.pending.write.done():  # a synchronous write is finished at once
            self.finish()

    def wait(self) -> None:
        """Wait for the pending checkpoint's write, if any, and finish it."""
        if self.pending is not None:
            self.finish()

    def close(self) -> None:
        """Wait for the pending checkpoint, finish it, and free the host copy the stager keeps."""
        try:
            self.wait()
        finally:
            if self.stager is not None:
                self.stager.close()
                self.stager = None

    def finish(self) -> None:
        """Wait for this rank's write; rank 0 then moves the complete folder into place, `last.json`, and prunes."""
        pending, self.pending = self.pending, None
        try:
            if pending.write is not None:
                pending.write.result()
            if self.context.is_main:
                shards = pending.staging / SHARDED_DIR
                for path in [*shards.iterdir(), shards, pending.staging]:  # DCP's index and folder, too
                    fsync_path(path)
                final = move_into_place(self.run, pending.staging, pending.step)
        except (dcp.CheckpointException, OSError, RuntimeError) as error:
            raise self.failure(pending.step, pending.staging, error) from None
        if self.context.is_main:
            prune(self.run, final, self.keep)

    def failure(self, step: int, staging: Path, error: BaseException) -> UserError:
        """The one-line error of a failed checkpoint; rank 0 removes its staging folder."""
        return failed_checkpoint(self.run, step, staging if self.context.is_main else None, root_error(error))
