"""Benchmark: training and sampling compute of the shipped Fashion-MNIST DiT and VAR (FLOPs per image).

    python bench/shipped_compute.py [--steps-dit 6000 --batch-dit 128 --steps-var 3200 --batch-var 256]
                                    [--dit FOLDER --var FOLDER]   (default: the shipped models)
                                    [--repa-encoder FILE]         (the DiT's, when not where it was trained)

Training FLOPs per image are counted by torch's FLOP counter over one loss + backward of each model on the data it
trains on (the DiT with its objective and REPA on cached tokenizer latents, the VAR on cached tokens: the frozen
tokenizer is not counted);
sampling FLOPs per image over one call of the demo's sampler (network, guidance and tokenizer decoder). With the
recipe's steps and batch sizes it also prints each model's total training FLOPs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from recipes import training_flops_per_image
from scalegen.cli.demo import dit_drawer, flops_per_image, var_drawer
from scalegen.eval.flops import GIGA, counted_flops
from scalegen.runs.loading import load_var
from scalegen.runs.names import SHIPPED_DIT, SHIPPED_VAR

BATCH = 4


def var_training_flops(folder: str) -> float:
    """FLOPs of one teacher-forced cross-entropy forward + backward per image of the VAR."""
    model = load_var(folder)
    tokenizer = model.tokenizer
    side = tokenizer.image_size
    tokens = tokenizer.img_to_tokens(torch.rand(BATCH, tokenizer.config.in_channels, side, side) * 2 - 1)
    var_input = tokenizer.tokens_to_var_input(tokens)  # (B, L - 1, Cvae)
    targets = torch.cat(tokens, dim=1)  # (B, L)
    model.train()
    return counted_flops(lambda: F.cross_entropy(model(torch.arange(BATCH), var_input).transpose(1, 2), targets)
                         .backward()) / BATCH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-dit", type=int, default=6000)
    parser.add_argument("--batch-dit", type=int, default=128)
    parser.add_argument("--steps-var", type=int, default=3200)
    parser.add_argument("--batch-var", type=int, default=256)
    parser.add_argument("--dit", default=str(SHIPPED_DIT), help="DiT folder (default: the shipped one)")
    parser.add_argument("--var", default=str(SHIPPED_VAR), help="VAR folder (default: the shipped one)")
    parser.add_argument("--repa-encoder", default=None, help="the DiT's REPA encoder, if not where it was trained")
    args = parser.parse_args()
    rows = (
        ("DiT", training_flops_per_image(Path(args.dit), args.repa_encoder), flops_per_image(dit_drawer(args.dit)), args.steps_dit * args.batch_dit),
        ("VAR", var_training_flops(args.var), flops_per_image(var_drawer(args.var)), args.steps_var * args.batch_var),
    )
    for name, training, sampling, images in rows:
        print(f"{name}: training {training / GIGA:.3f} GFLOPs/image × {images} images = {training * images / 1e15:.3f} "
              f"PFLOPs; sampling {sampling / GIGA:.3f} GFLOPs/image")


if __name__ == "__main__":
    main()
