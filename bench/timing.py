"""Shared helpers of the benchmarks: seconds per call of a step function, and peak memory."""
from __future__ import annotations

import resource
import time
from collections.abc import Callable

import torch


def seconds_per_call(step: Callable[[], None], calls: int, warmup: int, device: torch.device) -> float:
    """Average wall-clock seconds of `step` over `calls` calls, after `warmup` untimed calls (GPU synchronised)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
