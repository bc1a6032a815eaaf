"""Command line, checkpoints and data: one-line errors, atomic checkpoints, refusal of pickles, samples."""
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scalegen.cli.main import main
from scalegen.runs import folder as folder_module
from scalegen.runs.folder import last_checkpoint, save_checkpoint
from scalegen.runs.weights import load_weights
from tests_support import user_error, without_progress_bars
from scalegen.data.batch import collate
from scalegen.data.fashion_mnist import FashionMNIST
from scalegen.data.folder import ImageFolder, center_crop_arr
from scalegen.data.sampling import ResumableSampler
from scalegen.errors import UserError
from scalegen.models.dit import DiT, DiTConfig
from scalegen.runs.loading import dit_config_from_state_dict, load_dit

TINY_PIXEL_DIT = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)


def write_run(folder: Path, config: DiTConfig = TINY_PIXEL_DIT, step: int = 1) -> DiT:
    torch.manual_seed(0)
    model = DiT(config)
    stored = {"kind": "dit", "model": config.__dict__, "vae": None}
    save_checkpoint(folder, step, stored, model.state_dict(), model.state_dict(), {"step": step})
    return model


class Payload:
    """Unpickling this creates a marker file: proof that arbitrary code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_checkpoint_is_refused_without_running_it(tmp_path, capsys):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": Payload(marker)}, evil)
    message = user_error(["sample", "dit", "--ckpt", str(evil), "--out", str(tmp_path / "g.png")], capsys)
    assert "refusing to load" in message and "arbitrary unpickling" in message
    assert not marker.exists()
    with open(evil, "wb") as stream:  # a bare pickle file, not a torch zip
        pickle.dump(Payload(marker), stream)
    user_error(["sample", "dit", "--ckpt", str(evil), "--out", str(tmp_path / "g.png")], capsys)
    assert not marker.exists()


def test_an_official_style_pt_file_loads_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, patch_size=2, hidden_size=384, depth=1, num_heads=6, num_classes=7))
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": __import__("argparse").Namespace(a=1)}, tmp_path / "x.pt")
    loaded = load_dit(tmp_path / "x.pt", vae="none")  # the bare network: no SD VAE in the tests
    assert loaded.config == dit_config_from_state_dict(model.state_dict())
    assert (loaded.config.num_classes, loaded.config.num_heads, loaded.config.input_size) == (7, 6, 8)


def test_checkpoints_are_atomic_and_last_always_loads(tmp_path, monkeypatch):
    write_run(tmp_path, step=1)
    first = last_checkpoint(tmp_path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(folder_module, "save_file", crash)
    with pytest.raises(UserError, match="disk full while writing checkpoint step 2.*step-0000001 is intact"):
        write_run(tmp_path, step=2)
    assert last_checkpoint(tmp_path) == first
    assert not list((tmp_path / "checkpoints").glob(".staging-*"))  # the partial files are gone
    config, weights = load_weights(tmp_path)
    assert config["kind"] == "dit" and "pos_embed" in weights
    assert json.loads((tmp_path / "last.json").read_text())["step"] == 1


def test_sample_grid_and_adm_npz(tmp_path, capsys):
    write_run(tmp_path / "run")
    main(["sample", "dit", "--ckpt", str(tmp_path / "run"), "--classes", "0,3", "--per-class", "3", "--steps", "3",
          "--out", str(tmp_path / "grid.png")])
    assert Image.open(tmp_path / "grid.png").size == (3 * 8, 2 * 8)
    main(["sample", "dit", "--ckpt", str(tmp_path / "run"), "--num-samples", "5", "--batch-size", "2", "--steps", "2",
          "--cfg-scale", "1.5", "--out", str(tmp_path / "s.npz")])
    samples = np.load(tmp_path / "s.npz")
    # which classes the labels are (eval --features fmnist reads it), and how they were drawn (eval prints it)
    assert list(samples.keys()) == ["arr_0", "labels", "num_classes", "class_names", "protocol"]
    assert samples["labels"].shape == (5,) and samples["labels"].max() < 10 and int(samples["num_classes"]) == 10
    assert list(samples["class_names"]) == load_dit(tmp_path / "run").class_names
    assert samples["arr_0"].shape == (5, 8, 8, 3) and samples["arr_0"].dtype == np.uint8


def test_fixed_seed_sampling_is_reproducible(tmp_path):
    write_run(tmp_path / "run")
    for name in ("a.png", "b.png"):
        main(["sample", "dit", "--ckpt", str(tmp_path / "run"), "--classes", "1", "--per-class", "2", "--steps", "3",
              "--sampler", "ddim", "--seed", "7", "--out", str(tmp_path / name)])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_broken_inputs_give_one_line_errors(tmp_path, capsys):
    write_run(tmp_path / "run")
    assert "out of range" in user_error(
        ["sample", "dit", "--ckpt", str(tmp_path / "run"), "--classes", "12", "--out", str(tmp_path / "g.png")], capsys)
    assert "does not exist" in user_error(
        ["sample", "dit", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "g.png")], capsys)
    assert "unknown DiT preset" in user_error(
        ["train", "dit", "--model", "DiT-Q/2", "--steps", "1", "--out", str(tmp_path / "r")], capsys)
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    assert "no images found" in user_error(
        ["train", "dit", "--data", str(tmp_path / "empty"), "--steps", "1", "--out", str(tmp_path / "r")], capsys)


def test_missing_vae_is_a_one_line_error(tmp_path, capsys):
    message = user_error(["train", "dit", "--vae", str(tmp_path / "novae"), "--steps", "1", "--out", str(tmp_path / "r")], capsys)
    assert "VAE" in message and "not found" in message


def test_resuming_with_another_model_is_refused(tmp_path, capsys):
    write_run(tmp_path / "run")
    message = user_error(["train", "dit", "--model", "DiT-S/4", "--depth", "2", "--image-size", "8", "--steps", "2",
                          "--batch-size", "8", "--out", str(tmp_path / "run")], capsys)
    assert "different model" in message


def test_image_folder_skips_and_counts_a_broken_file(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / label / "good.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    dataset = ImageFolder(tmp_path, 16)
    assert dataset.num_classes == 2 and len(dataset) == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = collate([dataset[(index, False)] for index in range(3)], dataset.form)
    assert batch.skipped == 1 and batch.image.shape == (2, 3, 16, 16)
    assert any("broken.jpg" in str(warning.message) for warning in caught)


def test_adm_center_crop_is_square_and_centred():
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, 100:200] = 255  # a white centre column band, as wide as the crop
    cropped = np.asarray(center_crop_arr(Image.fromarray(pixels), 32))
    assert cropped.shape == (32, 32, 3)
    assert cropped[:, 4:28].min() > 200


def test_fashion_mnist_is_real_and_padded():
    dataset = FashionMNIST()
    assert len(dataset) == 60_000 and dataset.num_classes == 10
    item = dataset[(0, False)]
    assert item["image"].shape == (1, 32, 32) and item["image"].min() == -1.0 and item["image"].max() <= 1.0
    assert torch.equal(dataset[(0, True)]["image"], item["image"].flip(-1))
    assert sorted(torch.bincount(dataset.labels).tolist()) == [6000] * 10
    assert len(FashionMNIST(split="test")) == 10_000


def test_sampler_resumes_mid_epoch_and_deals_ranks_disjointly():
    sampler = ResumableSampler(size=20, batch_size=3, seed=5)
    stream = iter(sampler)
    items = [next(stream) for _ in range(3 * 10)]  # 6 batches per epoch, 10 batches
    resumed = ResumableSampler(size=20, batch_size=3, seed=5)
    resumed.start_batch = 4
    stream = iter(resumed)
    assert [next(stream) for _ in range(18)] == items[12:30]
    ranks = [ResumableSampler(20, 2, rank, 2, seed=5).epoch_items(0) for rank in (0, 1)]
    indices = [index for rank_items in ranks for index, _ in rank_items]
    assert len(indices) == len(set(indices)) == 20


def test_python_dash_m_and_console_script_start():
    completed = subprocess.run([sys.executable, "-m", "scalegen", "--help"], capture_output=True, text=True)
    assert completed.returncode == 0 and "train" in completed.stdout


@pytest.mark.multiprocess
def test_npz_sampling_is_sharded_over_two_torchrun_ranks(tmp_path):
    write_run(tmp_path / "run")
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scalegen",
               "sample", "dit", "--ckpt", str(tmp_path / "run"), "--num-samples", "5", "--batch-size", "2",
               "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "s.npz")]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, without_progress_bars(completed.stderr)
    samples = np.load(tmp_path / "s.npz")
    assert samples["arr_0"].shape == (5, 8, 8, 3) and samples["labels"].shape == (5,)
    # Gathered batch by batch: [rank 0's first two, rank 1's first two, rank 0's third]; per-rank seeds differ.
    assert not np.array_equal(samples["arr_0"][0], samples["arr_0"][2])


def test_edit_var_to_an_npz_is_a_one_line_error_naming_image_formats(tmp_path, capsys):
    message = user_error(["edit", "var", "--ckpt", str(tmp_path / "run"), "--image", str(tmp_path / "in.png"),
                          "--box", "0,0,4,4", "--out", str(tmp_path / "edited.npz")], capsys)
    assert ".npz is no image format" in message and ".png" in message and ".jpg" in message
    assert not list(tmp_path.iterdir())  # checked before any work: nothing written


def test_a_model_of_another_kind_gets_advice_that_names_real_commands_and_functions(tmp_path, capsys):
    """A tokenizer run given to `sample var` (and every other kind's advice) names commands the command line has
    and functions the package has."""
    import importlib
    import re

    from scalegen.runs.loading import KIND_ADVICE

    weights = DiT(TINY_PIXEL_DIT).state_dict()
    save_checkpoint(tmp_path / "tokenizer", 1, {"kind": "vqvae", "model": {}}, weights, None, {"step": 1})
    message = user_error(["sample", "var", "--ckpt", str(tmp_path / "tokenizer"), "--out", str(tmp_path / "g.png")],
                         capsys)
    assert f"scalegen train var --tokenizer {tmp_path / 'tokenizer'}" in message and "load_tokenizer" in message
    for advice in KIND_ADVICE.values():
        for command in re.findall(r"`scalegen ([a-z ]+?) --", advice):
            with pytest.raises(SystemExit) as stopped:
                main([*command.split(), "--help"])
            assert stopped.value.code == 0, command
        capsys.readouterr()
        for function in re.findall(r"(scalegen(?:\.\w+)+)", advice):
            module, name = function.rsplit(".", 1)
            assert hasattr(importlib.import_module(module), name), function


def test_npz_samples_say_which_classes_their_labels_are(tmp_path):
    from scalegen.eval.samples import save_npz

    save_npz(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "s.npz", np.array([0, 2]), class_names=["a", "b", "c"])
    samples = np.load(tmp_path / "s.npz")
    assert int(samples["num_classes"]) == 3 and samples["class_names"].tolist() == ["a", "b", "c"]


def test_flops_names_its_units(capsys):
    main(["flops"])
    printed = capsys.readouterr().out
    assert "Gflops (10^9 multiply-accumulates, as the DiT paper" in printed
    assert "TMACs (10^12 multiply-accumulates" in printed
