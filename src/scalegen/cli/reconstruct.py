"""`scalegen reconstruct`: images through a tokenizer and back — a grid of pairs, PSNR and (optionally) rFID."""
from __future__ import annotations

import argparse
import json
from typing import get_args

from scalegen.classes import FASHION_MNIST_NAME
from scalegen.cli.options import DATA_HELP
from scalegen.cli.parsing import POSITIVE
from scalegen.eval.settings import GRID_PAIRS, RECONSTRUCTION_BATCH_SIZE, Features

DEFAULT_COUNT = 1000


def run_reconstruct(args: argparse.Namespace) -> None:
    """Handler of `scalegen reconstruct`: writes the grid, prints the figures as JSON."""
    import torch  # and the models: only once the command runs

    from scalegen.data.registry import open_source
    from scalegen.eval.reconstruction import (
        data_image_size, load_autoencoder, reconstruct, reconstruction_report, save_pairs_grid,
    )
    from scalegen.images import check_image_output

    check_image_output(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autoencoder = load_autoencoder(args.tokenizer).to(device)
    dataset = open_source(args.data, data_image_size(autoencoder, args.image_size))
    originals, reconstructions = reconstruct(autoencoder, dataset, args.count, args.batch_size)
    report = reconstruction_report(originals, reconstructions, args.features)
    print(json.dumps({**report, "grid": str(save_pairs_grid(originals, reconstructions, args.out))}, indent=2))


def register(commands) -> None:
    """Add `scalegen reconstruct` to the command line."""
    parser = commands.add_parser(
        "reconstruct", help="images through a tokenizer and back: a grid of pairs, PSNR, rFID",
        description="Encode and decode real images with a tokenizer; write the originals beside their "
                    f"reconstructions (the first {GRID_PAIRS} pairs) and print MSE and PSNR as JSON — with "
                    "--features fmnist also rFID, the FID of the reconstructions against their originals in the "
                    "shipped Fashion-MNIST classifier's features.")
    parser.add_argument("--tokenizer", required=True,
                        help="`train vqvae` run, checkpoint or export, a DiT or VAR run holding a tokenizer, "
                             "an official vae .pth, or a local SD-VAE folder (diffusers AutoencoderKL)")
    parser.add_argument("--data", default=FASHION_MNIST_NAME, help=DATA_HELP)
    parser.add_argument("--out", required=True, help="grid PNG: each original with its reconstruction on its right")
    parser.add_argument("--image-size", type=POSITIVE, default=None,
                        help="image side to open the data at (default: the tokenizer's; needed for an SD VAE)")
    parser.add_argument("--count", type=POSITIVE, default=DEFAULT_COUNT, help="images to reconstruct (and score)")
    parser.add_argument("--features", choices=get_args(Features), default=None,
                        help="fmnist: add rFID in the shipped Fashion-MNIST classifier's features")
    parser.add_argument("--batch-size", type=POSITIVE, default=RECONSTRUCTION_BATCH_SIZE, help="images per pass")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.set_defaults(handler=run_reconstruct)
