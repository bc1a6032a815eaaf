"""A small Fashion-MNIST classifier: the domain feature network behind `scalegen eval --features fmnist`.

Inception features say little about 32×32 grayscale clothes, so the embedded default is judged by a CNN trained
here (`scalegen train classifier`) and shipped in `assets/`: FID in its penultimate features against the real
test set (statistics stored beside the weights) and the accuracy of class-conditional samples — does the model
draw the class it was asked for.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from scalegen import metrics
from scalegen.checkpoint import LAST_POINTER, halved, load_weights
from scalegen.data import (
    FASHION_MNIST_CLASSES, FASHION_MNIST_NAME, FASHION_MNIST_PADDED_SIZE, FashionMNIST, open_dataset, pad_fashion_mnist,
    to_model_range,
)
from scalegen.errors import UserError
from scalegen.train import add_training_options, train, train_config_from_args

ASSETS = Path(__file__).parent / "assets"
SHIPPED_WEIGHTS = ASSETS / "fmnist_classifier.safetensors"
REFERENCE_MEAN, REFERENCE_COVARIANCE = "reference.mu", "reference.sigma"  # test-set statistics in the weights file
FASHION_MNIST_SIZE = 28  # raw images; zero-padded to FASHION_MNIST_PADDED_SIZE as data.py does
GROUP_NORM_GROUPS = 8
STAGES = 3  # each halves the resolution
FINAL_RESOLUTION = FASHION_MNIST_PADDED_SIZE // 2**STAGES
BATCH_SIZE = 500  # images per forward pass when classifying
SUBSET_SIZE = 10_000  # train images in the FID baseline that matches a 10k-sample evaluation


@dataclass
class ClassifierConfig:
    """Shape of the CNN (stored in the weights' JSON card so the network can be rebuilt from it)."""

    width: int = 32  # channels of the first stage; twice that in the other two
    feature_dim: int = 128  # penultimate layer: the FID features
    num_classes: int = len(FASHION_MNIST_CLASSES)


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


class ClassifierTask:
    """Cross-entropy training of `FashionClassifier`; its "samples" are a confusion matrix on the test split."""

    kind = "classifier"

    def __init__(self, config: ClassifierConfig, test_set: FashionMNIST | None = None, extra_config: dict | None = None):
        self.model = FashionClassifier(config)
        self.test_set = test_set
        self.extra_config = extra_config or {}
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> None:
        self.device = device
        self.model.to(device)

    def config(self) -> dict:
        return {"kind": self.kind, "model": asdict(self.model.config), **self.extra_config}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch["image"])  # (B, classes)
        accuracy = (logits.argmax(dim=1) == batch["label"]).float().mean().item()
        return F.cross_entropy(logits, batch["label"]), {"accuracy": accuracy}

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        decayed = [parameter for parameter in self.model.parameters() if parameter.ndim > 1]
        other = [parameter for parameter in self.model.parameters() if parameter.ndim <= 1]  # biases, norms
        return [{"params": decayed, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]

    def write_samples(self, model: nn.Module, path: Path) -> None:
        if self.test_set is None:
            return
        predictions = predict(model, self.test_set.images[:, 0], self.device)[1].argmax(axis=1)  # (N,)
        save_confusion_matrix(self.test_set.labels.numpy(), predictions, path)


def save_confusion_matrix(labels: np.ndarray, predictions: np.ndarray, path: Path) -> None:
    """Plot the row-normalised confusion matrix (true class × predicted class) with the accuracy as title."""
    from matplotlib.figure import Figure  # imported here: only training runs draw plots

    count = len(FASHION_MNIST_CLASSES)
    matrix = np.zeros((count, count))
    np.add.at(matrix, (labels, predictions), 1)
    matrix /= np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(7, 6))
    axes = figure.subplots()
    axes.imshow(matrix, cmap="viridis", vmin=0, vmax=1)
    axes.set_xticks(range(count), FASHION_MNIST_CLASSES, rotation=60, ha="right")
    axes.set_yticks(range(count), FASHION_MNIST_CLASSES)
    axes.set(xlabel="predicted", ylabel="true", title=f"test accuracy {np.mean(labels == predictions):.4f}")
    figure.tight_layout()
    figure.savefig(path)


# --------------------------------------------------------------------------------------------- using it


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
    tensors = load_file(path)
    mean, covariance = tensors.pop(REFERENCE_MEAN).numpy(), tensors.pop(REFERENCE_COVARIANCE).numpy()
    model = FashionClassifier(ClassifierConfig(**json.loads(card.read_text())["config"]))
    model.load_state_dict({name: tensor.float() for name, tensor in tensors.items()}, strict=True)
    return model.eval(), mean, covariance


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


# -------------------------------------------------------------------------------------- training and export


