"""Where a process computes: process-group set-up for torchrun (DDP) that also works as a single plain process (the
precision it computes in is `scalegen.mixed_precision`'s)."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from scalegen.errors import UserError

AGENT_STORE_VARIABLE = "TORCHELASTIC_USE_AGENT_STORE"  # torchrun's workers share its agent's store
GROUP_STORE_KEY = "scalegen/group_store"  # where rank 0 publishes its attempt's store, in the agent's store
STORE_ANSWER_TIMEOUT = timedelta(seconds=2)  # a published store that does not answer is a previous attempt's


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
            store = attempt_store(rank, world_size) if os.environ.get(AGENT_STORE_VARIABLE) == str(True) else None
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=store, rank=rank,
                                    world_size=world_size)
        except (RuntimeError, ValueError) as error:  # torch's DistNetworkError and DistStoreError are RuntimeErrors
            address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise UserError(f"cannot join the torchrun group at {address} ({str(error).splitlines()[0][:160]}); the port "
                            "may be in use: pick another --master-port, or use --standalone") from None
    return DistributedContext(rank, world_size, local_rank, torch_device)


def attempt_store(rank: int, world_size: int) -> dist.Store:
    """A store of this attempt's own for the process group of a torchrun worker.

    torchrun's agent keeps one store for all attempts of a run, and the workers of a restarted attempt would read the
    keys of the previous one (dead peers' addresses: "Connection refused"), since the attempt number that should keep
    them apart is counted by each node on its own (pytorch issue 135712). So rank 0 starts a new store and publishes
    its address in the agent's store; the others re-read that address while it points at a store that is gone.
    """
    address = os.environ["MASTER_ADDR"]
    agent_store = dist.TCPStore(address, int(os.environ["MASTER_PORT"]), world_size, timeout=default_pg_timeout)
    if rank == 0:
        store = dist.TCPStore(address, 0, world_size, is_master=True, timeout=default_pg_timeout,
                              wait_for_workers=False)
        agent_store.set(GROUP_STORE_KEY, f"{address}:{store.port}")
        return store
    deadline = time.monotonic() + default_pg_timeout.total_seconds()
    while True:
        published_address, published_port = agent_store.get(GROUP_STORE_KEY).decode().rsplit(":", 1)
        try:
            store = dist.TCPStore(published_address, int(published_port), world_size, timeout=STORE_ANSWER_TIMEOUT)
        except RuntimeError:  # torch's DistNetworkError: the previous attempt's rank 0 is gone
            if time.monotonic() > deadline:
                raise
            continue
        store.set_timeout(default_pg_timeout)
        return store


def launched_as_main() -> bool:
    """Whether this process is rank 0 of its torchrun launch (or a plain single process), group or not."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (no-op for a single process)."""
    if context.enabled:
        dist.barrier()


def gather_tensors(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Concatenate equally-shaped tensors from all ranks along dim 0 (rank order)."""
    if not context.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(context.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


@contextmanager
def process_group(device: str | None = None) -> Iterator[DistributedContext]:
    """This process's place among the torchrun ranks (`setup_distributed`) for the body, leaving the group after it:
    with the other ranks when the body ends, at once when it fails (its peers may be dead or elsewhere: waiting for
    them would hang, or add a second traceback over the first)."""
    context = setup_distributed(device)
    try:
        yield context
    except BaseException:
        cleanup(context, wait=False)
        raise
    cleanup(context)


def cleanup(context: DistributedContext, wait: bool = True) -> None:
    """Leave the process group, once every rank is done with it (a rank tearing down early can abort a slower one).

    Args:
        wait: False for a rank stopping on an error: its peers may be dead (a killed worker) or elsewhere in the
            program, and a barrier would then hang, or fail with a second traceback over the first.
    """
    if context.enabled and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()

