"""How well a tokenizer keeps images: originals beside their reconstructions, pixel error and rFID.

Before training a generator in a tokenizer's latents, a researcher looks at what the tokenizer loses:

    tokenizer = load_autoencoder("runs/tokenizer")        # or a local SD-VAE folder
    dataset = open_source("fashion-mnist", data_image_size(tokenizer))
    originals, reconstructions = reconstruct(tokenizer, dataset, 1000)   # (N, C, H, W) each, in [0, 1]
    save_pairs_grid(originals, reconstructions, "pairs.png")
    reconstruction_report(originals, reconstructions, features="fmnist")   # {"psnr": …, "fid": …, …}

rFID is the FID of the reconstructions against their originals — the figure tokenizer papers report — here in the
shipped Fashion-MNIST classifier's features (eval/fmnist.py), as `scalegen eval --features fmnist` scores samples.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from scalegen.data.source import unflipped_loader
from scalegen.errors import UserError
from scalegen.eval import fmnist, metrics
from scalegen.pixels import to_unit_range
from scalegen.eval.settings import GRID_PAIRS, RECONSTRUCTION_BATCH_SIZE, Features
from scalegen.files import read_json
from scalegen.images import save_grid
from scalegen.runs.folder import CONFIG_FILE
from scalegen.runs.loading import load_tokenizer
from scalegen.tokenizers.codec import kind_of
from scalegen.tokenizers.sd_vae import LATENT_DOWNSAMPLE, load_sd_vae

PAIRS_PER_ROW = 8
MSE_FLOOR = 1e-10  # a perfect reconstruction reads as 100 dB, not infinity (JSON has no infinity)
SD_VAE_CLASS = "AutoencoderKL"  # the `_class_name` in a diffusers VAE folder's config.json
RGB_CHANNELS = 3
Autoencoder = nn.Module  # a tokenizer of a registered kind (tokenizers/codec.py) or an SD VAE's `LatentCodec`


def load_autoencoder(path: str | Path) -> Autoencoder:
    """What `scalegen reconstruct --tokenizer` names: a local SD-VAE folder (diffusers AutoencoderKL), else any
    tokenizer `scalegen.runs.loading.load_tokenizer` loads (a `train vqvae` or `train kl` run or export, a DiT or VAR
    run holding one, an official vae .pth)."""
    config = Path(path) / CONFIG_FILE
    if config.is_file() and read_json(config).get("_class_name") == SD_VAE_CLASS:
        return load_sd_vae(path)
    return load_tokenizer(path)


def data_image_size(autoencoder: Autoencoder, requested: int | None = None) -> int:
    """The image side to open data at: `requested`, else the one a tokenizer of ours encodes (an SD VAE takes any
    multiple of 8, so it needs one)."""
    if requested is not None:
        return requested
    if kind_of(autoencoder) is not None:
        return autoencoder.image_size
    raise UserError(f"an SD VAE takes any image size: give --image-size (a multiple of {LATENT_DOWNSAMPLE})")


def check_images(autoencoder: Autoencoder, images: torch.Tensor) -> None:
    """A one-line error when a batch (B, C, H, W) does not fit the autoencoder."""
    if kind_of(autoencoder) is not None:
        expected = (autoencoder.config.in_channels, autoencoder.image_size, autoencoder.image_size)
        if tuple(images.shape[1:]) != expected:
            raise UserError(f"the data's images are (C, H, W) {tuple(images.shape[1:])} but the tokenizer encodes "
                            f"{expected}; pass data of the tokenizer's kind (open it at the tokenizer's image size)")
    elif images.shape[-1] % LATENT_DOWNSAMPLE or images.shape[-2] % LATENT_DOWNSAMPLE:
        raise UserError(f"an SD VAE encodes sides that are multiples of {LATENT_DOWNSAMPLE}, got "
                        f"{images.shape[-2]}x{images.shape[-1]}; choose another image size")


def round_trip(autoencoder: Autoencoder, images: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] through the latent space and back -> (B, C, H, W) in [-1, 1]: as a tokenizer's
    kind goes (a VQVAE's tokens, a KL tokenizer's posterior mean), or an SD VAE's posterior mean (grayscale images go
    through an SD VAE as gray RGB and come back averaged)."""
    kind = kind_of(autoencoder)
    if kind is not None:
        return kind.round_trip(autoencoder, images)
    channels = images.shape[1]
    colour = images.expand(-1, RGB_CHANNELS, -1, -1) if channels == 1 else images  # (B, 3, H, W)
    decoded = autoencoder.decode(autoencoder.encode_distribution(colour)[0]).clamp(-1, 1)  # (B, 3, H, W)
    return decoded.mean(dim=1, keepdim=True) if channels == 1 else decoded


