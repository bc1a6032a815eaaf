"""Benchmark: DiT training throughput (images/s), peak memory and model FLOPs utilisation.

    python bench/dit_train.py --model DiT-XL/2 --image-size 256 --batch-size 32 --device cuda --precision bf16
    python bench/dit_train.py --model DiT-S/2 --image-size 64 --batch-size 8 --device cpu

Times full training steps (forward, diffusion loss, backward, AdamW, EMA) on random latents, as training on
pre-extracted latents does. Not a test: it prints figures.
"""
from __future__ import annotations

import argparse

import torch

from scalegen.models.dit import build_dit
from scalegen.eval.flops import dit_forward_macs
from scalegen.diffusion.respace import create_diffusion
from scalegen.tokenizers.sd_vae import LATENT_DOWNSAMPLE
from scalegen.train.optimization import update_ema
from scalegen.mixed_precision import AUTOCAST_DTYPES

from timing import peak_memory_gib, seconds_per_call

# Dense bf16 peak of the GPUs we report on (tensor cores, no sparsity), in FLOP/s.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
LATENT_CHANNELS = 4
BACKWARD_TO_FORWARD = 2  # a backward pass costs about twice the forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--image-size", type=int, default=256, help="pixels; the latent is image/8 × 4 channels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    latent_size = args.image_size // LATENT_DOWNSAMPLE
    model = build_dit(args.model, input_size=latent_size, num_classes=1000).to(device).train()
    model.gradient_checkpointing = args.gradient_checkpointing
    ema = build_dit(args.model, input_size=latent_size, num_classes=1000).to(device).requires_grad_(False)
    network = torch.compile(model) if args.compile else model
    diffusion = create_diffusion("")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    latents = torch.randn(args.batch_size, LATENT_CHANNELS, latent_size, latent_size, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(args.precision, torch.bfloat16), enabled=args.precision != "fp32")
    scaler = torch.amp.GradScaler(enabled=args.precision == "fp16")

    def step() -> None:
        t = torch.randint(0, diffusion.num_timesteps, (args.batch_size,), device=device)
        with autocast:
            loss = diffusion.training_losses(network, latents, t, model_kwargs={"y": labels})["loss"].mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.9999)

    seconds = seconds_per_call(step, args.steps, args.warmup, device)
    images_per_second = args.batch_size / seconds
    config = model.config
    forward_flops = 2 * dit_forward_macs(config.depth, config.hidden_size, config.patch_size, latent_size)
    achieved = forward_flops * (1 + BACKWARD_TO_FORWARD) * images_per_second
    print(f"model {args.model} at {args.image_size}px, batch {args.batch_size}, {args.precision}, device {device}"
          f"{', compiled' if args.compile else ''}{', checkpointing' if args.gradient_checkpointing else ''}")
    print(f"step time {seconds * 1000:.1f} ms, {images_per_second:.1f} images/s, peak memory {peak_memory_gib(device):.2f} GiB")
    print(f"achieved {achieved / 1e12:.2f} TFLOP/s (3 × forward FLOPs × images/s)")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((value for key, value in PEAK_FLOPS.items() if key in name), None)
        if peak:
            print(f"model FLOPs utilisation {100 * achieved / peak:.1f}% of {name}'s dense bf16 peak")


if __name__ == "__main__":
    main()
