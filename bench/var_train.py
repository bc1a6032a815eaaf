"""Benchmark: VAR training throughput (images/s) and peak memory, tokens computed on the fly by the tokenizer.

    python bench/var_train.py --depth 16 --image-size 256 --patch-nums 1,2,3,4,5,6,8,10,13,16 --batch-size 64 --device cuda --precision bf16
    python bench/var_train.py --depth 4 --image-size 32 --patch-nums 1,2,3,4,6,8 --batch-size 64 --device cpu

Randomly initialised weights and random images; one step = tokenize (frozen tokenizer), teacher-forced forward,
cross-entropy, backward, gradient clipping and an AdamW step with the VAR parameter groups.
"""
from __future__ import annotations

import argparse

import torch

from scalegen.mixed_precision import AUTOCAST_DTYPES
from scalegen.data.batch import Batch
from scalegen.data.names import IMAGES
from scalegen.files import json_config
from scalegen.train.var_task import VARTask
from scalegen.models.var import VARConfig
from scalegen.tokenizers.vqvae import build_vqvae

from timing import peak_memory_gib, seconds_per_call

NUM_CLASSES = 1000
GRAD_CLIP = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--patch-nums", default="1,2,3,4,5,6,8,10,13,16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = parser.parse_args()

    device = torch.device(args.device)
    patch_nums = tuple(int(side) for side in args.patch_nums.split(","))
    levels = (args.image_size // patch_nums[-1]).bit_length()  # ch_mult length giving that downsample ratio
    tokenizer = build_vqvae(vocab_size=4096, z_channels=32, ch=32, patch_nums=patch_nums, ch_mult=(1,) * levels,
                            num_res_blocks=1)
    config = VARConfig.for_depth(args.depth, num_classes=NUM_CLASSES, patch_nums=patch_nums, vocab_size=4096,
                                 z_channels=32)
    task = VARTask(config, tokenizer, {"model": json_config(tokenizer.config)})
    task.to(device)
    optimizer = torch.optim.AdamW(task.parameter_groups(0.05), lr=1e-4, betas=(0.9, 0.95))
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    batch = Batch(IMAGES, label=torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device), image=images)
    autocast = torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(args.precision, torch.bfloat16),
                              enabled=args.precision != "fp32")

    def step() -> None:
        with autocast:
            loss, _ = task.loss(task.model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = seconds_per_call(step, args.steps, 1, device)
    parameters = sum(parameter.numel() for parameter in task.model.parameters()) / 1e6
    print(f"VAR-d{args.depth} ({parameters:.1f}M params), {args.image_size}px, {sum(p * p for p in patch_nums)} tokens, "
          f"batch {args.batch_size}, {args.precision}, device {device}")
    print(f"{args.batch_size / seconds:.1f} images/s ({seconds * 1000:.0f} ms per step), "
          f"peak memory {peak_memory_gib(device):.2f} GiB")


if __name__ == "__main__":
    main()
