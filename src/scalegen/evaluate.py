"""The `scalegen eval`, `scalegen flops` and `scalegen scaling` commands.

`eval` gives the ADM evaluator's numbers (FID, sFID, IS, precision, recall) for a sample batch against a
reference batch; each may be an ADM `.npz` (`arr_0` uint8 NHWC, optional `mu`/`sigma`/`mu_s`/`sigma_s`) or an
image folder. Stored reference statistics take precedence over ones computed from `arr_0`, as in ADM.
With `--features fmnist` it gives FID in the shipped Fashion-MNIST classifier's features (against the real test
set unless `--ref` is given) and, when the samples carry `labels`, how often the classifier sees the asked class.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from scalegen import classifier, metrics, scaling
from scalegen.errors import UserError
from scalegen.flops import flops_table
from scalegen.inception import load_inception

DEFAULT_BATCH_SIZE = 64  # ADM's evaluator batch size
FEATURE_NETWORKS = ("inception", "fmnist")


def reference_statistics(path: str, features: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """mu, sigma (pool) and mu_s, sigma_s (spatial) of the reference: stored ones first, else computed.

    Args:
        path: reference .npz or folder.
        features: its Inception features, or None when it holds no images.
    Returns:
        The statistics available (sFID's may be missing for a stats-only file without them).
    """
    stored = metrics.read_npz_statistics(path)
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
    sample_images = metrics.ImageBatches(samples) if samples else None  # fail early on a bad path

    reference_images = metrics.ImageBatches(reference) if metrics.has_images(reference) else None
    writer = metrics.NpzWriter(save_reference) if save_reference else None
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
    return np.concatenate(list(metrics.ImageBatches(path).batches(classifier.BATCH_SIZE)))


def evaluate_fmnist(samples: str, reference: str | None = None) -> dict:
    """FID in the Fashion-MNIST classifier's features, and class accuracy when the samples carry `labels`.

    Args:
        samples: sample .npz (`arr_0`, optional `labels`) or image folder.
        reference: real images (.npz with `arr_0` or folder); None for the real test set's stored statistics.
    Returns:
        {fid, accuracy (None without labels), num_samples, num_reference, features: "fmnist"}.
    """
    images = read_all_images(samples)
    labels = None
    if Path(samples).is_file() and metrics.LABELS_KEY in metrics.npz_keys(Path(samples)):
        with np.load(samples) as archive:
            labels = archive[metrics.LABELS_KEY]
    statistics, num_reference = None, None
    if reference is not None:
        if not metrics.has_images(reference):
            raise UserError(f"with --features fmnist the reference {reference} needs images (arr_0 or a folder); "
                            "its Inception mu/sigma do not apply")
        reference_images = read_all_images(reference)
        model = classifier.load_classifier()[0]
        statistics = metrics.feature_statistics(classifier.predict(model, reference_images)[0])
        num_reference = len(reference_images)
    result = classifier.fmnist_report(images, labels, statistics)
    return {**result, "num_reference": num_reference, "features": "fmnist"}


def run_eval(args: argparse.Namespace) -> None:
    """Handler of `scalegen eval`: prints the metrics as JSON on stdout (progress goes to stderr)."""
    if args.features == "fmnist":
        if args.samples is None or args.save_ref is not None:
            raise UserError("--features fmnist needs --samples and stores no reference (no --save-ref)")
        result = evaluate_fmnist(args.samples, args.ref)
    else:
        if args.samples is None and args.save_ref is None:
            raise UserError("give --samples to evaluate, or --save-ref OUT.npz to store reference statistics")
        if args.ref is None:
            raise UserError("give --ref: an ADM reference batch, an image folder, or a --save-ref file")
        result = evaluate(args.samples, args.ref, args.inception_weights, args.batch_size, args.save_ref,
                          args.save_ref_images)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def run_flops(args: argparse.Namespace) -> None:
    """Handler of `scalegen flops`: prints the DiT Gflops table and per-image sampling costs."""
    print(flops_table(args.image_size))


def run_scaling(args: argparse.Namespace) -> None:
    """Handler of `scalegen scaling`: fits L = (a·X)^b and prints the fit as JSON."""
    if (args.table is None) == (args.runs is None):
        raise UserError("give either --table runs.csv or --runs RUN_FOLDER [RUN_FOLDER ...]")
    if args.table is not None:
        names, x, y = scaling.read_table(args.table, args.x, args.y)
    else:
        names, x, y = scaling.read_runs(args.runs, args.x, args.y)
    print(json.dumps(scaling.scaling_report(names, x, y, args.x, args.y, args.out), indent=2))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval`, `flops` and `scaling` commands; each sets `handler` to a function of the parsed args."""
    parser = subparsers.add_parser("eval", help="FID, sFID, IS, precision/recall as the ADM evaluator",
                                   description=__doc__)
    parser.add_argument("--samples", help="samples: ADM .npz (arr_0 uint8 N,H,W,3) or image folder")
    parser.add_argument("--ref", help="reference: ADM .npz (arr_0 and/or mu, sigma, mu_s, sigma_s) or image folder; "
                                      "optional with --features fmnist (default: the real test set)")
    parser.add_argument("--features", choices=FEATURE_NETWORKS, default="inception",
                        help="inception: the ADM metrics; fmnist: FID and class accuracy in the shipped "
                             "Fashion-MNIST classifier's features")
    parser.add_argument("--inception-weights", metavar="FILE",
                        help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid's GitHub release)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per Inception pass")
    parser.add_argument("--save-ref", metavar="OUT.npz", help="write the reference statistics as an ADM .npz")
    parser.add_argument("--save-ref-images", action="store_true",
                        help="with --save-ref: also store the reference images as arr_0 (for precision/recall)")
    parser.set_defaults(handler=run_eval)

    parser = subparsers.add_parser("flops", help="DiT Gflops table against the paper; DiT vs VAR cost per image")
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels (256 or 512)")
    parser.set_defaults(handler=run_flops)

    parser = subparsers.add_parser("scaling", help="fit L = (a*X)^b over runs and plot it on log-log axes",
                                   description=scaling.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", help="CSV with a header and one row per run (optional 'name' column)")
    parser.add_argument("--runs", nargs="+", help="run folders, each with log.csv and config.json")
    parser.add_argument("--x", default="params", help="column / key of X (e.g. params, gflops, compute)")
    parser.add_argument("--y", default="loss", help="column / key of L (e.g. loss, fid)")
    parser.add_argument("--out", help="PNG of the log-log plot")
    parser.set_defaults(handler=run_scaling)
