"""A seeded random initialisation of the FID Inception, shared by the tests and the golden-making script.

Random weights in the official layout stand in for the real file (which cannot be downloaded here). He-scaled
convolutions and near-identity batch norms keep activations of order one through all 94 layers, so the features
and the comparison against torch-fidelity are meaningful.
"""
import math

import torch
from torch import nn

from scalegen.eval.inception import FIDInception, FrozenBatchNorm

NORM_SPREAD = 0.1  # relative spread of the random batch-norm scales, shifts and running statistics


@torch.no_grad()
def seeded_inception(seed: int = 0) -> FIDInception:
    """FIDInception with reproducible random weights.

    Args:
        seed: seed of the CPU generator that draws every tensor, in module order.
    Returns:
        The network in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    model = FIDInception()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.copy_(normal(module.weight.shape, math.sqrt(2.0 / fan_in)))
        elif isinstance(module, FrozenBatchNorm):
            channels = module.weight.shape
            module.weight.copy_(1.0 + normal(channels, NORM_SPREAD))
            module.bias.copy_(normal(channels, NORM_SPREAD))
            module.running_mean.copy_(normal(channels, NORM_SPREAD))
            module.running_var.copy_(1.0 + torch.rand(channels, generator=generator) * NORM_SPREAD)
    model.fc.weight.copy_(normal(model.fc.weight.shape, 1.0 / math.sqrt(model.fc.in_features)))
    model.fc.bias.copy_(normal(model.fc.bias.shape, 1.0))
    return model


def weight_checksum(model: nn.Module) -> float:
    """Sum of |w| over the state dict: tells whether two torch versions drew the same random weights."""
    return float(sum(value.double().abs().sum() for value in model.state_dict().values()))
