"""Benchmark: the floor each latent space puts under a DiT — its tokenizer's reconstructions of real images.

    python bench/latent_spaces.py NAME=TOKENIZER [NAME=TOKENIZER …] [--count 10000] [--json bench/latent_spaces.json]

TOKENIZER is anything `scalegen reconstruct --tokenizer` takes (a `train vqvae` or `train kl` run or export, a DiT
run or export holding its tokenizer). The first `count` Fashion-MNIST training images go through each tokenizer and
back (a VQ tokenizer's tokens, a KL tokenizer's posterior mean); printed per tokenizer: the FID of the
reconstructions against the real test set and the accuracy of their true labels in the shipped classifier's features
(what `scalegen eval --features fmnist` reports for samples: a model that draws through this decoder cannot do
better), the rFID against their originals, and PSNR. The real images themselves are the first row. Points already in
the JSON file are kept. Not a test: it prints figures.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from scalegen.classes import FASHION_MNIST_NAME
from scalegen.data.registry import open_source
from scalegen.data.source import unflipped_loader
from scalegen.eval.fmnist import fmnist_report
from scalegen.eval.reconstruction import load_autoencoder, reconstruct, reconstruction_report

IMAGE_SIZE = 32
REAL = "real images"


def labels_of(dataset, count: int) -> torch.Tensor:
    """The labels of the first `count` images, in `reconstruct`'s order."""
    return torch.cat([batch.label for batch in unflipped_loader(dataset, 1000, count)])  # (N,)


def score(name: str, path: str | None, count: int) -> dict:
    """The figures of one tokenizer (or of the real images, path None)."""
    dataset = open_source(FASHION_MNIST_NAME, IMAGE_SIZE)
    labels = labels_of(dataset, count)
    start = time.perf_counter()
    if path is None:
        originals = torch.cat([batch.image for batch in unflipped_loader(dataset, 1000, count)]) * 0.5 + 0.5
        reconstructions, figures = originals, {}
    else:
        autoencoder = load_autoencoder(path).eval()
        originals, reconstructions = reconstruct(autoencoder, dataset, count)  # (N, 1, 32, 32) each, in [0, 1]
        figures = reconstruction_report(originals, reconstructions, "fmnist")
        figures["rfid"] = figures.pop("fid")
    report = fmnist_report(reconstructions * 2 - 1, labels)
    return {"name": name, "tokenizer": path, "fid": report["fid"], "accuracy": report["accuracy"],
            "count": len(labels), **figures, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizers", nargs="+", help="NAME=PATH of each tokenizer")
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--json", default="bench/latent_spaces.json")
    args = parser.parse_args()
    path = Path(args.json)
    points = json.loads(path.read_text()) if path.exists() else {}
    for name, tokenizer in [(REAL, None)] + [entry.split("=", 1) for entry in args.tokenizers]:
        if name not in points:
            points[name] = score(name, tokenizer, args.count)
            path.write_text(json.dumps(points, indent=2))
        point = points[name]
        extra = f"   rFID {point['rfid']:6.3f}   PSNR {point['psnr']:5.2f} dB" if "rfid" in point else ""
        print(f"{name:<28} FID {point['fid']:7.3f}   accuracy {point['accuracy']:.3f}{extra}   ({point['count']} images)")


if __name__ == "__main__":
    main()
