"""How a run spreads its model over the ranks, as a strategy the trainer calls without knowing which it is: a
`Parallelism` wraps the model for training, switches the gradient reduction per micro-batch, gives
the state its checkpoint format writes (`state_to_save`) and loads a checkpoint's state into its modules, and gives
rank 0 the whole model to draw sample grids with. The checkpoints themselves are the run's `CheckpointManager`'s
(runs/checkpoints.py): it writes them in the format the strategy names and reads whichever format is on disk.

- `Replicate` (DDP; a single process is its world of one): every rank holds the whole model and optimizer state;
  its checkpoints are one-file ones (rank 0 writes them).
- `Shard` (FSDP2: `--fsdp` under torchrun): each rank holds its shards of the model, the EMA and the optimizer state;
  its checkpoints are sharded ones (DCP, every rank in the background; sharding.py has the FSDP mechanics).

Either resumes from a checkpoint of any format written at any world size. Another strategy is a subclass given to
`Trainer` or `train` as `parallelism=` (any callable of (context, run folder, checkpoints to keep)).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scalegen.distributed import DistributedContext
from scalegen.errors import UserError
from scalegen.runs.checkpoints import CheckpointManager
from scalegen.runs.folder import EMA_STATE, MODEL_STATE, OPTIMIZER_STATE, RunFolder
from scalegen.runs.one_file import OneFileFormat
from scalegen.runs.sharded import ShardedFormat
from scalegen.train import sharding
from scalegen.train.optimization import load_optimizer_state


class Parallelism(ABC):
    """One way of spreading a run over its ranks; every rank makes the same calls in the same order.

    Args:
        context: this process's rank, the world size and its device.
        run: the run folder the checkpoints go into.
        keep: how many steps' checkpoints to keep.
    """

    summary_words = ""  # what the run's summary line says after its number of processes
    checkpoint_format: ClassVar[str]  # the name of the registered checkpoint format it writes (runs/checkpoints.py)

    def __init__(self, context: DistributedContext, run: RunFolder, keep: int):
        self.context, self.run, self.keep = context, run, keep
        self.checkpoints = CheckpointManager(run, keep, context, self.checkpoint_format)

    @abstractmethod
    def wrap(self, model: nn.Module, ema: nn.Module | None, precision: str) -> nn.Module:
        """Spread `model` and its EMA copy (None: no EMA) over the ranks, in place where the strategy shards; called
        before the optimizer is built over the model's parameters.

        Args:
            precision: the run's resolved precision ("fp32", "bf16" or "fp16").
        Returns:
            The network the loss is computed through: a wrapper around `model`, or `model` itself.
        """

    def check_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Refuse, as a `UserError`, an optimizer whose state this strategy cannot checkpoint (none by default)."""

    def check_evaluation(self) -> None:
        """Refuse, as a `UserError`, evaluation while training (`--eval-every`: every rank samples with the whole
        model) where the ranks do not hold the whole model (none by default)."""

    @abstractmethod
    def gradient_sync(self, network: nn.Module, last_micro_batch: bool) -> AbstractContextManager:
        """The context a micro-batch's forward and backward run in: the gradients are reduced over the ranks on a
        step's last micro-batch only.

        Args:
            network: what `wrap` returned.
        """

    @abstractmethod
    def state_to_save(self, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer) -> dict:
        """This rank's state as its checkpoint format writes it: MODEL_STATE, OPTIMIZER_STATE and EMA_STATE (absent
        without EMA)."""

    def save(self, step: int, config: dict, model: nn.Module, ema: nn.Module | None,
             optimizer: torch.optim.Optimizer, training_state: dict,
             task_weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write checkpoint `step` through the run's checkpoint manager; every rank calls this, with finite weights.

        Args:
            config: the JSON config that rebuilds the model.
            training_state: the scaler, step, RNG, train config and task state (all but the optimizer's).
            task_weights: the task's own weight files by name (the tokenizer of an end-to-end run).
        Raises:
            UserError: the checkpoint could not be written; the previous one is intact.
        """
        self.checkpoints.save(step, config, self.state_to_save(model, ema, optimizer), training_state, task_weights)

    def load(self, folder: Path, state: dict, model: nn.Module, ema: nn.Module | None,
             optimizer: torch.optim.Optimizer) -> None:
        """Put checkpoint `folder`'s weights, EMA and optimizer state, of whichever format, into this run's modules
        (every rank calls this).

        Args:
            state: the checkpoint's training state.
        Raises:
            UserError: the checkpoint cannot be read.
        """
        self.checkpoints.load(folder, state, HeldModules(self, model, ema, optimizer))

    @abstractmethod
    def load_full(self, weights: dict, ema_weights: dict | None, optimizer_state: dict, model: nn.Module,
                  ema: nn.Module | None, optimizer: torch.optim.Optimizer) -> None:
        """Load full tensors present on every rank (a one-file checkpoint's) into this run's modules, strictly."""

    @abstractmethod
    def gathered(self, module: nn.Module) -> nn.Module | None:
        """The whole `module` (the model or the EMA) for rank 0 to draw a sample grid with; every rank calls this.

        Returns:
            On rank 0, a module holding every weight (not necessarily `module` itself); None where a rank has none.
        """

    def poll(self) -> None:
        """Finish a checkpoint written in the background if its write is done (called every step: no collective)."""
        self.checkpoints.poll()

    def close(self) -> None:
        """Finish a checkpoint being written and free what writing it holds (at the end of training, even a failed
        one)."""
        self.checkpoints.close()


@dataclass
class HeldModules:
    """A run's modules as `strategy` holds them: what a checkpoint format reads into (`runs.checkpoints.
    CheckpointTarget`). DCP's state-dict API serves plain and sharded modules alike."""

    strategy: Parallelism
    model: nn.Module
    ema: nn.Module | None
    optimizer: torch.optim.Optimizer

    @property
    def has_ema(self) -> bool:
        return self.ema is not None

    def load_full(self, weights: dict, ema_weights: dict | None, optimizer_state: dict) -> None:
        self.strategy.load_full(weights, ema_weights, optimizer_state, self.model, self.ema, self.optimizer)

    def distributed_state(self, with_ema: bool) -> dict:
        return sharding.sharded_state(self.model, self.ema if with_ema else None, self.optimizer)

    def load_distributed(self, state: dict, with_ema: bool) -> None:
        sharding.load_sharded_state(self.model, self.ema, self.optimizer, state, with_ema)


ParallelismFactory = Callable[[DistributedContext, RunFolder, int], Parallelism]


class Replicate(Parallelism):
    """Every rank holds the whole model and optimizer state, and DDP averages the gradients (a single process trains
    the model as it is); its checkpoints are one-file ones."""

    checkpoint_format = OneFileFormat.name

    def wrap(self, model: nn.Module, ema: nn.Module | None, precision: str) -> nn.Module:
        """DDP's wrapper around `model` (which gives every rank rank 0's weights), or `model` in a single process."""
        if not self.context.enabled:
            return model
        device_ids = [self.context.local_rank] if self.context.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)

    def gradient_sync(self, network: nn.Module, last_micro_batch: bool) -> AbstractContextManager:
        """DDP's `no_sync` on all but a step's last micro-batch."""
        return network.no_sync() if self.context.enabled and not last_micro_batch else nullcontext()

    def state_to_save(self, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer) -> dict:
        """The whole model's, EMA's and optimizer's state dicts (rank 0's are written)."""
        state = {MODEL_STATE: model.state_dict(), OPTIMIZER_STATE: optimizer.state_dict()}
        if ema is not None:
            state[EMA_STATE] = ema.state_dict()
        return state

    def load_full(self, weights: dict, ema_weights: dict | None, optimizer_state: dict, model: nn.Module,
                  ema: nn.Module | None, optimizer: torch.optim.Optimizer) -> None:
        model.load_state_dict(weights)
        if ema is not None:
            ema.load_state_dict(ema_weights)
        load_optimizer_state(optimizer, optimizer_state)

    def gathered(self, module: nn.Module) -> nn.Module:
        """`module` itself: every rank holds it whole."""
        return module


class Shard(Parallelism):
    """FSDP2: each transformer block, then the root, of the model and of its EMA is sharded over the ranks, and so is
    the optimizer state; its checkpoints are sharded ones, every rank writing its shards. No rank keeps the whole
    model: rank 0 draws sample grids from gathered weights put into a parameter-free skeleton."""

    summary_words = " with FSDP"
    checkpoint_format = ShardedFormat.name

    def __init__(self, context: DistributedContext, run: RunFolder, keep: int):
        super().__init__(context, run, keep)
        self.skeleton: nn.Module | None = None  # rank 0's parameter-free model that sample grids are drawn with

    def wrap(self, model: nn.Module, ema: nn.Module | None, precision: str) -> nn.Module:
        """Give every rank rank 0's weights (DDP does so when it wraps; FSDP does not), keep rank 0's skeleton, and
        shard `model` and `ema` in place; returns `model`."""
        sharding.broadcast_from_main(model)
        modules = [model]
        if ema is not None:  # a copy of the model made before the broadcast: take rank 0's weights locally
            ema.load_state_dict(model.state_dict())
            modules.append(ema)
        if self.context.is_main:
            self.skeleton = sharding.parameter_free_copy(model)
        policy = sharding.mixed_precision(precision, self.context.device)
        for module in modules:
            sharding.shard(module, policy)
        return model

    def check_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Refuse parameters trained beside the model (REPA's projector): DCP shards the model's state only."""
        sharding.parameter_names(model, optimizer)

    def check_evaluation(self) -> None:
        raise UserError("--eval-every samples with every rank's whole model, and --fsdp shards it; evaluate the "
                        "checkpoints afterwards (scalegen sample … --num-samples, scalegen eval)")

    def gradient_sync(self, network: nn.Module, last_micro_batch: bool) -> AbstractContextManager:
        """FSDP's switch, set for this micro-batch; no context is needed."""
        network.set_requires_gradient_sync(last_micro_batch)
        return nullcontext()

    def state_to_save(self, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer) -> dict:
        """This rank's shards of the model, the EMA and the optimizer state."""
        return sharding.sharded_state(model, ema, optimizer)

    def load_full(self, weights: dict, ema_weights: dict | None, optimizer_state: dict, model: nn.Module,
                  ema: nn.Module | None, optimizer: torch.optim.Optimizer) -> None:
        """Every rank keeps its shards of the full tensors."""
        sharding.load_weights(model, weights)
        if ema is not None:
            sharding.load_weights(ema, ema_weights)
        sharding.load_optimizer_state(model, optimizer, optimizer_state)

    def gathered(self, module: nn.Module) -> nn.Module | None:
        """Every rank takes part in gathering the weights; rank 0 puts them into a copy of its skeleton."""
        weights = sharding.gathered_weights(module)
        return sharding.filled_copy(self.skeleton, weights, self.context.device) if self.context.is_main else None


def default_parallelism(fsdp: bool, context: DistributedContext) -> type[Parallelism]:
    """`Shard` for an `--fsdp` run under torchrun, `Replicate` otherwise (a single process has nothing to shard)."""
    return Shard if fsdp and context.enabled else Replicate
