"""One optimizer step without waiting for the device: figures kept as 0-dim tensors until a log step reads them all
at once, and a non-finite step skipped on the device (fused AdamW's `found_inf`, a masked EMA update). Every
optimizer of a run (the model's, a task's own: REPA-E's tokenizer) goes through the one guard, `GradientStep`."""
from __future__ import annotations

from collections.abc import Sequence

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
    """The one step guard of a run: averages, unscales, clips and checks the gradients of every optimizer of the run,
    then applies them all or none (the optimizers, the EMA), and zeroes them.

    Args:
        model: the trained model (sharded under FSDP); ema: its EMA copy or None.
        optimizer: over the model's parameters and any trained beside it (REPA's projector).
        precision: the resolved precision ("fp16" brings the gradient scaler).
        grad_clip, ema_decay: the run's settings (0: no clipping); each optimizer's gradients are clipped by their
            own norm (REPA-E clips the tokenizer's apart from the DiT's).
        ema_warmup: the EMA decay warms up with the step (`optimization.ema_decay_at`); False: constant, as the
            official DiT's.
        extra_optimizers: the task's other optimizers over the same loss (REPA-E's tokenizer), stepped or skipped
            together with `optimizer`.
    """

    def __init__(self, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer, precision: str,
                 grad_clip: float, ema_decay: float, context: DistributedContext, ema_warmup: bool = True,
                 extra_optimizers: Sequence[torch.optim.Optimizer] = ()):
        self.model, self.ema, self.optimizer, self.precision = model, ema, optimizer, precision
        self.grad_clip, self.ema_decay, self.ema_warmup, self.context = grad_clip, ema_decay, ema_warmup, context
        self.optimizers = [optimizer, *extra_optimizers]
        self.scaler = torch.amp.GradScaler(context.device.type, enabled=precision == "fp16")
        # Skipping a non-finite step on the device needs the fused kernel; fp16's scaler decides on the host.
        self.skip_on_device = precision != "fp16" and all(skips_on_device(each) for each in self.optimizers)
        # Trained beside the model (REPA's projector, REPA-E's tokenizer): DDP does not see them, so their gradients
        # are averaged here.
        model_parameters = {id(parameter) for parameter in model.parameters()}
        self.outside_parameters = [parameter for each in self.optimizers for group in each.param_groups
                                   for parameter in group["params"] if id(parameter) not in model_parameters]

    def __call__(self, step_figures: dict[str, torch.Tensor], logging: bool, step: int) -> torch.Tensor:
        """Apply the gradients of optimizer step `step` (the steps before it), adding the gradient norm to the figures
        of a logged step (`step_figures["loss"]`: the step's loss on the device).

        Returns:
            Whether the step was applied, a 0-dim bool tensor on the device: False when the loss or the gradients of
            any optimizer were not finite on any rank (fp16's overflow steps too: the scaler lowers its scale), and
            then nothing was updated. Either way every gradient is zeroed. The host reads nothing here unless the skip
            is decided on the host (fp16's scaler, an optimizer without the fused kernel).
        """
        context = self.context
        applied = torch.isfinite(step_figures["loss"])  # ()
        average_gradients(self.outside_parameters, context)  # nothing in a single process
        for index, optimizer in enumerate(self.optimizers):
            self.scaler.unscale_(optimizer)  # nothing without fp16
            parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]
                          if parameter.grad is not None]
            if self.grad_clip > 0:
                norm = nn.utils.clip_grad_norm_(parameters, self.grad_clip)  # ()
            else:  # the same norm, without multiplying every gradient by 1
                norm = nn.utils.get_total_norm([parameter.grad for parameter in parameters])  # ()
            norm = full_tensor(norm).detach()  # () (FSDP's is a DTensor)
            if logging and index == 0:
                step_figures["grad_norm"] = norm.to(torch.float64)
            applied = applied & torch.isfinite(norm)  # ()
        if context.enabled:  # every rank skips together (a loss can be non-finite on one rank only)
            agreed = applied.to(torch.float32)  # ()
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            applied = agreed.bool()  # ()
        ema_step = step if self.ema_warmup else None
        if self.skip_on_device:
            for optimizer in self.optimizers:
                step_unless(optimizer, ~applied)
            if self.ema is not None:
                update_ema(self.ema, self.model, self.ema_decay, applied, ema_step)
        elif bool(applied):  # a host sync
            for optimizer in self.optimizers:
                self.scaler.step(optimizer)
            if self.ema is not None:
                update_ema(self.ema, self.model, self.ema_decay, step=ema_step)
        self.scaler.update()  # fp16: an overflow (a skipped step) lowers the scale; nothing without fp16
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        return applied
