"""FID, sFID, Inception Score and precision/recall with the ADM evaluator's definitions.

Every formula follows openai/guided-diffusion evaluations/evaluator.py, so numbers are comparable with the
DiT and VAR papers: IS over splits of 5,000, k-NN manifolds with k=3 over float16 squared distances (as ADM's
TensorFlow graph computes them). The Fréchet distance is ADM's, with tr((s1 s2)^½) taken from the eigenvalues of the
symmetric s1^½ s2 s1^½ (float64 `eigh`, stable where a general matrix square root is not) and cross-checked against
ADM's own computation, scipy's `sqrtm` (a broken BLAS build once made it silently wrong): a `FrechetDisagreement`
warning when the two differ.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import numpy as np
import torch
from scipy import linalg, special
from tqdm.auto import tqdm

from scalegen.errors import UserError
from scalegen.eval.inception import FIDInception
from scalegen.eval.npz import ImageBatches, NpzWriter

IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score(split_size=5000), mean over splits
NEAREST_NEIGHBORS = 3  # Kynkäänniemi et al.'s k for the manifold radii
DISTANCE_BATCH_SIZE = 10000  # ADM's row and column batch size for pairwise distances
FRECHET_EPS = 1e-6  # diagonal offset when sqrtm of the covariance product is not finite (ADM's fallback)
IMAGINARY_TOLERANCE = 1e-3  # larger imaginary parts of sqrtm's diagonal mean the result is not trustworthy
# The two Fréchet computations must agree to the distance's third significant digit (papers print FID 2.27) ...
FRECHET_AGREEMENT = 1e-3
# ... up to the rounding of the traces the distance is a difference of: scipy's sqrtm of a near-singular product
# (fewer images than features) is good to about sqrt(float64 eps) ≈ 1.5e-8 of them, measured up to 6e-8.
TRACE_ROUNDING = 1e-6


class FrechetDisagreement(UserWarning):
    """The Fréchet distance by eigenvalues and by scipy's sqrtm differ: one of the two computations went wrong."""


# ----------------------------------------------------------------------------------------------- statistics


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of feature rows, as ADM's compute_statistics.

    Args:
        features: (N, D) array, N >= 2.
    Returns:
        mu (D,) and sigma (D, D), float64.
    """
    if len(features) < 2:
        raise UserError(f"need at least 2 images for feature statistics, got {len(features)}")
    return np.mean(features, axis=0, dtype=np.float64), np.cov(features.astype(np.float64), rowvar=False)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((s1 s2)^½) from the eigenvalues of the symmetric s1^½ s2 s1^½, which has those of s1 s2 (float64 `eigh`).

    Args:
        sigma1, sigma2: (D, D) covariances (symmetric positive semi-definite).
    Returns:
        The trace; eigenvalues that rounding made negative count as 0.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1.astype(np.float64))  # (D,), (D, D)
    root = (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T  # (D, D) s1^½
    product = root @ sigma2.astype(np.float64) @ root  # (D, D)
    product = (product + product.T) / 2  # symmetric up to rounding: made exactly so for eigvalsh
    return float(np.sqrt(np.linalg.eigvalsh(product).clip(min=0)).sum())


def scipy_trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((s1 s2)^½) as ADM's evaluator computes it: scipy's sqrtm of s1 s2, with an eps offset when not finite.

    Args:
        sigma1, sigma2: (D, D) covariances.
    Returns:
        The trace of the real part; NaN when the root has a large imaginary diagonal (no trustworthy real root).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on near-singular input; the cross-check judges the result
        covariance_mean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covariance_mean).all():
            offset = np.eye(sigma1.shape[0]) * FRECHET_EPS
            covariance_mean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covariance_mean):
        if not np.allclose(np.diagonal(covariance_mean).imag, 0, atol=IMAGINARY_TOLERANCE):
            return float("nan")
        covariance_mean = covariance_mean.real
    return float(np.trace(covariance_mean))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): |mu1-mu2|² + tr(s1 + s2 - 2 (s1 s2)^½).

    The trace of the root comes from `trace_sqrt_product`; ADM's scipy computation (`scipy_trace_sqrt_product`)
    checks it, and a `FrechetDisagreement` warning names both distances when they differ by more than
    FRECHET_AGREEMENT of the distance (plus TRACE_ROUNDING of the traces).

    Args:
        mu1, mu2: (D,) means.
        sigma1, sigma2: (D, D) covariances.
    Returns:
        The distance (FID when the inputs are pool statistics, sFID for spatial ones), by eigenvalues.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"feature statistics differ in size ({mu1.shape} vs {mu2.shape}): "
                        "compute both with the same Inception network")
    if not all(np.isfinite(array).all() for array in (mu1, sigma1, mu2, sigma2)):
        # sqrtm of a NaN matrix does not return; a NaN in the images' features or stored statistics is the cause
        raise UserError("the feature statistics hold NaN or infinite values: check the samples and the reference "
                        "(recompute stored mu/sigma with `scalegen eval --save-ref`)")
    difference = mu1 - mu2
    traces = float(np.trace(sigma1) + np.trace(sigma2))
    distance = float(difference.dot(difference)) + traces - 2 * trace_sqrt_product(sigma1, sigma2)
    scipy_distance = float(difference.dot(difference)) + traces - 2 * scipy_trace_sqrt_product(sigma1, sigma2)
    if not abs(scipy_distance - distance) <= FRECHET_AGREEMENT * abs(distance) + TRACE_ROUNDING * abs(traces):
        warnings.warn(FrechetDisagreement(
            f"the Fréchet distance by eigenvalues is {distance:.6g}, by scipy's sqrtm (ADM's way) {scipy_distance:.6g}: "
            f"reporting {distance:.6g}; scipy's sqrtm may be broken in this SciPy/BLAS build"), stacklevel=2)
    return distance


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """exp(E_x KL(p(y|x) || p(y))) per consecutive split of `split_size` images, averaged over splits (as ADM).

    Args:
        logits: (N, classes) classifier logits (ADM: the 1008 bias-free Inception logits).
        split_size: images per split.
    Returns:
        The mean Inception Score over splits.
    """
    probabilities = special.softmax(logits.astype(np.float64), axis=1)  # (N, classes)
    scores = []
    for start in range(0, len(logits), split_size):
        part = probabilities[start:start + split_size]  # (S, classes)
        marginal = part.mean(axis=0, keepdims=True)  # (1, classes)
        # rel_entr is p·log(p/q) with 0·log 0 = 0, where ADM's formula would give nan for a class no image has.
        divergence = special.rel_entr(part, marginal).sum(axis=1).mean()
        scores.append(np.exp(divergence))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------- precision, recall


def round_to_half(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to float16 precision and back (overflow gives inf)."""
    return x.half().float()


