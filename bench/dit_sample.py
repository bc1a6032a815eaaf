"""Benchmark: DiT sampling throughput (images/s) and peak memory.

    python bench/dit_sample.py --model DiT-XL/2 --image-size 256 --batch-size 32 --steps 250 --cfg-scale 1.5 --device cuda
    python bench/dit_sample.py --model DiT-S/2 --image-size 64 --batch-size 8 --steps 10 --device cpu

Times the diffusion loop only (random latents, randomly initialised weights; the VAE decode is not included).
"""
from __future__ import annotations

import argparse
import time

import torch

from scalegen.models.dit import build_dit
from scalegen.tokenizers.sd_vae import LATENT_DOWNSAMPLE
from scalegen.mixed_precision import AUTOCAST_DTYPES

from timing import peak_memory_gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = parser.parse_args()

    device = torch.device(args.device)
    model = build_dit(args.model, input_size=args.image_size // LATENT_DOWNSAMPLE).to(device).eval()
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(args.precision, torch.bfloat16), enabled=args.precision != "fp32")

    def run(steps: int) -> None:
        with autocast:
            model.generate(labels, cfg=args.cfg_scale, steps=steps, sampler=args.sampler)  # raw latents: no decoder

    run(2)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    run(args.steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(f"model {args.model} at {args.image_size}px, batch {args.batch_size}, {args.steps} {args.sampler} steps, "
          f"cfg {args.cfg_scale}, {args.precision}, device {device}")
    print(f"{args.batch_size / seconds:.2f} images/s ({seconds / args.steps * 1000:.1f} ms per step), "
          f"peak memory {peak_memory_gib(device):.2f} GiB")


if __name__ == "__main__":
    main()
