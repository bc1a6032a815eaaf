"""Benchmark: how far small perturbations of real images move FID in the shipped Fashion-MNIST classifier's features.

    python bench/fid_sensitivity.py [--count 10000]

Takes `count` real training images, perturbs them (Gaussian pixel noise; a mix with their 3×3 binomial blur) and
prints the FID of each version against the real test set, with the classifier accuracy. It puts the issue's FID bar
(within 3× of real-train-vs-real-test) in units of image damage. Not a test: it prints figures.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from scalegen.data.fashion_mnist import load_fashion_mnist
from scalegen.eval.fmnist import fmnist_report

NOISE_LEVELS = (2, 5, 10)  # standard deviation in 0..255 pixel units
BLUR_MIXES = (0.1, 0.25, 0.5)  # weight of the blurred image in the mix
BINOMIAL = torch.tensor([1.0, 2.0, 1.0]) / 4


def blurred(images: torch.Tensor) -> torch.Tensor:
    """3×3 binomial blur of (N, H, W) float images, zero padded."""
    kernel = torch.outer(BINOMIAL, BINOMIAL).view(1, 1, 3, 3)  # (1, 1, 3, 3)
    return F.conv2d(images.unsqueeze(1), kernel, padding=1).squeeze(1)  # (N, H, W)


def report(name: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Print FID and accuracy of (N, H, W) float images in 0..255."""
    scores = fmnist_report(images.round().clamp(0, 255).to(torch.uint8).numpy(), labels.numpy())
    print(f"{name:<24} FID {scores['fid']:7.3f}   accuracy {scores['accuracy']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    args = parser.parse_args()
    images, labels = load_fashion_mnist(args.data, "train")
    images, labels = images[: args.count].float(), labels[: args.count]  # (N, 28, 28), (N,)
    generator = torch.Generator().manual_seed(0)
    report("real training images", images, labels)
    for level in NOISE_LEVELS:
        report(f"+ noise σ={level}/255", images + level * torch.randn(images.shape, generator=generator), labels)
    smooth = blurred(images)
    for mix in BLUR_MIXES:
        report(f"{mix:.0%} 3×3 blur", (1 - mix) * images + mix * smooth, labels)


if __name__ == "__main__":
    main()
