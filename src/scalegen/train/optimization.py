"""The pieces of an optimizer step the trainer composes: the optimizer itself (fused AdamW, which can skip a step on
the device), the learning-rate schedule, the EMA update, and the gradient average of parameters trained outside the
DDP-wrapped model."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from scalegen.distributed import DistributedContext

# Devices whose AdamW runs fused: one kernel per step, and it takes `found_inf`, so a non-finite step is skipped on
# the device without the host reading a flag (GradScaler's mechanism). Not the CPU: torch 2.13's fused CPU kernel
# rounds differently from the foreach AdamW (a tiny DiT's weights drift 6e-4 apart in 100 steps), and fp32 CPU runs
# keep their exact numbers; a CPU has no device to wait for anyway.
FUSED_DEVICES = ("cuda",)
IMPLEMENTATION_KEYS = ("fused", "foreach")  # the optimizer settings a checkpoint must not override


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


def build_optimizer(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.AdamW:
    """AdamW over the parameter groups (each with its own weight decay): fused where the device has the kernel."""
    fused = device.type in FUSED_DEVICES
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=0.0, fused=fused or None)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `step_unless` can skip a step without the host knowing (the fused kernel takes `found_inf`)."""
    return all(group.get("fused") for group in optimizer.param_groups)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """One fused optimizer step that leaves parameters, moments and step counts untouched where `skip` (a 0-dim
    bool tensor on the device) is true; no host sync."""
    optimizer.found_inf = skip.to(torch.float32)  # read by fused Adam(W), as GradScaler passes it
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict`, keeping this optimizer's implementation (a checkpoint of a foreach AdamW would
    otherwise turn a fused one back into foreach, and leave its step counts on the wrong device)."""
    groups = [{**saved, **{key: group[key] for key in IMPLEMENTATION_KEYS}}
              for saved, group in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP (DTensor) parameter, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# EMA warm-up (TensorFlow's ExponentialMovingAverage with num_updates): the decay of update n (0-based) is
# min(decay, (1 + n) / (WARMUP_OFFSET + n)), so a run from scratch samples weights that moved rather than the start.
EMA_WARMUP_OFFSET = 10


def ema_decay_at(decay: float, step: int | None) -> float:
    """The EMA decay of update `step` (the optimizer steps before it): min(decay, (1 + step) / (10 + step)) with the
    warm-up, `decay` itself for `step` None (a constant decay, as the official DiT's training)."""
    if step is None:
        return decay
    return min(decay, (1 + step) / (EMA_WARMUP_OFFSET + step))


def ema_start_share(decay: float, steps: int, warmup: bool) -> float:
    """The weight the EMA still gives its starting point after `steps` updates: the product of their decays (every
    step counted as applied). Warm-up decays telescope: prod_{n<m} (1 + n) / (10 + n) = m! 9! / (m + 9)!."""
    if not warmup:
        return decay ** steps
    ramp_end = math.ceil((EMA_WARMUP_OFFSET * decay - 1) / (1 - decay))  # the first update at the full decay
    ramp = max(min(steps, ramp_end), 0)
    offset = EMA_WARMUP_OFFSET - 1
    ramp_share = math.exp(math.lgamma(ramp + 1) + math.lgamma(offset + 1) - math.lgamma(ramp + offset + 1))
    return ramp_share * decay ** (steps - ramp)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, applied: torch.Tensor | None = None,
               step: int | None = None) -> None:
    """ema = d * ema + (1 - d) * model over every parameter (frozen ones too, as the official code), with
    d = `ema_decay_at(decay, step)`.

    Args:
        applied: a 0-dim bool tensor on the device; where false (a skipped step) the EMA is left as it was, without
            a host sync. FSDP parameters are updated shard by shard (the EMA is sharded like the model).
        step: the optimizer steps before this update, for the warm-up; None: the constant `decay` (official DiT).
    """
    decay = ema_decay_at(decay, step)
    ema_parameters = [local(parameter) for parameter in ema.parameters()]
    model_parameters = [local(parameter).detach() for parameter in model.parameters()]
    if applied is None:
        torch._foreach_lerp_(ema_parameters, model_parameters, 1.0 - decay)
        return
    # (): 0 on a skipped step, so the lerp keeps the EMA; one per dtype (lerp's weight has its tensor's dtype)
    weights = {dtype: applied.to(dtype) * (1.0 - decay) for dtype in {parameter.dtype for parameter in ema_parameters}}
    torch._foreach_lerp_(ema_parameters, model_parameters, [weights[parameter.dtype] for parameter in ema_parameters])


def average_gradients(parameters: Iterable[nn.Parameter], context: DistributedContext) -> None:
    """Average the gradients of parameters outside the DDP-wrapped model over the ranks (every rank calls this).

    Every rank takes part in the same collectives whatever gradients it holds (one all-reduce of all the gradients
    flattened, per dtype and device): a parameter without a gradient on this rank counts as zeros, so a rank whose
    batch skipped it cannot leave the others waiting; after the call every parameter has a gradient.
    """
    if not context.enabled:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for parameter in parameters:
        groups.setdefault((parameter.dtype, parameter.device), []).append(parameter)
    for members in groups.values():
        flat = torch.cat([(parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)).flatten()
                          for parameter in members])  # (P,)
        torch.distributed.all_reduce(flat)
        flat /= context.world_size
        for parameter, gradient in zip(members, flat.split([parameter.numel() for parameter in members])):
            parameter.grad = gradient.view_as(parameter)
