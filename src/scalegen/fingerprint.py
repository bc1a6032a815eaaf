"""A fingerprint of a network's weights, to tell whether two models were trained on the same frozen tokenizer."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def weights_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 of a state dict's names, shapes and values, floating-point values rounded to fp16 first: a run's fp32
    tokenizer and its fp16 export share it; two tokenizers of the same shapes and other weights do not.

    Args:
        weights: a state dict (on any device).
    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu()
        tensor = tensor.half() if tensor.is_floating_point() else tensor
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