def register(train_parsers) -> None:
    """Add `train classifier` to the command line."""
    parser = train_parsers.add_parser("classifier", help="train the Fashion-MNIST classifier used by eval --features fmnist")
    parser.add_argument("--data", default=FASHION_MNIST_NAME, help="fashion-mnist or a folder of its four IDX files")
    parser.add_argument("--width", type=int, default=ClassifierConfig.width, help="channels of the first stage")
    parser.add_argument("--feature-dim", type=int, default=ClassifierConfig.feature_dim, help="FID feature size")
    parser.add_argument("--export", metavar="FILE.safetensors",
                        help="after training, write the better of EMA/raw weights (fp16), test-set statistics and a "
                             "JSON card beside it")
    add_training_options(parser)
    parser.set_defaults(handler=train_classifier, batch_size=128, lr=2e-3, weight_decay=5e-4, ema_decay=0.995,
                        lr_decay_to=0.0, warmup_steps=100, checkpoint_every=1000)


def train_classifier(args: argparse.Namespace) -> None:
    """Train the classifier on the train split; optionally export it with its test accuracy and FID baseline."""
    started = time.perf_counter()
    dataset = open_dataset(args.data, FASHION_MNIST_PADDED_SIZE)
    if not isinstance(dataset, FashionMNIST):
        raise UserError(f"--data {args.data} is not Fashion-MNIST; the classifier trains on fashion-mnist or its IDX files")
    root = None if args.data == FASHION_MNIST_NAME else args.data
    test_set = FashionMNIST(root, FASHION_MNIST_PADDED_SIZE, "test")
    config = ClassifierConfig(width=args.width, feature_dim=args.feature_dim, num_classes=dataset.num_classes)
    task = ClassifierTask(config, test_set, extra_config={"data": args.data})
    train(task, dataset, train_config_from_args(args))
    seconds = time.perf_counter() - started
    if args.export and int(os.environ.get("RANK", "0")) == 0:
        card = export_classifier(args.out, args.export, dataset, test_set)
        card.update(command="scalegen " + shlex.join(sys.argv[1:]), wall_clock_seconds=round(seconds, 1),
                    machine=machine_description(args.device))
        Path(args.export).with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
        print(json.dumps(card, indent=2))


def export_classifier(run: str | Path, destination: str | Path, train_set: FashionMNIST, test_set: FashionMNIST) -> dict:
    """Write the better (on the test split) of a run's EMA and raw weights in fp16, with test-set statistics.

    Args:
        run: the training run folder.
        destination: the .safetensors file to write.
        train_set, test_set: real images, for the accuracy and the train-vs-test FID baseline.
    Returns:
        The card (config, accuracies, FID baselines) to store as JSON beside the weights.
    """
    stored, _ = load_weights(run)
    config = ClassifierConfig(**stored["model"])
    candidates = {}
    for name, prefer_ema in (("ema", True), ("model", False)):
        weights = halved(load_weights(run, prefer_ema)[1])  # the precision it is stored in
        model = FashionClassifier(config)
        model.load_state_dict({key: value.float() for key, value in weights.items()})
        features, logits = predict(model, test_set.images[:, 0])  # uint8 (N, 32, 32) in
        accuracy = float(np.mean(logits.argmax(axis=1) == test_set.labels.numpy()))
        candidates[name] = (accuracy, weights, model, features)
    chosen = max(candidates, key=lambda name: candidates[name][0])
    accuracy, weights, model, test_features = candidates[chosen]
    mean, covariance = metrics.feature_statistics(test_features)
    train_features = predict(model, train_set.images[:, 0])[0]
    train_fid = metrics.frechet_distance(*metrics.feature_statistics(train_features), mean, covariance)
    subset_fid = metrics.frechet_distance(*metrics.feature_statistics(train_features[:SUBSET_SIZE]), mean, covariance)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    save_file({**weights, REFERENCE_MEAN: torch.from_numpy(mean), REFERENCE_COVARIANCE: torch.from_numpy(covariance)},
              destination)
    load_classifier.cache_clear()
    return {
        "config": asdict(config), "weights": chosen, "dtype": "float16",
        "test_accuracy": accuracy, "test_accuracy_ema": candidates["ema"][0], "test_accuracy_raw": candidates["model"][0],
        "fid_train_vs_test": train_fid, f"fid_train{SUBSET_SIZE // 1000}k_vs_test": subset_fid,
        "num_train": len(train_set), "num_test": len(test_set), "steps": stored_steps(run),
    }


def stored_steps(run: str | Path) -> int:
    """The step of a run's last checkpoint."""
    return json.loads((Path(run) / LAST_POINTER).read_text())["step"]


def machine_description(device: str | None) -> str:
    """Where the classifier was trained, for its card (CPU model and threads, or the GPU)."""
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
