"""Process-group set-up for torchrun (DDP) that also works as a single plain process."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scalegen.errors import UserError


@dataclass
class DistributedContext:
    """Where this process sits: its rank, the world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> DistributedContext:
    """Join the torchrun process group if launched by torchrun (NCCL on GPU, gloo on CPU); else a single process.

    Args:
        device: "cpu", "cuda" or None (cuda when available).
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if device is not None and not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device {device!r} is not a device scalegen runs on; use cpu or cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f"--device {device} asks for a GPU, but this PyTorch build sees none; use --device cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        except (RuntimeError, ValueError) as error:  # torch's DistNetworkError and DistStoreError are RuntimeErrors
            address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise UserError(f"cannot join the torchrun group at {address} ({str(error).splitlines()[0][:160]}); the port "
                            "may be in use: pick another --master-port, or use --standalone") from None
    return DistributedContext(rank, world_size, local_rank, torch_device)


def launched_as_main() -> bool:
    """Whether this process is rank 0 of its torchrun launch (or a plain single process), group or not."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (no-op for a single process)."""
    if context.enabled:
        dist.barrier()


def mean_over_ranks(value: float, context: DistributedContext) -> float:
    """The average of a scalar over all ranks."""
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return tensor.item() / context.world_size


def gather_tensors(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Concatenate equally-shaped tensors from all ranks along dim 0 (rank order)."""
    if not context.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(context.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def cleanup(context: DistributedContext) -> None:
    """Leave the process group, once every rank is done with it (a rank tearing down early can abort a slower one)."""
    if context.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
