"""The sampling protocol behind an FID: `sample_to_npz` draws class-balanced labels (each class N/K times, the same
labels for one rank or two), records how it drew them in the .npz, and `scalegen eval` prints that protocol in one
line beside the reference and the features, and a broken sqrtm as a one-line warning."""
import argparse
import json

import numpy as np
import pytest
import torch

from scalegen.cli import eval as eval_command
from scalegen.distributed import DistributedContext
from scalegen.eval import evaluate, metrics, npz
from scalegen import images
from scalegen.eval.samples import balanced_labels, sample_to_npz

SIDE = 4  # pixels of the stand-in images


def labelled_images(labels: torch.Tensor) -> torch.Tensor:
    """A stand-in model: each image is flat grey at its label's level, so a file's images show their labels."""
    return (labels.float() / 10).view(-1, 1, 1, 1).expand(-1, 1, SIDE, SIDE)  # (b, 1, S, S) in [0, 1]


def labels_shown(pixels: np.ndarray) -> np.ndarray:
    """The labels `labelled_images` drew, read back from uint8 (N, H, W, 3)."""
    return np.rint(pixels[:, 0, 0, 0] / images.UINT8_MAX * 10).astype(np.int64)


@pytest.mark.parametrize("num_samples, num_classes", [(50, 10), (23, 5), (3, 7)])
def test_balanced_labels_give_each_class_its_exact_share(num_samples, num_classes):
    labels = balanced_labels(num_samples, num_classes, seed=0)
    share, extra = divmod(num_samples, num_classes)
    expected = [share + 1] * extra + [share] * (num_classes - extra)
    assert torch.bincount(labels, minlength=num_classes).tolist() == expected
    assert torch.equal(labels, balanced_labels(num_samples, num_classes, seed=0))  # the seed fixes the shuffle


def written(tmp_path, label_draw: str = "balanced", num_samples: int = 7, **arrays) -> dict:
    path = sample_to_npz(labelled_images, 3, num_samples, 2, 5, tmp_path / "s.npz", DistributedContext(),
                         label_draw=label_draw)
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


def test_one_rank_writes_the_balanced_labels_and_records_the_protocol(tmp_path):
    samples = written(tmp_path)
    assert np.array_equal(samples[npz.LABELS_KEY], balanced_labels(7, 3, seed=5).numpy())
    assert np.bincount(samples[npz.LABELS_KEY]).tolist() == [3, 2, 2]
    assert np.array_equal(labels_shown(samples[npz.IMAGES_KEY]), samples[npz.LABELS_KEY])  # each image its label
    protocol = json.loads(str(samples[npz.PROTOCOL_KEY]))
    assert protocol == {"labels": "balanced", "num_samples": 7, "num_classes": 3, "seed": 5, "world_size": 1,
                        "batch_size": 2}


def test_two_simulated_ranks_write_the_same_balanced_labels_as_one(tmp_path, monkeypatch):
    """Rank 1 runs first and keeps what it sends; rank 0 then gathers its own batch and rank 1's, in rank order."""
    sent: list[torch.Tensor] = []
    monkeypatch.setattr("scalegen.eval.samples.gather_tensors", lambda tensor, context: sent.append(tensor) or tensor)
    assert sample_to_npz(labelled_images, 3, 7, 2, 5, tmp_path / "s.npz", DistributedContext(rank=1, world_size=2),
                         label_draw="balanced") is None
    monkeypatch.setattr("scalegen.eval.samples.gather_tensors",
                        lambda tensor, context: torch.cat([tensor, sent.pop(0)]))
    path = sample_to_npz(labelled_images, 3, 7, 2, 5, tmp_path / "s.npz", DistributedContext(rank=0, world_size=2),
                         label_draw="balanced")
    assert not sent  # every batch of rank 1 gathered
    with np.load(path) as archive:
        labels, pixels = archive[npz.LABELS_KEY], archive[npz.IMAGES_KEY]
        protocol = json.loads(str(archive[npz.PROTOCOL_KEY]))
    assert np.array_equal(labels, balanced_labels(7, 3, seed=5).numpy())  # 7 over 2 ranks: 4 each, one dropped
    assert np.bincount(labels).tolist() == [3, 2, 2] and protocol["world_size"] == 2
    assert np.array_equal(labels_shown(pixels), labels)


def test_random_labels_are_an_option_and_say_so(tmp_path):
    samples = written(tmp_path, "random", num_samples=40)
    assert json.loads(str(samples[npz.PROTOCOL_KEY]))["labels"] == "random"
    assert np.bincount(samples[npz.LABELS_KEY], minlength=3).tolist() != [14, 13, 13]  # seed 5: 17, 11, 12
    with pytest.raises(ValueError, match="label_draw"):
        written(tmp_path, "uniform")


