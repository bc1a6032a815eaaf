"""Adversarial pieces of tokenizer training (VQGAN recipe): a patch-GAN discriminator, hinge losses and the
adaptive weight that balances the GAN gradient against the reconstruction gradient at the decoder's last layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.2
KERNEL_SIZE = 4
MAX_WIDTH_MULTIPLIER = 8
# λ = ‖∇L_rec‖ / (‖∇L_gan‖ + ε), clamped so an almost-zero GAN gradient cannot blow the weight up (taming's values).
ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4
DISCRIMINATOR_INIT_STD = 0.02
DISCRIMINATOR_NORM_GROUPS = 8


def norm_layer(channels: int) -> nn.GroupNorm:
    # GroupNorm rather than the original BatchNorm: no running statistics, so nothing differs between data-parallel
    # ranks or between train and eval mode.
    return nn.GroupNorm(min(DISCRIMINATOR_NORM_GROUPS, channels), channels)


def smallest_image_size(layers: int) -> int:
    """The smallest image side a discriminator with `layers` layers accepts: `layers` halvings, then two 4x4
    convolutions that each trim one pixel, must leave at least one patch logit."""
    return 3 * 2**layers


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN `NLayerDiscriminator`): one real/fake logit per overlapping image patch.

    Args:
        in_channels: image channels.
        width: channels of the first layer; doubled per layer up to 8×.
        layers: conv layers after the first; all but the last halve the patch map.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        modules: list[nn.Module] = [
            nn.Conv2d(in_channels, width, KERNEL_SIZE, stride=2, padding=1), nn.LeakyReLU(LEAKY_SLOPE)
        ]
        channels = width
        for index in range(1, layers + 1):
            stride = 2 if index < layers else 1  # the last layer widens without downsampling, as the original
            out_channels = width * min(2**index, MAX_WIDTH_MULTIPLIER)
            modules += [
                nn.Conv2d(channels, out_channels, KERNEL_SIZE, stride=stride, padding=1, bias=False),
                norm_layer(out_channels),
                nn.LeakyReLU(LEAKY_SLOPE),
            ]
            channels = out_channels
        modules.append(nn.Conv2d(channels, 1, KERNEL_SIZE, stride=1, padding=1))
        self.layers = nn.Sequential(*modules)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=DISCRIMINATOR_INIT_STD)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] → patch logits (B, 1, h, w)."""
        return self.layers(images)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """½·(E[relu(1 − D(real))] + E[relu(1 + D(fake))])."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """−E[D(fake)]: the generator raises the discriminator's score of its reconstructions."""
    return -fake_logits.mean()


def adaptive_weight(reconstruction_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's λ = ‖∇_w L_rec‖ / (‖∇_w L_gan‖ + 1e-4) at the decoder's last weight w, clamped to [0, 1e4].

    Args:
        reconstruction_loss: scalar reconstruction (+ perceptual) loss.
        gan_loss: scalar generator GAN loss.
        last_layer: the decoder's output conv weight, part of both graphs.

    Returns:
        Detached scalar λ (the graphs are kept for the real backward pass).
    """
    reconstruction_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = reconstruction_grad.norm() / (gan_grad.norm() + ADAPTIVE_WEIGHT_EPS)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()
