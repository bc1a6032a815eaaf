"""Evaluating sample batches: the numbers `scalegen eval` prints.

`evaluate` gives the ADM evaluator's numbers (FID, sFID, IS, precision, recall) for a sample batch against a
reference batch; each may be an ADM `.npz` (`arr_0` uint8 NHWC, optional `mu`/`sigma`/`mu_s`/`sigma_s`) or an
image folder. Stored reference statistics take precedence over ones computed from `arr_0`, as in ADM.
`evaluate_fmnist` gives FID in the shipped Fashion-MNIST classifier's features (against the real test
set unless `--ref` is given) and, when the samples carry `labels`, how often the classifier sees the asked class.
Both are methods of an `Evaluation`, which reads each input file once for the protocol line and the scores.
"""
from __future__ import annotations

import numpy as np
import torch

from scalegen.errors import UserError
from scalegen.eval import fmnist, metrics, npz
from scalegen.eval.inception import load_inception
from scalegen.eval.settings import DEFAULT_BATCH_SIZE

FEATURE_WORDS = {"inception": "ADM's 2015-12-05 Inception (pool for FID, spatial for sFID)",
                 "fmnist": "the shipped Fashion-MNIST classifier's penultimate layer"}


def class_balance(labels: npz.SampleLabels) -> str:
    """How a sample file's classes were drawn and how often each came, in words (from its `labels` and `protocol`)."""
    if labels.labels is None:
        return "no labels: class balance unknown"
    counts = np.bincount(labels.labels.astype(np.int64), minlength=labels.num_classes or 0)  # (classes,)
    per_class = str(counts.min()) if counts.min() == counts.max() else f"{counts.min()}-{counts.max()}"
    drawn = f"labels {labels.protocol['labels']}" if labels.protocol is not None else "labels (draw not recorded)"
    seed = f", seed {labels.protocol['seed']}" if labels.protocol is not None else ""
    return f"{drawn}: {per_class} per class over {len(counts)} classes{seed}"