def test_the_protocol_line_names_the_draw_the_real_test_set_and_a_plain_adm_file(tmp_path):
    sample_to_npz(labelled_images, 3, 40, 8, 5, tmp_path / "s.npz", DistributedContext(), label_draw="random")
    line = evaluate.Evaluation(str(tmp_path / "s.npz"), None, "fmnist").protocol()
    assert line == ("40 samples (labels random: 11-17 per class over 3 classes, seed 5); reference the real "
                    f"Fashion-MNIST test set (its stored statistics); features fmnist: {evaluate.FEATURE_WORDS['fmnist']}")
    np.savez(tmp_path / "plain.npz", np.zeros((2, SIDE, SIDE, 3), np.uint8))  # DiT's sample_ddp.py: arr_0 alone
    assert evaluate.Evaluation(str(tmp_path / "plain.npz"), None, "fmnist").protocol().startswith(
        "2 samples (no labels: class balance unknown)")


def test_eval_prints_its_protocol_in_one_line_and_a_broken_sqrtm_as_a_warning(tmp_path, monkeypatch, capsys):
    from test_metrics import PixelFeatures  # the cheap Inception stand-in

    monkeypatch.setattr(evaluate, "load_inception", lambda path: PixelFeatures())
    generator = np.random.default_rng(0)
    reference = generator.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    npz.write_npz(tmp_path / "ref.npz", {npz.IMAGES_KEY: reference})
    sample_to_npz(lambda labels: torch.rand(len(labels), 3, 8, 8), 4, 30, 8, 0, tmp_path / "s.npz",
                  DistributedContext())
    parser = argparse.ArgumentParser()
    eval_command.register(parser.add_subparsers())
    args = parser.parse_args(["eval", "--inception-weights", "unused.pth", "--ref", str(tmp_path / "ref.npz"),
                              "--samples", str(tmp_path / "s.npz")])
    args.handler(args)
    captured = capsys.readouterr()
    protocol = [line for line in captured.err.splitlines() if line.startswith("protocol: ")]
    assert protocol == [f"protocol: {json.loads(captured.out)['protocol']}"]
    assert "30 samples (labels balanced: 7-8 per class over 4 classes, seed 0)" in protocol[0]
    assert f"reference {tmp_path / 'ref.npz'} (40 images)" in protocol[0] and "features inception" in protocol[0]
    assert "warning" not in captured.err

    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda matrix: -matrix)
    args.handler(args)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "sqrtm" in line]
    assert len(warnings) == 2 and all(line.startswith("warning: the Fréchet distance") for line in warnings)  # FID, sFID


def test_one_evaluation_reads_each_file_s_labels_statistics_and_image_count_once(tmp_path, monkeypatch, capsys):
    """The protocol line and the scores come from one reading: each input's arrays are loaded once and its images
    opened once (the samples' labels, the reference's stored statistics), with either features."""
    from test_metrics import PixelFeatures  # the cheap Inception stand-in

    monkeypatch.setattr(evaluate, "load_inception", lambda path: PixelFeatures())
    reference = np.random.default_rng(0).integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    statistics = metrics.feature_statistics(np.random.default_rng(1).normal(size=(40, 6)))
    npz.write_npz(tmp_path / "ref.npz", {npz.IMAGES_KEY: reference, "mu": statistics[0], "sigma": statistics[1]})
    sample_to_npz(lambda labels: torch.rand(len(labels), 3, 8, 8), 4, 30, 8, 0, tmp_path / "s.npz",
                  DistributedContext())
    loads, openings = [], []
    load, open_batches = np.load, npz.ImageBatches.__init__
    monkeypatch.setattr(np, "load", lambda path, *rest, **options: loads.append(str(path)) or
                        load(path, *rest, **options))
    monkeypatch.setattr(npz.ImageBatches, "__init__",
                        lambda self, path: openings.append(str(path)) or open_batches(self, path))
    parser = argparse.ArgumentParser()
    eval_command.register(parser.add_subparsers())
    for features in ("inception", "fmnist"):
        loads.clear(), openings.clear()
        args = parser.parse_args(["eval", "--features", features, "--inception-weights", "unused.pth",
                                  "--ref", str(tmp_path / "ref.npz"), "--samples", str(tmp_path / "s.npz")])
        args.handler(args)
        assert "labels balanced: 7-8 per class" in json.loads(capsys.readouterr().out)["protocol"]
        expected = [str(tmp_path / "s.npz"), str(tmp_path / "ref.npz")]
        assert sorted(openings) == sorted(expected), features
        assert sorted(path for path in loads if path in expected) == sorted(expected[:1 + (features == "inception")])
