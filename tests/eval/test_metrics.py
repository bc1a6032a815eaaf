"""ADM metrics: Fréchet distance, Inception Score, precision/recall, .npz / folder input, the eval command."""
import argparse
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from scalegen.cli import eval as eval_command
from scalegen.eval import evaluate, metrics, npz
from scalegen.errors import UserError
from scalegen.eval.inception import InceptionFeatures


def gaussian_features(seed: int, count: int = 400, dim: int = 12, shift: float = 0.0) -> np.ndarray:
    generator = np.random.default_rng(seed)
    mixing = generator.normal(size=(dim, dim)) / np.sqrt(dim)
    return generator.normal(size=(count, dim)) @ mixing + shift


def test_fid_of_identical_sets_is_zero():
    mu, sigma = metrics.feature_statistics(gaussian_features(0))
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_fid_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    variance1, variance2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(variance1 + variance2 - 2 * np.sqrt(variance1 * variance2))
    distance = metrics.frechet_distance(mu1, np.diag(variance1), mu2, np.diag(variance2))
    assert distance == pytest.approx(expected, rel=1e-10)


def test_fid_matches_direct_scipy_computation():
    mu1, sigma1 = metrics.feature_statistics(gaussian_features(1))
    mu2, sigma2 = metrics.feature_statistics(gaussian_features(2, shift=0.3))
    root = linalg.sqrtm(sigma1)
    # tr((s1 s2)^½) = tr((s1^½ s2 s1^½)^½): the symmetric form has real eigenvalues.
    trace = np.sum(np.sqrt(np.linalg.eigvalsh(root @ sigma2 @ root).clip(min=0)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)


def random_covariance(generator: np.random.Generator, dim: int) -> np.ndarray:
    """A full-rank float64 covariance with a spread of eigenvalues."""
    factor = generator.normal(size=(dim, 2 * dim))
    return factor @ factor.T / (2 * dim)


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_frechet_by_eigenvalues_agrees_with_scipys_sqrtm_on_random_covariances(dim):
    generator = np.random.default_rng(dim)
    sigma1, sigma2 = random_covariance(generator, dim), random_covariance(generator, dim)
    by_eigenvalues = metrics.trace_sqrt_product(sigma1, sigma2)
    assert by_eigenvalues == pytest.approx(metrics.scipy_trace_sqrt_product(sigma1, sigma2), rel=1e-9)
    assert by_eigenvalues == pytest.approx(metrics.trace_sqrt_product(sigma2, sigma1), rel=1e-9)  # tr√(AB) = tr√(BA)
    with warnings.catch_warnings():
        warnings.simplefilter("error", metrics.FrechetDisagreement)  # agreeing methods: no warning
        metrics.frechet_distance(generator.normal(size=dim), sigma1, generator.normal(size=dim), sigma2)


def test_frechet_closed_form_for_covariances_diagonal_in_one_rotated_basis():
    """Commuting covariances Q diag(a) Qᵀ, Q diag(b) Qᵀ: the distance is Σ (√a − √b)² + |mu1 − mu2|²."""
    generator = np.random.default_rng(11)
    rotation = np.linalg.qr(generator.normal(size=(6, 6)))[0]  # (6, 6) orthogonal
    variance1, variance2 = generator.uniform(0.1, 4.0, size=6), generator.uniform(0.1, 4.0, size=6)
    mu1, mu2 = generator.normal(size=6), generator.normal(size=6)
    expected = np.sum((np.sqrt(variance1) - np.sqrt(variance2)) ** 2) + np.sum((mu1 - mu2) ** 2)
    sigma1, sigma2 = (rotation * variance1) @ rotation.T, (rotation * variance2) @ rotation.T
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)
    assert metrics.scipy_trace_sqrt_product(sigma1, sigma2) == pytest.approx(np.sqrt(variance1 * variance2).sum(),
                                                                              rel=1e-10)


def test_a_broken_sqrtm_is_a_warning_and_the_eigenvalue_distance_stands(monkeypatch):
    generator = np.random.default_rng(12)
    sigma1, sigma2 = random_covariance(generator, 8), random_covariance(generator, 8)
    mu1, mu2 = np.zeros(8), np.ones(8)
    stable = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda matrix: 1.5 * matrix)  # wrong, as a broken BLAS build was
    with pytest.warns(metrics.FrechetDisagreement, match="scipy's sqrtm") as caught:
        assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == stable
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda matrix: matrix * (1 + 1j))  # no real root at all
    with pytest.warns(metrics.FrechetDisagreement, match="nan"):
        assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == stable


