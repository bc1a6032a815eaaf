"""Test-wide settings and fixtures: one intra-op thread, since the suite's tensors are tiny and CI has 2 cores."""
import pytest
import torch
import torch.distributed as dist

torch.set_num_threads(1)


@pytest.fixture
def one_rank_group():
    """A gloo process group of this process alone, which a sharded run (FSDP's `Shard`, the sharded checkpoint format's
    writer) needs."""
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