def pairwise_distances(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances as ADM's DistanceBlock: every op rounded to float16, float32 when that overflows.

    Args:
        rows: (R, D) float32 features.
        columns: (C, D) float32 features.
    Returns:
        (R, C) float32 distances.
    """
    rows_half, columns_half = round_to_half(rows), round_to_half(columns)
    row_norms = round_to_half(round_to_half(rows_half.square()).sum(1, keepdim=True))  # (R, 1)
    column_norms = round_to_half(round_to_half(columns_half.square()).sum(1)).unsqueeze(0)  # (1, C)
    products = round_to_half(rows_half @ columns_half.T)  # (R, C)
    distances = round_to_half(round_to_half(row_norms - 2 * products) + column_norms).clamp_min(0)  # (R, C)
    if torch.isfinite(distances).all():
        return distances
    exact = rows.square().sum(1, keepdim=True) - 2 * rows @ columns.T + columns.square().sum(1)  # (R, C)
    return exact.clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = NEAREST_NEIGHBORS,
                   batch_size: int = DISTANCE_BATCH_SIZE) -> torch.Tensor:
    """Squared distance of every feature to its k-th nearest neighbour in the same set (itself excluded).

    Only a (batch_size, batch_size + k + 1) block of distances is held at a time.

    Args:
        features: (N, D) float32, N > k.
        k: neighbourhood size.
        batch_size: rows and columns per distance block.
    Returns:
        (N,) radii.
    """
    if len(features) <= k:
        raise UserError(f"precision/recall need more than {k} images per set, got {len(features)}")
    radii = []
    for row_start in range(0, len(features), batch_size):
        rows = features[row_start:row_start + batch_size]
        nearest = torch.full((len(rows), 0), float("inf"), device=features.device)  # (R, <=k+1) smallest so far
        for column_start in range(0, len(features), batch_size):
            block = pairwise_distances(rows, features[column_start:column_start + batch_size])  # (R, C)
            candidates = torch.cat([nearest, block], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])  # index 0 is the point itself at distance 0
    return torch.cat(radii)


def precision_recall(reference: torch.Tensor, samples: torch.Tensor, k: int = NEAREST_NEIGHBORS,
                     batch_size: int = DISTANCE_BATCH_SIZE) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's ManifoldEstimator.evaluate_pr.

    Args:
        reference: (N1, D) real-image features.
        samples: (N2, D) generated-image features.
        k: neighbourhood size of the manifold radii.
        batch_size: rows and columns per distance block.
    Returns:
        precision (share of samples inside the reference manifold) and recall (share of references inside
        the sample manifold).
    """
    reference_radii = manifold_radii(reference, k, batch_size)  # (N1,)
    sample_radii = manifold_radii(samples, k, batch_size)  # (N2,)
    samples_covered = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
    reference_covered = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
    for reference_start in range(0, len(reference), batch_size):
        reference_slice = slice(reference_start, reference_start + batch_size)
        for sample_start in range(0, len(samples), batch_size):
            sample_slice = slice(sample_start, sample_start + batch_size)
            distances = pairwise_distances(reference[reference_slice], samples[sample_slice])  # (R, S)
            samples_covered[sample_slice] |= (distances <= reference_radii[reference_slice, None]).any(dim=0)
            reference_covered[reference_slice] |= (distances <= sample_radii[None, sample_slice]).any(dim=1)
    return samples_covered.float().mean().item(), reference_covered.float().mean().item()


# ------------------------------------------------------------------------------------------ feature extraction


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Turn off TF32 while inside: the reference numbers come from full float32 convolutions and products."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def extract_features(model: FIDInception, images: ImageBatches, batch_size: int, device: torch.device,
                     writer: NpzWriter | None = None) -> dict[str, np.ndarray]:
    """Inception features of every image, with a progress bar.

    Args:
        model: the FID Inception (moved to `device` here).
        images: the image source.
        batch_size: images per forward pass.
        device: where the network runs.
        writer: if given, the images are also streamed into its `arr_0`.
    Returns:
        {"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)} float32 arrays.
    """
    model.to(device)
    if writer is not None:
        writer.begin_images(images.shape)
    collected: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
    with exact_float32(), tqdm(total=len(images), unit="img", desc=f"Inception {images.path.name}") as progress:
        for batch in images.batches(batch_size):
            if writer is not None:
                writer.add_images(batch)
            features = model(torch.from_numpy(batch.copy()).to(device))
            for name in collected:
                collected[name].append(getattr(features, name).float().cpu().numpy())
            progress.update(len(batch))
    return {name: np.concatenate(parts) for name, parts in collected.items()}