def test_fid_invariant_to_feature_permutation():
    first, second = gaussian_features(3), gaussian_features(4, shift=0.5)
    order = np.random.default_rng(5).permutation(first.shape[1])
    before = metrics.frechet_distance(*metrics.feature_statistics(first), *metrics.feature_statistics(second))
    after = metrics.frechet_distance(*metrics.feature_statistics(first[:, order]),
                                     *metrics.feature_statistics(second[:, order]))
    assert after == pytest.approx(before, rel=1e-9)


def test_fid_singular_covariances_stay_finite():
    few = gaussian_features(6, count=5, dim=12)  # rank 4 covariance in 12-d
    distance = metrics.frechet_distance(*metrics.feature_statistics(few), *metrics.feature_statistics(few + 0.1))
    assert np.isfinite(distance)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(UserError, match="same Inception"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_uniform_is_one():
    assert metrics.inception_score(np.zeros((20, 1008))) == pytest.approx(1.0)


def test_inception_score_confident_distinct_classes():
    logits = np.full((10, 10), -1e4)
    logits[np.arange(10), np.arange(10)] = 0.0  # image i is surely class i
    assert metrics.inception_score(logits) == pytest.approx(10.0)
    assert metrics.inception_score(logits, split_size=5) == pytest.approx(5.0)  # mean over 2 splits of 5 classes


def test_precision_recall_identical_sets():
    features = torch.from_numpy(gaussian_features(7, count=60).astype(np.float32))
    assert metrics.precision_recall(features, features) == (1.0, 1.0)


def test_precision_recall_far_apart_sets():
    features = torch.from_numpy(gaussian_features(8, count=40).astype(np.float32))
    assert metrics.precision_recall(features, features + 100.0) == (0.0, 0.0)


def test_precision_recall_batches_agree_with_one_block():
    reference = torch.from_numpy(gaussian_features(9, count=70).astype(np.float32))
    samples = torch.from_numpy(gaussian_features(10, count=50, shift=0.4).astype(np.float32))
    whole = metrics.precision_recall(reference, samples, batch_size=1000)
    assert metrics.precision_recall(reference, samples, batch_size=16) == whole
    # brute force with the full distance matrix and the same k = 3 radii
    radii = lambda x: metrics.pairwise_distances(x, x).sort(dim=1).values[:, metrics.NEAREST_NEIGHBORS]
    distances = metrics.pairwise_distances(reference, samples)
    precision = (distances <= radii(reference)[:, None]).any(0).float().mean().item()
    recall = (distances <= radii(samples)[None, :]).any(1).float().mean().item()
    assert whole == (precision, recall) and 0 < precision < 1


def test_pairwise_distances_fall_back_to_float32_on_overflow():
    large = torch.full((2, 4), 300.0)  # squared norms 360,000 overflow float16
    distances = metrics.pairwise_distances(large, large + 1.0)
    assert torch.allclose(distances, torch.full((2, 2), 4.0), atol=0.5)


def test_npz_round_trip_with_statistics(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
    mu, sigma = np.arange(3.0), np.eye(3)
    path = tmp_path / "ref.npz"
    npz.write_npz(path, {"arr_0": images, "mu": mu, "sigma": sigma})
    source = npz.ImageBatches(path)
    assert len(source) == 7 and source.shape == (7, 5, 6, 3)
    assert np.array_equal(np.concatenate(list(source.batches(3))), images)
    statistics = npz.read_npz_statistics(path)
    assert set(statistics) == {"mu", "sigma"} and np.array_equal(statistics["sigma"], sigma)
    np.savez(tmp_path / "plain.npz", images)  # what DiT's sample_ddp.py writes: arr_0 only
    assert npz.read_npz_statistics(tmp_path / "plain.npz") == {}
    assert npz.ImageBatches(tmp_path / "plain.npz").shape == images.shape


def test_npz_streamed_images_are_readable_by_numpy(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    writer = npz.NpzWriter(tmp_path / "out.npz")
    writer.begin_images(images.shape)
    writer.add_images(images[:2])
    writer.add_images(images[2:])
    writer.add_array("mu", np.ones(2))
    writer.close()
    with np.load(tmp_path / "out.npz") as archive:
        assert np.array_equal(archive["arr_0"], images) and np.array_equal(archive["mu"], np.ones(2))


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "float.npz", np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(UserError, match="uint8"):
        npz.ImageBatches(tmp_path / "float.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(UserError, match="not an .npz"):
        npz.ImageBatches(tmp_path / "text.npz")
    with pytest.raises(UserError, match="not found"):
        npz.ImageBatches(tmp_path / "missing.npz")


def write_folder(folder, images):
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:03d}.png")


def test_image_folder(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, size=(4, 6, 5, 3), dtype=np.uint8)
    write_folder(tmp_path / "images", images)
    assert np.array_equal(np.concatenate(list(npz.ImageBatches(tmp_path / "images").batches(3))), images)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        list(npz.ImageBatches(tmp_path / "images").batches(8))
    Image.fromarray(images[0][:3]).save(tmp_path / "images" / "broken.png")
    with pytest.raises(UserError, match="one size"):
        list(npz.ImageBatches(tmp_path / "images").batches(8))


class PixelFeatures(torch.nn.Module):
    """A cheap stand-in for the Inception: low-dimensional features of the mean colour and brightness."""

    def forward(self, images):
        pixels = images.float().flatten(1, 2) / 255  # (N, H*W, 3)
        pool = torch.cat([pixels.mean(1), pixels.std(1)], 1)  # (N, 6)
        return InceptionFeatures(pool=pool, spatial=pool[:, :4] ** 2, logits=pool @ torch.ones(6, 5))


def test_eval_command_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_inception", lambda path: PixelFeatures())
    generator = np.random.default_rng(3)
    reference = generator.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    samples = np.clip(generator.integers(0, 256, size=(30, 8, 8, 3)) * 0.8, 0, 255).astype(np.uint8)
    np.savez(tmp_path / "samples.npz", samples)
    write_folder(tmp_path / "reference", reference)
    parser = argparse.ArgumentParser()
    eval_command.register(parser.add_subparsers())
    common = ["--inception-weights", "unused.pth", "--batch-size", "16", "--ref"]

    args = parser.parse_args(["eval", *common, str(tmp_path / "reference"), "--save-ref", str(tmp_path / "ref.npz"),
                              "--save-ref-images"])
    args.handler(args)
    capsys.readouterr()
    args = parser.parse_args(["eval", *common, str(tmp_path / "ref.npz"), "--samples", str(tmp_path / "samples.npz"),
                              "--out", str(tmp_path / "result.json")])
    args.handler(args)
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "result.json").read_text())
    assert result["num_samples"] == 30 and result["num_reference"] == 40
    assert result["fid"] > 0 and result["sfid"] > 0 and result["inception_score"] >= 1 - 1e-9
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1

    # Same numbers straight from the folder: the saved statistics are the folder's.
    folder_result = evaluate.evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "reference"), "unused.pth")
    assert folder_result["fid"] == pytest.approx(result["fid"])

    # A statistics-only reference: FID and sFID, no precision/recall.
    with np.load(tmp_path / "ref.npz") as archive:
        np.savez(tmp_path / "stats.npz", **{key: archive[key] for key in npz.STATISTICS_KEYS})
    stats_result = evaluate.evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "stats.npz"), "unused.pth")
    assert stats_result["fid"] == pytest.approx(result["fid"]) and stats_result["precision"] is None


