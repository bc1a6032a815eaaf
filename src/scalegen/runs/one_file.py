"""The one-file checkpoint format (a `Replicate` run's): rank 0 writes the whole model as model.safetensors, its EMA
as ema.safetensors and the optimizer state inside training_state.pt (`save_checkpoint`), the other ranks wait; any
run reads it back, each rank the full tensors, which its parallelism keeps whole or shards."""
from __future__ import annotations

from pathlib import Path

import torch

from scalegen.distributed import barrier
from scalegen.files import read_weights_file
from scalegen.runs.checkpoints import CheckpointFormat, CheckpointTarget, register_format
from scalegen.runs.folder import EMA_STATE, MODEL_FILE, MODEL_STATE, OPTIMIZER_STATE, save_checkpoint, weights_file


@register_format
class OneFileFormat(CheckpointFormat):
    """safetensors weights + config.json + training_state.pt (with the optimizer's), written by rank 0."""

    name = "one-file"

    @classmethod
    def is_mine(cls, folder: Path) -> bool:
        return (folder / MODEL_FILE).exists()

    def write(self, step: int, config: dict, state: dict, training_state: dict,
              task_weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """Rank 0 writes the checkpoint (the optimizer state with the training state); the others wait."""
        if self.context.is_main:
            save_checkpoint(self.run.root, step, config, state[MODEL_STATE], state.get(EMA_STATE),
                            {**training_state, OPTIMIZER_STATE: state[OPTIMIZER_STATE]}, self.keep, task_weights)
        barrier(self.context)

    @classmethod
    def read_into(cls, folder: Path, training_state: dict, target: CheckpointTarget) -> None:
        """The EMA's weights are the model's own for a run checkpointed without EMA."""
        weights = read_weights_file(folder / MODEL_FILE)
        ema_weights = read_weights_file(weights_file(folder)) if target.has_ema else None
        target.load_full(weights, ema_weights, training_state[OPTIMIZER_STATE])
