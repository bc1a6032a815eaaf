"""The numeric precision a process computes in on its device: what "auto" means there, and the autocast context of
a precision. Here rather than in `scalegen.precision` (the names, which the command line's parsers list without
loading torch) and rather than in `scalegen.distributed` (process groups, which the models must not import).

Precision: "fp32" (the official numbers, bit for bit), "bf16" or "fp16" autocast, or "auto": bf16 where the hardware
multiplies bf16 matrices faster than fp32 — a CUDA GPU with bf16 support, or a CPU with AMX or AVX512-BF16 matrix
instructions (detected, never assumed) — and fp32 everywhere else.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from pathlib import Path

import torch

from scalegen.errors import UserError
from scalegen.precision import PRECISIONS, Precision

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BF16_MATRIX_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU features that make bf16 matrix products fast
CPU_INFO = Path("/proc/cpuinfo")


@lru_cache(maxsize=1)
def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU has AMX-BF16 or AVX512-BF16 instructions (torch's capability report, else /proc/cpuinfo)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        return any(bool(found.get(flag)) for flag in BF16_MATRIX_FLAGS)
    if CPU_INFO.exists():
        flags = set(CPU_INFO.read_text().split())
        return any(flag in flags for flag in BF16_MATRIX_FLAGS)
    return False


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """The concrete precision ("fp32", "bf16" or "fp16") that `precision` means on `device`.

    Args:
        precision: one of `scalegen.precision.PRECISIONS`.
        device: where the computation runs.
    Returns:
        "fp32", "bf16" or "fp16".
    Raises:
        UserError: an unknown precision name.
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16_matrix_units() else "fp32"
    return "fp32"


def autocast(precision: Precision, device: torch.device) -> AbstractContextManager:
    """The autocast context of `precision` on `device` (no context at all for fp32: the exact path)."""
    resolved = resolve_precision(precision, device)
    if resolved in AUTOCAST_DTYPES:
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[resolved])
    return nullcontext()
