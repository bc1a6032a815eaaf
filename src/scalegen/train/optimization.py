"""The pieces of an optimizer step the trainer composes: the learning-rate schedule, the EMA update, and the
gradient average of parameters trained outside the DDP-wrapped model."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from scalegen.distributed import DistributedContext


class Schedule(Protocol):
    """The loop settings the schedule reads (a `TrainConfig`)."""

    steps: int
    warmup_steps: int
    lr_decay_to: float


def learning_rate_factor(step: int, config: Schedule) -> float:
    """Linear warm-up from 0 to 1, then linear decay to `lr_decay_to` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    remaining = max(config.steps - config.warmup_steps, 1)
    progress = (step - config.warmup_steps) / remaining
    return 1.0 + (config.lr_decay_to - 1.0) * progress


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model over every parameter (frozen ones too, as the official code)."""
    ema_parameters = list(ema.parameters())
    model_parameters = [parameter.detach() for parameter in model.parameters()]
    torch._foreach_lerp_(ema_parameters, model_parameters, 1.0 - decay)


def average_gradients(parameters: list[nn.Parameter], context: DistributedContext) -> None:
    """Average the gradients of parameters outside the DDP-wrapped model over the ranks (every rank calls this)."""
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)  # a rank whose batch skipped them still takes part
        torch.distributed.all_reduce(parameter.grad)
        parameter.grad /= context.world_size
