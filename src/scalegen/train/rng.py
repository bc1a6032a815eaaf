"""Every random generator a training loop touches, saved and restored for exact resume."""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """Every random generator the loop touches, for exact resume."""
    # Plain tensors and int lists only, so the state loads with torch.load(weights_only=True).
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_position": int(numpy_state[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_position"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