def test_eval_command_needs_samples_or_save_ref():
    parser = argparse.ArgumentParser()
    eval_command.register(parser.add_subparsers())
    args = parser.parse_args(["eval", "--ref", "r.npz"])
    with pytest.raises(UserError, match="--samples"):
        args.handler(args)


def test_fmnist_accuracy_only_for_labels_of_fashion_mnist_classes(tmp_path, capsys):
    """Samples of a 3-class model (its names, or only its class count, in the .npz) get FID and a note, no accuracy;
    Fashion-MNIST's classes (by name, by placeholder names, or a file that says nothing) get their accuracy."""
    from scalegen.classes import FASHION_MNIST_CLASSES
    from scalegen.eval.fmnist import foreign_classes
    from scalegen.eval.samples import save_npz

    images = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    parser = argparse.ArgumentParser()
    eval_command.register(parser.add_subparsers())

    def evaluated(class_names=None, **arrays) -> dict:
        path = tmp_path / "samples.npz"
        if arrays:
            npz.write_npz(path, {npz.IMAGES_KEY: images, npz.LABELS_KEY: labels, **arrays})
        else:
            save_npz(images, path, labels, class_names)
        args = parser.parse_args(["eval", "--features", "fmnist", "--samples", str(path)])
        args.handler(args)
        return json.loads(capsys.readouterr().out)

    named = evaluated(["boots", "sneakers", "sandals"])
    assert "accuracy" not in named and "boots" in named["accuracy_note"] and named["fid"] > 0
    counted = evaluated(num_classes=np.array(3))
    assert "accuracy" not in counted and "3-class" in counted["accuracy_note"]
    for fashion in (evaluated(list(FASHION_MNIST_CLASSES)), evaluated([f"class {index}" for index in range(10)]),
                    evaluated(labels=labels)):
        assert 0 <= fashion["accuracy"] <= 1 and "accuracy_note" not in fashion
    assert foreign_classes(None, None) is None and foreign_classes(10, None) is None
