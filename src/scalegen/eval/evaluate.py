"""Evaluating sample batches: the numbers `scalegen eval` prints.

`evaluate` gives the ADM evaluator's numbers (FID, sFID, IS, precision, recall) for a sample batch against a
reference batch; each may be an ADM `.npz` (`arr_0` uint8 NHWC, optional `mu`/`sigma`/`mu_s`/`sigma_s`) or an
image folder. Stored reference statistics take precedence over ones computed from `arr_0`, as in ADM.
`evaluate_fmnist` gives FID in the shipped Fashion-MNIST classifier's features (against the real test
set unless `--ref` is given) and, when the samples carry `labels`, how often the classifier sees the asked class.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scalegen.errors import UserError
from scalegen.eval import fmnist, metrics, npz
from scalegen.eval.inception import load_inception
from scalegen.eval.settings import DEFAULT_BATCH_SIZE

FEATURE_WORDS = {"inception": "ADM's 2015-12-05 Inception (pool for FID, spatial for sFID)",
                 "fmnist": "the shipped Fashion-MNIST classifier's penultimate layer"}


def class_balance(samples: str) -> str:
    """How a sample file's classes were drawn and how often each came, in words (from its `labels` and `protocol`)."""
    labels, num_classes, protocol = npz.read_labels(samples)
    if labels is None:
        return "no labels: class balance unknown"
    counts = np.bincount(labels.astype(np.int64), minlength=num_classes or 0)  # (classes,)
    per_class = str(counts.min()) if counts.min() == counts.max() else f"{counts.min()}-{counts.max()}"
    drawn = f"labels {protocol['labels']}" if protocol is not None else "labels (draw not recorded)"
    seed = f", seed {protocol['seed']}" if protocol is not None else ""
    return f"{drawn}: {per_class} per class over {len(counts)} classes{seed}"


def evaluation_protocol(samples: str, reference: str | None, features: str) -> str:
    """What an evaluation compares, in one line: the samples and their class balance, the reference, the features.

    Args:
        samples: sample .npz or image folder.
        reference: reference .npz or folder; None with "fmnist" features (the real test set's stored statistics).
        features: one of FEATURE_NETWORKS.
    """
    if reference is None:
        reference_words = "the real Fashion-MNIST test set (its stored statistics)"
    elif npz.has_images(reference) and not (features == "inception" and npz.read_npz_statistics(reference)):
        reference_words = f"{reference} ({len(npz.ImageBatches(reference))} images)"
    else:
        reference_words = f"{reference} (its stored statistics)"
    return (f"{len(npz.ImageBatches(samples))} samples ({class_balance(samples)}); reference {reference_words}; "
            f"features {features}: {FEATURE_WORDS[features]}")


