"""One optimizer step without waiting for the device: figures kept as 0-dim tensors until a log step reads them all
at once, and a non-finite step skipped on the device (fused AdamW's `found_inf`, a masked EMA update)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from scalegen.distributed import DistributedContext
from scalegen.train.optimization import average_gradients, full_tensor, skips_on_device, step_unless, update_ema


def compile_regions(model: nn.Module) -> None:
    """`torch.compile` each transformer block in place (the whole model where it has no `blocks`): blocks repeat,
    so one compilation serves them all, and the state-dict keys stay those of the plain model."""
    blocks = getattr(model, "blocks", None)
    for module in blocks if isinstance(blocks, nn.ModuleList) else [model]:
        module.compile()


def device_figure(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A figure to log as a 0-dim float64 tensor on the device (a tensor stays where it is; a float is copied)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64)
    return torch.tensor(value, dtype=torch.float64, device=device)


def mean_figures(step_figures: dict[str, torch.Tensor | float], context: DistributedContext) -> dict[str, float]:
    """A step's figures as floats, averaged over the ranks: one all-reduce and one host read for them all."""
    values = torch.stack([device_figure(value, context.device) for value in step_figures.values()])  # (F,)
    if not context.enabled:
        return dict(zip(step_figures, values.tolist()))
    dist.all_reduce(values)
    return {name: value / context.world_size for name, value in zip(step_figures, values.tolist())}


class GradientStep:
    """Clips, checks and applies a step's gradients (optimizer, fp16 scaler, EMA).

    Args:
        model: the trained model (sharded under FSDP); ema: its EMA copy or None.
        optimizer: over the model's parameters and any trained beside it (REPA's projector).
        precision: the resolved precision ("fp16" brings the gradient scaler).
        grad_clip, ema_decay: the run's settings (0: no clipping).
    """

    def __init__(self, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer, precision: str,
                 grad_clip: float, ema_decay: float, context: DistributedContext):
        self.model, self.ema, self.optimizer, self.precision = model, ema, optimizer, precision
        self.grad_clip, self.ema_decay, self.context = grad_clip, ema_decay, context
        self.scaler = torch.amp.GradScaler(enabled=precision == "fp16")
        # Skipping a non-finite step on the device needs the fused kernel; fp16's scaler decides on the host.
        self.skip_on_device = precision != "fp16" and skips_on_device(optimizer)
        # Trained beside the model (REPA's projector): DDP does not see them, so their gradients are averaged here.
        model_parameters = {id(parameter) for parameter in model.parameters()}
        self.outside_parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]
                                   if id(parameter) not in model_parameters]

    def __call__(self, step_figures: dict[str, torch.Tensor], logging: bool) -> torch.Tensor:
        """Apply the gradients, adding the gradient norm to the figures of a logged step (`step_figures["loss"]`: the
        step's loss on the device).

        Returns:
            Whether the step was applied, a 0-dim bool tensor on the device: False when the loss or the gradients
            were not finite on any rank, and then nothing was updated. The host reads nothing here unless the skip is
            decided on the host (fp16's scaler, an optimizer without the fused kernel).
        """
        context, optimizer = self.context, self.optimizer
        applied = torch.isfinite(step_figures["loss"])  # ()
        if context.enabled:
            average_gradients(self.outside_parameters, context)
        if self.grad_clip > 0 or self.precision != "fp16":
            self.scaler.unscale_(optimizer)
            parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]
                          if parameter.grad is not None]
            if self.grad_clip > 0:
                norm = nn.utils.clip_grad_norm_(parameters, self.grad_clip)  # ()
            else:  # the same norm, without multiplying every gradient by 1
                norm = nn.utils.get_total_norm([parameter.grad for parameter in parameters])  # ()
            norm = full_tensor(norm).detach()  # () (FSDP's is a DTensor)
            if logging:
                step_figures["grad_norm"] = norm.to(torch.float64)
            # fp16's scaler skips steps with overflowing gradients itself and lowers its scale; they are no failure.
            if self.precision != "fp16":
                applied = applied & torch.isfinite(norm)  # ()
        if context.enabled:  # every rank skips together (a loss can be non-finite on one rank only)
            agreed = applied.to(torch.float32)  # ()
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            applied = agreed.bool()  # ()
        if self.skip_on_device:
            step_unless(optimizer, ~applied)
            if self.ema is not None:
                update_ema(self.ema, self.model, self.ema_decay, applied)
        elif bool(applied):  # a host sync
            self.scaler.step(optimizer)
            self.scaler.update()
            if self.ema is not None:
                update_ema(self.ema, self.model, self.ema_decay)
        optimizer.zero_grad(set_to_none=True)
        return applied
