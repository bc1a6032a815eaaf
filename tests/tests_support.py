"""Shared helpers for the tests: tiny data sets and models that run in a blink on 2 CPU cores."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from scalegen.cli.main import main
from scalegen.data.fashion_mnist import FashionMNIST, write_fashion_mnist_subset
from scalegen.data.source import Subset

TESTS = Path(__file__).parent  # the worker scripts tests start in subprocesses
GOLDEN = TESTS / "golden"  # golden outputs of the official code and the files they were made from
FASHION_SUBSET = 512
SUBSET_IMAGES = 256
TEST_WINGS = ("cli", "data", "diffusion", "eval", "models", "runs", "tokenizers", "train", "web")


def tiny_fashion(image_size: int = 8) -> Subset:
    """512 real Fashion-MNIST images, resized to image_size (8×8 keeps a DiT with patch 4 at 4 tokens)."""
    return Subset(FashionMNIST(None, image_size), FASHION_SUBSET)


def write_fashion_subset(folder: Path) -> Path:
    """The first SUBSET_IMAGES real Fashion-MNIST images as a folder of IDX files (a quick `--data FOLDER`)."""
    return write_fashion_mnist_subset(folder, SUBSET_IMAGES)


def user_error(argv: list[str], capsys) -> str:
    """Run the command line expecting a UserError: exit code 2 and a one-line message, which is returned."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("scalegen: error:") and "\n" not in message
    return message


def training_error(argv: list[str], capsys) -> str:
    """Run a training command expecting it to stop with a UserError: exit code 2, no traceback, the error on the last
    line of stderr (after the progress bar), which is returned."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    message = error.strip().splitlines()[-1]
    assert message.startswith("scalegen: error:")
    return message


def without_progress_bars(text: str) -> str:
    """A subprocess's stderr less tqdm's lines, so the first error shows up in an assertion message."""
    return "\n".join(line for line in text.splitlines() if "it/s]" not in line and "s/it]" not in line)[:4000]


def save_tiny_vae(folder: Path) -> Path:
    """A tiny random AutoencoderKL of the SD-VAE architecture (diffusers), saved as a local `--vae` folder."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, layers_per_block=1,
    )
    autoencoder.save_pretrained(folder)
    return folder


def write_image_folder(root: Path, classes: int = 3, per_class: int = 5, size: int = 20) -> Path:
    """A class folder of random RGB PNGs (seeded): `root/class-K/N.png`."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(0)
    for label in range(classes):
        (root / f"class-{label}").mkdir(parents=True, exist_ok=True)
        for number in range(per_class):
            pixels = generator.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class-{label}" / f"{number}.png")
    return root


def torchrun(worker: Path, *arguments: str, timeout: float, ranks: int = 2) -> subprocess.CompletedProcess:
    """Run a test's worker script under torchrun on `ranks` local processes (one thread each), with tests/ and every
    wing's folder on its path as pytest has them, so a worker imports the helpers its test does."""
    path = [str(TESTS), *(str(TESTS / wing) for wing in TEST_WINGS), os.environ.get("PYTHONPATH", "")]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", str(worker),
               *arguments]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)


def perturbed(model: nn.Module) -> nn.Module:
    """`model` with random weights N(0, 0.1) everywhere (under the current seed): adaLN-Zero starts at a zero output,
    which says nothing and passes no gradient on."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.1)
    return model