def reference_statistics(path: str, features: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """mu, sigma (pool) and mu_s, sigma_s (spatial) of the reference: stored ones first, else computed.

    Args:
        path: reference .npz or folder.
        features: its Inception features, or None when it holds no images.
    Returns:
        The statistics available (sFID's may be missing for a stats-only file without them).
    """
    stored = npz.read_npz_statistics(path)
    statistics = {}
    for mean_key, covariance_key, feature_name in (("mu", "sigma", "pool"), ("mu_s", "sigma_s", "spatial")):
        if mean_key in stored and covariance_key in stored:
            statistics[mean_key], statistics[covariance_key] = stored[mean_key], stored[covariance_key]
        elif features is not None:
            statistics[mean_key], statistics[covariance_key] = metrics.feature_statistics(features[feature_name])
    if "mu" not in statistics:
        raise UserError(f"reference {path} has neither images (arr_0) nor mu/sigma: give an ADM reference batch, "
                        "an image folder, or a file written by --save-ref")
    return statistics


def evaluate(samples: str, reference: str, weights: str | None, batch_size: int = DEFAULT_BATCH_SIZE,
             save_reference: str | None = None, save_reference_images: bool = False,
             device: torch.device | None = None) -> dict:
    """Compute the ADM metrics of samples against a reference, and/or save reference statistics.

    Args:
        samples: sample .npz or image folder; None to only write `save_reference`.
        reference: reference .npz or image folder.
        weights: path of pt_inception-2015-12-05-6726825d.pth.
        batch_size: images per Inception forward pass.
        save_reference: if given, write the reference statistics here as an ADM .npz.
        save_reference_images: also store the reference images as `arr_0` (needed for precision/recall).
        device: where the networks run (default: the GPU if there is one).
    Returns:
        {fid, sfid, inception_score, precision, recall, num_samples, num_reference}; metrics that cannot be
        computed (e.g. no reference images for precision/recall) are None.
    """
    model = load_inception(weights)
    device = device or metrics.default_device()
    sample_images = npz.ImageBatches(samples) if samples else None  # fail early on a bad path

    reference_images = npz.ImageBatches(reference) if npz.has_images(reference) else None
    writer = npz.NpzWriter(save_reference) if save_reference else None
    reference_features = None
    try:
        if reference_images is not None:
            image_writer = writer if save_reference_images else None
            reference_features = metrics.extract_features(model, reference_images, batch_size, device, image_writer)
        statistics = reference_statistics(reference, reference_features)
        if writer is not None:
            for key, value in statistics.items():
                writer.add_array(key, value)
    finally:
        if writer is not None:
            writer.close()
    result = {"fid": None, "sfid": None, "inception_score": None, "precision": None, "recall": None,
              "num_samples": 0, "num_reference": len(reference_images) if reference_images is not None else None}
    if sample_images is None:
        return result

    features = metrics.extract_features(model, sample_images, batch_size, device)
    mu, sigma = metrics.feature_statistics(features["pool"])
    result["num_samples"] = len(sample_images)
    result["inception_score"] = metrics.inception_score(features["logits"])
    result["fid"] = metrics.frechet_distance(mu, sigma, statistics["mu"], statistics["sigma"])
    if "mu_s" in statistics:
        mu_spatial, sigma_spatial = metrics.feature_statistics(features["spatial"])
        result["sfid"] = metrics.frechet_distance(mu_spatial, sigma_spatial, statistics["mu_s"], statistics["sigma_s"])
    if reference_features is not None:
        with metrics.exact_float32():
            precision, recall = metrics.precision_recall(torch.from_numpy(reference_features["pool"]).to(device),
                                                         torch.from_numpy(features["pool"]).to(device))
        result["precision"], result["recall"] = precision, recall
    return result


def read_all_images(path: str) -> np.ndarray:
    """Every image of an .npz (`arr_0`) or folder as one uint8 (N, H, W, 3) array (small Fashion-MNIST sets)."""
    return np.concatenate(list(npz.ImageBatches(path).batches(fmnist.BATCH_SIZE)))


def evaluate_fmnist(samples: str, reference: str | None = None) -> dict:
    """FID in the Fashion-MNIST classifier's features, and class accuracy when the samples carry `labels` that are
    Fashion-MNIST's classes.

    Args:
        samples: sample .npz (`arr_0`, optional `labels`, `num_classes`, `class_names`) or image folder.
        reference: real images (.npz with `arr_0` or folder); None for the real test set's stored statistics.
    Returns:
        {fid, accuracy (None without labels), num_samples, num_reference, features: "fmnist"}; when the labels are
        another model's classes (the file's `class_names` or `num_classes` say so), no accuracy but an
        "accuracy_note" saying why.
    """
    images = read_all_images(samples)
    labels, note = None, None
    keys = npz.npz_keys(Path(samples)) if Path(samples).is_file() else []
    if npz.LABELS_KEY in keys:
        with np.load(samples) as archive:
            labels = archive[npz.LABELS_KEY]
            num_classes = int(archive[npz.NUM_CLASSES_KEY]) if npz.NUM_CLASSES_KEY in keys else None
            names = archive[npz.CLASS_NAMES_KEY].tolist() if npz.CLASS_NAMES_KEY in keys else None
        reason = fmnist.foreign_classes(num_classes, names)
        if reason is not None:
            labels = None
            note = f"{reason}; the classifier knows only Fashion-MNIST's classes, so no accuracy (the FID stands)"
    statistics, num_reference = None, None
    if reference is not None:
        if not npz.has_images(reference):
            raise UserError(f"with --features fmnist the reference {reference} needs images (arr_0 or a folder); "
                            "its Inception mu/sigma do not apply")
        reference_images = read_all_images(reference)
        model = fmnist.load_classifier()[0]
        statistics = metrics.feature_statistics(fmnist.predict(model, reference_images)[0])
        num_reference = len(reference_images)
    result = fmnist.fmnist_report(images, labels, statistics)
    if note is not None:
        del result["accuracy"]
    return {**result, **({"accuracy_note": note} if note else {}), "num_reference": num_reference, "features": "fmnist"}

