"""The shipped Fashion-MNIST classifier: accurate on real images, FID ≈ 0 on itself, the eval and train commands."""
import json

import numpy as np
import pytest
import torch

from scalegen.data.fashion_mnist import load_fashion_mnist, write_fashion_mnist_subset
from scalegen.eval import fmnist as classifier, metrics
from scalegen.cli.main import main
from scalegen.pixels import to_model_range
from scalegen.errors import UserError
from scalegen.train.run_log import read_log
from scalegen.eval.samples import save_npz

REAL_COUNT = 1000
MIN_ACCURACY = 0.88


@pytest.fixture(scope="module")
def real_test():
    """The first 1,000 real test images, uint8 (N, 28, 28), and their labels."""
    images, labels = load_fashion_mnist(None, "test")
    return images[:REAL_COUNT].numpy(), labels[:REAL_COUNT].numpy()


def test_shipped_classifier_is_accurate_and_its_card_is_complete(real_test):
    images, labels = real_test
    report = classifier.fmnist_report(images, labels)
    assert report["accuracy"] >= MIN_ACCURACY and report["num_samples"] == REAL_COUNT
    card = json.loads(classifier.SHIPPED_WEIGHTS.with_suffix(".json").read_text())
    assert card["test_accuracy"] >= 0.9 and card["command"].startswith("scalegen train classifier")
    assert classifier.SHIPPED_WEIGHTS.stat().st_size < 1_000_000


def test_fid_is_zero_on_the_same_images_and_large_on_noise(real_test):
    images, labels = real_test
    model = classifier.load_classifier()[0]
    same = classifier.fmnist_report(images, reference=metrics.feature_statistics(classifier.predict(model, images)[0]))
    assert abs(same["fid"]) < 1e-3
    real = classifier.fmnist_report(images)  # against the stored statistics of all 10,000 test images
    noise = np.random.default_rng(0).integers(0, 256, size=images.shape, dtype=np.uint8)
    assert classifier.fmnist_report(noise)["fid"] > 100 * real["fid"]


def test_wrong_labels_score_low(real_test):
    images, labels = real_test
    assert classifier.fmnist_report(images, (labels + 1) % 10)["accuracy"] < 0.1


def test_every_input_layout_gives_the_same_features(real_test):
    images = real_test[0][:8]  # (8, 28, 28) uint8
    padded = to_model_range(torch.nn.functional.pad(torch.from_numpy(images), (2, 2, 2, 2)).unsqueeze(1))  # (8, 1, 32, 32)
    rgb = np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1)  # (8, 32, 32, 3)
    expected = classifier.prepare_images(images)
    torch.testing.assert_close(classifier.prepare_images(padded), expected)
    torch.testing.assert_close(classifier.prepare_images(rgb), expected)
    assert classifier.prepare_images(rgb[:, ::2, ::2].copy()).shape == (8, 1, 32, 32)  # 16 px is resized
    with pytest.raises(UserError, match="uint8"):
        classifier.prepare_images(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(UserError, match="labels"):
        classifier.fmnist_report(images, np.arange(3))


@pytest.mark.end_to_end
def test_eval_features_fmnist_prints_fid_and_accuracy(real_test, tmp_path, capsys):
    images, labels = real_test
    rgb = np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1)  # (N, 32, 32, 3) as our samplers
    save_npz(rgb, tmp_path / "samples.npz", labels)
    main(["eval", "--features", "fmnist", "--samples", str(tmp_path / "samples.npz")])
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] >= MIN_ACCURACY and result["num_samples"] == REAL_COUNT and result["fid"] >= 0
    main(["eval", "--features", "fmnist", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "samples.npz")])
    assert abs(json.loads(capsys.readouterr().out)["fid"]) < 1e-3
    with pytest.raises(SystemExit):
        main(["eval", "--features", "fmnist"])
    assert "--samples" in capsys.readouterr().err


@pytest.mark.end_to_end
def test_short_training_run_lowers_the_loss_and_exports(tmp_path):
    data = tmp_path / "fashion"
    for split, count in (("train", 512), ("test", 128)):
        write_fashion_mnist_subset(data, count, split)
    exported = tmp_path / "export" / "small.safetensors"
    main(["train", "classifier", "--data", str(data), "--steps", "60", "--batch-size", "64", "--width", "16", "--lr", "3e-3", "--lr-decay-to", "1",
          "--feature-dim", "32", "--warmup-steps", "0", "--log-every", "1", "--out", str(tmp_path / "run"),
          "--device", "cpu", "--export", str(exported)])
    losses = [row["loss"] for row in read_log(tmp_path / "run")]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert (tmp_path / "run" / "samples" / "step-0000060.png").exists()  # the confusion matrix
    card = json.loads(exported.with_suffix(".json").read_text())
    assert card["num_test"] == 128 and card["weights"] in ("ema", "model") and card["fid_train_vs_test"] > 0
    model, mean, covariance = classifier.load_classifier(exported)
    assert model.config.feature_dim == 32 and mean.shape == (32,) and covariance.shape == (32, 32)