class Evaluation:
    """One evaluation's inputs, each file read once: the samples' images and labels, the reference's images and
    stored statistics; the protocol line and the scores are made from what was read.

    Args:
        samples: sample .npz or image folder; None to only write reference statistics.
        reference: reference .npz or folder; None with "fmnist" features (the real test set's stored statistics).
        features: one of FEATURE_NETWORKS.
    """

    def __init__(self, samples: str | None, reference: str | None, features: str):
        self.samples, self.reference, self.features = samples, reference, features
        self.sample_images = npz.ImageBatches(samples) if samples is not None else None  # fail early on a bad path
        self.labels = npz.read_labels(samples) if samples is not None else None
        has_images = reference is not None and npz.has_images(reference)
        self.reference_images = npz.ImageBatches(reference) if has_images else None
        # ADM's stored reference statistics count only in the Inception's features
        self.stored_statistics = npz.read_npz_statistics(reference) if reference and features == "inception" else {}

    def protocol(self) -> str:
        """What the evaluation compares, in one line: the samples and their class balance, the reference, the
        features."""
        if self.reference is None:
            reference_words = "the real Fashion-MNIST test set (its stored statistics)"
        elif self.reference_images is not None and not self.stored_statistics:
            reference_words = f"{self.reference} ({len(self.reference_images)} images)"
        else:
            reference_words = f"{self.reference} (its stored statistics)"
        return (f"{len(self.sample_images)} samples ({class_balance(self.labels)}); reference {reference_words}; "
                f"features {self.features}: {FEATURE_WORDS[self.features]}")

    def reference_statistics(self, features: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """mu, sigma (pool) and mu_s, sigma_s (spatial) of the reference: stored ones first, else computed.

        Args:
            features: the reference's Inception features, or None when it holds no images.
        Returns:
            The statistics available (sFID's may be missing for a stats-only file without them).
        """
        statistics = {}
        for mean_key, covariance_key, feature_name in (("mu", "sigma", "pool"), ("mu_s", "sigma_s", "spatial")):
            if mean_key in self.stored_statistics and covariance_key in self.stored_statistics:
                statistics[mean_key] = self.stored_statistics[mean_key]
                statistics[covariance_key] = self.stored_statistics[covariance_key]
            elif features is not None:
                statistics[mean_key], statistics[covariance_key] = metrics.feature_statistics(features[feature_name])
        if "mu" not in statistics:
            raise UserError(f"reference {self.reference} has neither images (arr_0) nor mu/sigma: give an ADM "
                            "reference batch, an image folder, or a file written by --save-ref")
        return statistics

    def inception_scores(self, weights: str | None, batch_size: int = DEFAULT_BATCH_SIZE,
                         save_reference: str | None = None, save_reference_images: bool = False,
                         device: torch.device | None = None) -> dict:
        """The ADM metrics of the samples against the reference, and/or the reference statistics saved.

        Args:
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
        writer = npz.NpzWriter(save_reference) if save_reference else None
        reference_features = None
        try:
            if self.reference_images is not None:
                image_writer = writer if save_reference_images else None
                reference_features = metrics.extract_features(model, self.reference_images, batch_size, device,
                                                              image_writer)
            statistics = self.reference_statistics(reference_features)
            if writer is not None:
                for key, value in statistics.items():
                    writer.add_array(key, value)
        finally:
            if writer is not None:
                writer.close()
        result = {"fid": None, "sfid": None, "inception_score": None, "precision": None, "recall": None,
                  "num_samples": 0,
                  "num_reference": len(self.reference_images) if self.reference_images is not None else None}
        if self.sample_images is None:
            return result

        features = metrics.extract_features(model, self.sample_images, batch_size, device)
        mu, sigma = metrics.feature_statistics(features["pool"])
        result["num_samples"] = len(self.sample_images)
        result["inception_score"] = metrics.inception_score(features["logits"])
        result["fid"] = metrics.frechet_distance(mu, sigma, statistics["mu"], statistics["sigma"])
        if "mu_s" in statistics:
            mu_spatial, sigma_spatial = metrics.feature_statistics(features["spatial"])
            result["sfid"] = metrics.frechet_distance(mu_spatial, sigma_spatial, statistics["mu_s"],
                                                      statistics["sigma_s"])
        if reference_features is not None:
            with metrics.exact_float32():
                precision, recall = metrics.precision_recall(torch.from_numpy(reference_features["pool"]).to(device),
                                                             torch.from_numpy(features["pool"]).to(device))
            result["precision"], result["recall"] = precision, recall
        return result

    def fmnist_scores(self) -> dict:
        """FID in the Fashion-MNIST classifier's features, and class accuracy when the samples carry `labels` that
        are Fashion-MNIST's classes.

        Returns:
            {fid, accuracy (None without labels), num_samples, num_reference, features: "fmnist"}; when the labels
            are another model's classes (the file's `class_names` or `num_classes` say so), no accuracy but an
            "accuracy_note" saying why.
        """
        images = all_images(self.sample_images)
        labels, note = self.labels.labels, None
        if labels is not None:
            reason = fmnist.foreign_classes(self.labels.num_classes, self.labels.class_names)
            if reason is not None:
                labels = None
                note = f"{reason}; the classifier knows only Fashion-MNIST's classes, so no accuracy (the FID stands)"
        statistics, num_reference = None, None
        if self.reference is not None:
            if self.reference_images is None:
                raise UserError(f"with --features fmnist the reference {self.reference} needs images (arr_0 or a "
                                "folder); its Inception mu/sigma do not apply")
            reference_images = all_images(self.reference_images)
            model = fmnist.load_classifier()[0]
            statistics = metrics.feature_statistics(fmnist.predict(model, reference_images)[0])
            num_reference = len(reference_images)
        result = fmnist.fmnist_report(images, labels, statistics)
        if note is not None:
            del result["accuracy"]
        return {**result, **({"accuracy_note": note} if note else {}), "num_reference": num_reference,
                "features": "fmnist"}


def all_images(batches: npz.ImageBatches) -> np.ndarray:
    """Every image of an .npz (`arr_0`) or folder as one uint8 (N, H, W, 3) array (small Fashion-MNIST sets)."""
    return np.concatenate(list(batches.batches(fmnist.BATCH_SIZE)))


def evaluate(samples: str | None, reference: str, weights: str | None, batch_size: int = DEFAULT_BATCH_SIZE,
             save_reference: str | None = None, save_reference_images: bool = False,
             device: torch.device | None = None) -> dict:
    """The ADM metrics of samples (.npz or image folder; None to only write `save_reference`) against a reference
    (.npz or image folder): `Evaluation.inception_scores`, whose Args and Returns these are."""
    return Evaluation(samples, reference, "inception").inception_scores(weights, batch_size, save_reference,
                                                                        save_reference_images, device)


def evaluate_fmnist(samples: str, reference: str | None = None) -> dict:
    """FID and class accuracy in the Fashion-MNIST classifier's features of samples (.npz or image folder) against
    real images (.npz with `arr_0` or folder; None for the real test set's stored statistics):
    `Evaluation.fmnist_scores`, whose Returns these are."""
    return Evaluation(samples, reference, "fmnist").fmnist_scores()