@torch.no_grad()
def reconstruct(autoencoder: Autoencoder, dataset: Dataset, count: int,
                batch_size: int = RECONSTRUCTION_BATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode and decode the first `count` images of a data set (unflipped), on the autoencoder's device.

    Args:
        autoencoder: a tokenizer of ours or an SD VAE (`load_autoencoder`), in eval mode.
        dataset: an image data set at an image size the autoencoder takes (`scalegen.data.registry.open_source`).
        count: how many images (fewer when the data set is smaller).
        batch_size: images per pass.
    Returns:
        originals and reconstructions, each (N, C, H, W) float in [0, 1] on the CPU.
    """
    device = next(autoencoder.parameters()).device
    originals, reconstructions = [], []
    for batch in unflipped_loader(dataset, batch_size, count):
        if len(batch) == 0:  # every image of the batch was unreadable
            continue
        images = batch.image.to(device)  # (B, C, H, W) in [-1, 1]
        check_images(autoencoder, images)
        originals.append(images.cpu())
        reconstructions.append(round_trip(autoencoder, images).float().cpu())
    if len(originals) == 0:
        raise UserError("the data set gave no readable images to reconstruct; check --data")
    return to_unit_range(torch.cat(originals)), to_unit_range(torch.cat(reconstructions))


def save_pairs_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path) -> Path:
    """Save the first GRID_PAIRS images as a PNG of pairs, each original with its reconstruction on its right,
    PAIRS_PER_ROW pairs a row; returns the path.

    Args:
        originals, reconstructions: (N, C, H, W) in [0, 1], as `reconstruct` returns them.
    """
    originals, reconstructions = originals[:GRID_PAIRS], reconstructions[:GRID_PAIRS]
    pairs = torch.stack([originals, reconstructions], dim=1).flatten(0, 1)  # (2N, C, H, W): o0 r0 o1 r1 …
    rows = math.ceil(len(originals) / PAIRS_PER_ROW)
    if rows > 1:  # fill the last row so that no pair breaks across rows (blank cells stay black)
        blank = pairs.new_zeros(rows * 2 * PAIRS_PER_ROW - len(pairs), *pairs.shape[1:])
        pairs = torch.cat([pairs, blank])
    return save_grid(pairs, rows, path)


def reconstruction_fid(originals: torch.Tensor, reconstructions: torch.Tensor) -> float:
    """rFID: the Fréchet distance of the reconstructions' features to the originals' in the shipped Fashion-MNIST
    classifier (eval/fmnist.py). Images (N, C, H, W) in [0, 1], N >= 2."""
    classifier = fmnist.load_classifier()[0]
    reference = metrics.feature_statistics(fmnist.predict(classifier, originals * 2 - 1)[0])
    return fmnist.fmnist_report(reconstructions * 2 - 1, reference=reference)["fid"]


def reconstruction_report(originals: torch.Tensor, reconstructions: torch.Tensor,
                          features: Features | None = None) -> dict:
    """How far the reconstructions are from their originals.

    Args:
        originals, reconstructions: (N, C, H, W) in [0, 1], as `reconstruct` returns them.
        features: "fmnist" adds the rFID in the shipped Fashion-MNIST classifier's features (needs N >= 2).
    Returns:
        {"num_images", "mse" (pixels in [0, 1]), "psnr" (dB, of that MSE), and with features "fid"}.
    """
    mse = torch.mean((reconstructions.float() - originals.float()) ** 2).item()
    report = {"num_images": len(originals), "mse": mse, "psnr": 10 * math.log10(1 / max(mse, MSE_FLOOR))}
    if features == "fmnist":
        if len(originals) < 2:
            raise UserError("an FID needs at least 2 images; raise --count")
        report["fid"] = reconstruction_fid(originals, reconstructions)
    return report
