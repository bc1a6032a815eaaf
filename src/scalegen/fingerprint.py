"""Digests of a network's weights, all by one loop (`state_digest`): a fingerprint to tell whether two models were
trained on the same frozen tokenizer (`weights_fingerprint`; `module_fingerprint` remembers a module's), and the
record a cache keeps of the encoder that made it (`scalegen.data.store.weights_digest`)."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from weakref import WeakKeyDictionary

import torch
from torch import nn

# What each state-dict entry's bytes follow in the fingerprint (the digest written before this loop was shared).
FINGERPRINT_HEADER = "{name}:{shape}:{dtype};"
# Each module's fingerprint, with the (name, storage, version) of every tensor it was computed from.
KNOWN_FINGERPRINTS: WeakKeyDictionary[nn.Module, tuple[tuple, str]] = WeakKeyDictionary()


def state_digest(weights: Mapping[str, torch.Tensor], header: str, rounded: bool = False) -> str:
    """A SHA-256 of a state dict: for each entry in name order, its header and its values' bytes.

    Args:
        weights: a state dict (on any device).
        header: each entry's header, formatted with its `name`, `shape` (a tuple) and `dtype` (after rounding).
        rounded: round floating-point values to fp16 first.
    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu()
        if rounded and tensor.is_floating_point():
            tensor = tensor.half()
        digest.update(header.format(name=name, shape=tuple(tensor.shape), dtype=tensor.dtype).encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 of a state dict's names, shapes and values, floating-point values rounded to fp16 first: a run's fp32
    tokenizer and its fp16 export share it; two tokenizers of the same shapes and other weights do not.

    Args:
        weights: a state dict (on any device).
    Returns:
        The hex digest.
    """
    return state_digest(weights, FINGERPRINT_HEADER, rounded=True)


def module_fingerprint(module: nn.Module) -> str:
    """`weights_fingerprint` of a module's state dict, computed again only when a tensor of it was replaced or
    written in place since (its version counter moved; a write through `.data` does not move it, and frozen weights
    see none), so that a generation checking its refiner's tokenizer on every call hashes it once."""
    weights = module.state_dict()
    versions = tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in weights.items())
    known = KNOWN_FINGERPRINTS.get(module)
    if known is None or known[0] != versions:
        known = (versions, weights_fingerprint(weights))
        KNOWN_FINGERPRINTS[module] = known
    return known[1]
