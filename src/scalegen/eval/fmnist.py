"""A small Fashion-MNIST classifier: the domain feature network behind `scalegen eval --features fmnist`.

Inception features say little about 32×32 grayscale clothes, so the embedded default is judged by a CNN trained by
train/classifier_task.py (`scalegen train classifier`) and shipped in `assets/`: FID in its penultimate features
against the real test set (statistics stored beside the weights) and the accuracy of class-conditional samples —
does the model draw the class it was asked for.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scalegen.data.fashion_mnist import FASHION_MNIST_PADDED_SIZE, pad_fashion_mnist
from scalegen.files import read_json, read_weights_file
from scalegen.classes import FASHION_MNIST_CLASSES, class_names
from scalegen.errors import UserError
from scalegen.eval import metrics
from scalegen.eval.settings import ClassifierConfig
from scalegen.pixels import to_model_range
from scalegen.runs.names import ASSETS

SHIPPED_WEIGHTS = ASSETS / "fmnist_classifier.safetensors"
REFERENCE_MEAN, REFERENCE_COVARIANCE = "reference.mu", "reference.sigma"  # test-set statistics in the weights file
FASHION_MNIST_SIZE = 28  # raw images; zero-padded to FASHION_MNIST_PADDED_SIZE as data/fashion_mnist.py does
GROUP_NORM_GROUPS = 8
STAGES = 3  # each halves the resolution
FINAL_RESOLUTION = FASHION_MNIST_PADDED_SIZE // 2**STAGES
BATCH_SIZE = 500  # images per forward pass when classifying


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3×3 conv, GroupNorm (per-image, so features never depend on the batch), ReLU, 2× max-pool."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.GroupNorm(GROUP_NORM_GROUPS, out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FashionClassifier(nn.Module):
    """Three conv stages (32 → 16 → 8 → 4 px), flattened (where a garment sits matters), a ReLU feature layer, a head."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.stages = nn.Sequential(conv_block(1, width), conv_block(width, 2 * width), conv_block(2 * width, 2 * width))
        self.projection = nn.Linear(2 * width * FINAL_RESOLUTION**2, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images (B, 1, 32, 32) in [-1, 1] -> (B, feature_dim)."""
        hidden = self.stages(images)  # (B, 2w, 4, 4)
        return F.relu(self.projection(hidden.flatten(1)))  # (B, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.features(images))  # (B, num_classes)


def prepare_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Bring samples to the classifier's input: (N, 1, 32, 32) float in [-1, 1].

    Args:
        images: uint8 (N, H, W) or (N, H, W, C) in [0, 255], or float (N, C, H, W) in [-1, 1]; channels are
            averaged to grayscale; 28 px is zero-padded as the data set, other sizes are resized to 32 px.
    Returns:
        The float tensor on the CPU.
    """
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        if images.ndim == 3:
            images = images.unsqueeze(-1)  # (N, H, W, 1)
        if images.ndim != 4:
            raise UserError(f"uint8 images must be (N, H, W) or (N, H, W, C), got shape {tuple(images.shape)}")
        images = to_model_range(images.permute(0, 3, 1, 2))  # (N, C, H, W)
    elif not images.is_floating_point() or images.ndim != 4:
        raise UserError(f"images must be uint8 (N, H, W[, C]) or float (N, C, H, W) in [-1, 1], got "
                        f"{images.dtype} {tuple(images.shape)}")
    images = images.float().mean(dim=1, keepdim=True)  # (N, 1, H, W)
    if images.shape[-1] == FASHION_MNIST_SIZE and images.shape[-2] == FASHION_MNIST_SIZE:
        return pad_fashion_mnist(images, fill=-1.0)  # (N, 1, 32, 32), black border as the data set
    if images.shape[-2:] != (FASHION_MNIST_PADDED_SIZE, FASHION_MNIST_PADDED_SIZE):
        images = F.interpolate(images, size=FASHION_MNIST_PADDED_SIZE, mode="bilinear", antialias=True)
    return images  # (N, 1, 32, 32)


@torch.no_grad()
def predict(model: FashionClassifier, images: np.ndarray | torch.Tensor,
            device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of every image, batch by batch.

    Args:
        model: the classifier (its mode is restored afterwards).
        images: any input `prepare_images` takes.
        device: where to run (default: where the model is).
    Returns:
        features (N, feature_dim) and logits (N, num_classes), float32 numpy arrays.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    features, logits = [], []
    for batch in prepare_images(images).split(BATCH_SIZE):
        batch_features = model.features(batch.to(device))  # (b, D)
        features.append(batch_features.cpu())
        logits.append(model.head(batch_features).cpu())  # (b, classes)
    model.train(was_training)
    return torch.cat(features).numpy(), torch.cat(logits).numpy()


@lru_cache(maxsize=4)
def load_classifier(path: str | Path = SHIPPED_WEIGHTS) -> tuple[FashionClassifier, np.ndarray, np.ndarray]:
    """The classifier exported by `scalegen train classifier --export` (by default the shipped one).

    Args:
        path: its .safetensors file (the JSON card with its config lies beside it).
    Returns:
        (model in eval mode on the CPU, test-set feature mean (D,), test-set feature covariance (D, D)).
    """
    path, card = Path(path), Path(path).with_suffix(".json")
    if not path.exists() or not card.exists():
        raise UserError(f"classifier weights {path} or card {card.name} missing: reinstall scalegen or export one "
                        "with `scalegen train classifier --export FILE.safetensors`")
    tensors = read_weights_file(path)
    mean, covariance = tensors.pop(REFERENCE_MEAN).numpy(), tensors.pop(REFERENCE_COVARIANCE).numpy()
    model = FashionClassifier(ClassifierConfig(**read_json(card)["config"]))
    model.load_state_dict({name: tensor.float() for name, tensor in tensors.items()}, strict=True)
    return model.eval(), mean, covariance


def foreign_classes(num_classes: int | None, names: Sequence[str] | None) -> str | None:
    """Why the labels of samples from a model with these classes are not Fashion-MNIST's classes (so the classifier's
    accuracy on them would compare unrelated ids), or None when they are Fashion-MNIST's or may be (nothing known).

    Args:
        num_classes: the sampled model's number of classes; None when the samples do not say.
        names: its class names; None, or the placeholder names "class 0", … when nothing names them.
    """
    fashion = list(FASHION_MNIST_CLASSES)
    if names is not None and list(names) not in (fashion, class_names(len(names))):
        shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
        return f"the samples' labels are their model's classes ({shown}), not Fashion-MNIST's"
    if num_classes is not None and num_classes != len(fashion):
        return f"the samples' labels are the classes of a {num_classes}-class model, not Fashion-MNIST's {len(fashion)}"
    return None


def fmnist_report(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | None = None,
                  reference: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """FID in the shipped classifier's features and class accuracy of (class-conditional) samples.

    Args:
        images: any input `prepare_images` takes (N >= 2).
        labels: the class each sample was asked to show (N,); None skips the accuracy.
        reference: (mu, sigma) to compare against; default the real Fashion-MNIST test set.
    Returns:
        {"fid": float, "accuracy": float or None, "num_samples": N}.
    """
    model, mean, covariance = load_classifier()
    features, logits = predict(model, images)
    sample_mean, sample_covariance = metrics.feature_statistics(features)
    reference_mean, reference_covariance = reference if reference is not None else (mean, covariance)
    accuracy = None
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
        if labels.shape != (len(logits),):
            raise UserError(f"got {labels.shape} labels for {len(logits)} images; give one class id per image")
        if labels.min() < 0 or labels.max() >= model.config.num_classes:
            raise UserError(f"labels must be Fashion-MNIST classes 0..{model.config.num_classes - 1}")
        accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    fid = metrics.frechet_distance(sample_mean, sample_covariance, reference_mean, reference_covariance)
    return {"fid": fid, "accuracy": accuracy, "num_samples": len(features)}
