"""The task base: what the one trainer needs to know about a model (its loss, config, sample grid and recipe).

A task owns the model, any frozen or auxiliary network beside it (a tokenizer, a VAE, a discriminator), its loss
and its sample grid; the trainer owns the loop and everything that must survive a crash. Each kind of model states
its training recipe (`Recipe`) once: the loop settings a `TrainConfig` leaves at None take these values, from the
command line and from Python alike.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from scalegen.files import json_config
from scalegen.data.batch import Batch
from scalegen.distributed import DistributedContext
from scalegen.train.settings import Recipe

GRID_PER_CLASS = 8  # the periodic training grid: 8 samples of each of the first 10 classes
GRID_MAX_CLASSES = 10


def scale_names(patch_nums: tuple[int, ...]) -> list[str]:
    """Column suffix of each scale in the log, e.g. "4x4"."""
    return [f"{side}x{side}" for side in patch_nums]


def parameter_count(model: nn.Module) -> int:
    """Number of parameters of a model (frozen ones included, as papers count them)."""
    return sum(parameter.numel() for parameter in model.parameters())


class TrainingTask:
    """A model to train: subclasses set `kind` and `recipe`, build `model`, and implement `loss` and `write_samples`.

    Args:
        model: the network the optimizer trains (its `config` dataclass goes into every checkpoint).
        extra_config: more JSON-able facts stored with the config (data set, image size, …).
    """

    kind: ClassVar[str]
    recipe: ClassVar[Recipe] = Recipe()
    recipe_notes: ClassVar[dict[str, str]] = {}  # recipe settings that `training_defaults` computes, in words

    def __init__(self, model: nn.Module, extra_config: dict | None = None):
        self.model = model
        self.extra_config = extra_config or {}
        self.device = torch.device("cpu")

    def helpers(self) -> list[nn.Module]:
        """Networks beside the model that must live on its device (frozen codecs, LPIPS, a discriminator)."""
        return []

    def to(self, device: torch.device) -> None:
        """Move the model and its helpers to `device`."""
        self.device = device
        self.model.to(device)
        for helper in self.helpers():
            helper.to(device)

    def config(self) -> dict:
        """JSON-able description stored with every checkpoint: enough to rebuild the model, and its size."""
        return {"kind": self.kind, "model": json_config(self.model.config), "params": parameter_count(self.model),
                **self.extra_config}

    def training_defaults(self, steps: int, batch_size: int) -> Recipe:
        """The recipe for a run of `steps` optimizer steps at `batch_size` (a recipe may scale with either)."""
        return self.recipe

    def prepare(self, lr: float) -> None:
        """Called once the run's settings are known, before training or resuming (e.g. a second optimizer's lr)."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss of one micro-batch and extra figures to log.

        The figures are detached 0-dim tensors, left on the device: the trainer accumulates them there and reads them
        on the host at log steps only (an `.item()` here would make every micro-step wait for the device).
        """
        raise NotImplementedError

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups: every trainable parameter, decayed."""
        trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        return [{"params": trainable, "weight_decay": weight_decay}]

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        """The task's own optimizers over parameters the loss reaches beside the model's optimizer (REPA-E's
        tokenizer): the trainer's step guard averages, unscales, checks, applies or skips, and zeroes them with the
        model's, so a non-finite step touches none of them. Called after `prepare`."""
        return []

    def write_samples(self, model: nn.Module, path: Path) -> None:
        """Write a sample grid drawn from `model` (the EMA weights when the run keeps them) to `path`."""
        raise NotImplementedError

    def generate(self, model: nn.Module, labels: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Samples of the classes `labels` (B,) with the run's sampling settings, (B, C, H, W) in [0, 1], drawn from the
        global RNG or from `seed` (tasks of generators: DiT, VAR; `--eval-every` scores them)."""
        raise NotImplementedError

    @property
    def generates(self) -> bool:
        """Whether this task's model draws class-conditional samples (`generate`)."""
        return type(self).generate is not TrainingTask.generate

    @property
    def acts_after_step(self) -> bool:
        """Whether `after_step` does anything (then the host must know each step's outcome, a wait for the device)."""
        return type(self).after_step is not TrainingTask.after_step

    def after_step(self, step: int, context: DistributedContext) -> dict[str, float]:
        """Runs on every rank after each applied optimizer step (a discriminator's own step on its own loss, codebook
        statistics); returns figures. An optimizer over the step's loss belongs in `extra_optimizers` instead."""
        return {}

    def extra_state(self) -> dict:
        """Task state beyond the model, saved in training_state.pt (tensors and plain containers only)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` saved."""

    def checkpoint_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """More weight files to write into each checkpoint folder, by file name (a network trained beside the
        model that loaders read from there: the tokenizer of an end-to-end run)."""
        return {}
