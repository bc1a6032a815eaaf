"""Training the Fashion-MNIST classifier that `scalegen eval --features fmnist` judges samples with, and exporting
it: the better of its EMA and raw weights in fp16, the real test set's feature statistics, and a JSON card.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from scalegen.files import read_json
from scalegen.classes import FASHION_MNIST_CLASSES, FASHION_MNIST_NAME
from scalegen.data.batch import Batch
from scalegen.data.fashion_mnist import FASHION_MNIST_PADDED_SIZE, FashionMNIST
from scalegen.data.registry import open_source
from scalegen.data.source import limited
from scalegen.distributed import launched_as_main
from scalegen.errors import UserError
from scalegen.eval import metrics
from scalegen.eval.fmnist import REFERENCE_COVARIANCE, REFERENCE_MEAN, FashionClassifier, load_classifier, predict
from scalegen.eval.settings import ClassifierConfig
from scalegen.runs.export import halved
from scalegen.runs.folder import RunFolder, guarded_run
from scalegen.runs.weights import load_weights
from scalegen.train.settings import RECIPES
from scalegen.train.task import TrainingTask
from scalegen.train.task_options import ClassifierOptions
from scalegen.train.trainer import TrainConfig, train

SUBSET_SIZE = 10_000  # train images in the FID baseline that matches a 10k-sample evaluation


class ClassifierTask(TrainingTask):
    """Cross-entropy training of `FashionClassifier`; its "samples" are a confusion matrix on the test split."""

    kind = "classifier"
    recipe = RECIPES[kind]

    def __init__(self, config: ClassifierConfig, test_set: FashionMNIST | None = None, extra_config: dict | None = None):
        super().__init__(FashionClassifier(config), extra_config)
        self.test_set = test_set

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch.image)  # (B, classes)
        accuracy = (logits.argmax(dim=1) == batch.label).float().mean()  # ()
        return F.cross_entropy(logits, batch.label), {"accuracy": accuracy}

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
    return read_json(RunFolder(run).last_pointer)["step"]


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


def train_classifier(options: ClassifierOptions, config: TrainConfig) -> dict | None:
    """Train the classifier on the train split; with `options.export`, export it and return its card (rank 0).

    Args:
        options: the network, data and export.
        config: the loop settings; those left at None follow the classifier recipe (`ClassifierTask.recipe`).
    """
    with guarded_run(config.out):
        started = time.perf_counter()
        train_set = open_source(options.data, FASHION_MNIST_PADDED_SIZE)
        if not isinstance(train_set, FashionMNIST):
            raise UserError(f"--data {options.data} is not Fashion-MNIST; the classifier trains on fashion-mnist or its "
                            "IDX files")
        dataset = limited(train_set, config.max_images)
        root = None if options.data == FASHION_MNIST_NAME else options.data
        test_set = FashionMNIST(root, FASHION_MNIST_PADDED_SIZE, "test")
        model_config = ClassifierConfig(width=options.width, feature_dim=options.feature_dim,
                                        num_classes=dataset.num_classes)
        torch.manual_seed(config.seed)  # the initial weights follow the seed
        task = ClassifierTask(model_config, test_set, extra_config={"data": options.data})
        train(task, dataset, config)
        seconds = time.perf_counter() - started
        if not options.export or not launched_as_main():
            return None
        card = export_classifier(config.out, options.export, train_set, test_set)
        card.update(command=options.command, wall_clock_seconds=round(seconds, 1), machine=machine_description(config.device))
        Path(options.export).with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
        return card
