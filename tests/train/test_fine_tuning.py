"""Fine-tuning with --init-from: a DiT trained on a 5-class folder starts a 3-class run; only the class embedding is
drawn afresh, the loss starts below a from-scratch run's, the other weights move, the origin is recorded."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from scalegen.cli.main import main
from scalegen.data.fashion_mnist import load_fashion_mnist
from scalegen.runs.folder import CONFIG_FILE, last_checkpoint
from scalegen.runs.weights import load_weights
from scalegen.train.run_log import read_log
from tests_support import user_error

pytestmark = pytest.mark.end_to_end  # each test runs `train dit` on top of a pretraining run
PER_CLASS = 24
DIT = ["--model", "DiT-S/4", "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--image-size", "8",
       "--batch-size", "16", "--sample-steps", "2", "--log-every", "1", "--device", "cpu", "--seed", "0"]


def image_folder(root, classes: list[int]):
    """Fashion-MNIST images of `classes` as an ImageNet-style folder of RGB PNGs (one sub-folder per class)."""
    images, labels = load_fashion_mnist()
    for label in classes:
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for index in np.flatnonzero(labels.numpy() == label)[:PER_CLASS]:
            Image.fromarray(images[index].numpy()).convert("RGB").save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fine")
    main(["train", "dit", *DIT, "--data", str(image_folder(root / "five", [0, 1, 2, 3, 4])), "--steps", "40",
          "--lr", "2e-3", "--out", str(root / "pretrained")])
    return root


def test_fine_tuning_a_checkpoint_on_three_classes(pretrained, tmp_path, capsys):
    three = image_folder(tmp_path / "three", [5, 7, 9])
    common = [*DIT, "--data", str(three), "--steps", "3", "--lr", "1e-3"]
    main(["train", "dit", *common, "--out", str(tmp_path / "scratch")])
    capsys.readouterr()
    main(["train", "dit", *common, "--init-from", str(pretrained / "pretrained"), "--out", str(tmp_path / "tuned")])
    assert "y_embedder.embedding_table.weight starts afresh" in capsys.readouterr().out
    assert read_log(tmp_path / "tuned")[0]["loss"] < read_log(tmp_path / "scratch")[0]["loss"]
    config = json.loads((last_checkpoint(tmp_path / "tuned") / CONFIG_FILE).read_text())
    assert config["init_from"]["reinitialized"] == ["y_embedder.embedding_table.weight"]
    assert config["classes"] == ["class5", "class7", "class9"] and config["model"]["num_classes"] == 3
    start = load_weights(pretrained / "pretrained", prefer_ema=False)[1]
    tuned = load_weights(tmp_path / "tuned", prefer_ema=False)[1]
    assert tuned["y_embedder.embedding_table.weight"].shape == (4, 64)  # 3 classes and the null class
    moved = [name for name in tuned if name != "y_embedder.embedding_table.weight" and name != "pos_embed"
             and not torch.equal(tuned[name], start[name])]
    assert len(moved) > len(tuned) // 2  # the non-class weights were trained on
    main(["export", "--run", str(tmp_path / "tuned"), "--out", str(tmp_path / "export")])
    exported = json.loads((tmp_path / "export" / CONFIG_FILE).read_text())
    assert exported["init_from"] == {"path": "pretrained", "reinitialized": ["y_embedder.embedding_table.weight"]}
    assert str(tmp_path) not in json.dumps(exported)  # no path of the training machine in an export


def test_a_checkpoint_of_another_shape_is_a_one_line_error_naming_the_tensor(pretrained, tmp_path, capsys):
    three = image_folder(tmp_path / "three", [5, 7, 9])
    arguments = [*DIT, "--hidden-size", "32", "--data", str(three), "--steps", "1",
                 "--init-from", str(pretrained / "pretrained"), "--out", str(tmp_path / "wrong")]
    message = user_error(["train", "dit", *arguments], capsys)
    assert "tensor 'pos_embed' is (1, 4, 64)" in message and "but (1, 4, 32) in this model" in message


def test_the_readme_own_data_workflow_at_tiny_size(pretrained, tmp_path, capsys):
    """README "Your own data": fine-tune on a folder, sample by class name with a labelled grid, then its FID."""
    mine = image_folder(tmp_path / "my_data", [5, 7, 9])
    main(["train", "dit", *DIT, "--data", str(mine), "--init-from", str(pretrained / "pretrained"), "--steps", "3",
          "--max-images", "48", "--out", str(tmp_path / "mine")])
    assert "(48 items)" in capsys.readouterr().out
    main(["sample", "dit", "--ckpt", str(tmp_path / "mine"), "--classes", "class5,class9", "--per-class", "4",
          "--steps", "4", "--label-grid", "--out", str(tmp_path / "mine.png"), "--device", "cpu"])
    grid = Image.open(tmp_path / "mine.png")
    assert grid.height == 2 * 8 and grid.width > 4 * 8  # two rows, the names in a margin on their left
    main(["sample", "dit", "--ckpt", str(tmp_path / "mine"), "--num-samples", "20", "--steps", "4",
          "--out", str(tmp_path / "mine.npz"), "--device", "cpu"])
    capsys.readouterr()
    main(["eval", "--features", "fmnist", "--samples", str(tmp_path / "mine.npz"), "--ref", str(mine)])
    report = json.loads(capsys.readouterr().out)
    assert report["fid"] > 0 and report["num_samples"] == 20 and report["num_reference"] == 3 * PER_CLASS

