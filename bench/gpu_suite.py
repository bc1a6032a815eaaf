"""Benchmark: the GPU table of the fast-path issue in one run, printed and written as JSON (bench/gpu_suite.sh).

    python bench/gpu_suite.py --json OUT.json            # one H100/H200: about 6 minutes
    python bench/gpu_suite.py --smoke --json OUT.json    # tiny models on any device (checks the script itself)

Rows: DiT-XL/2 256px bf16 training at batch 32 and 128, eager and with regional torch.compile (each block compiled);
DiT-XL/2 250-step DDPM sampling with guidance 1.5 (time of a few steps, scaled to 250); VAR-d16 training; VAR-d16
generation at batch 1 and 64 in bf16 with the static KV cache, eager and (on CUDA) replayed from CUDA graphs. Random
weights, random latents / images.

FLOP convention: 2 FLOPs per multiply-accumulate counted by torch's FLOP counter on one forward pass (fvcore's
convention: matmuls and convolutions; attention's full T×T), training = 3 × forward (backward ≈ 2 × forward),
guided sampling = 2 × forward per step. MFU = achieved FLOP/s / the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s).
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from scalegen.data.batch import Batch
from scalegen.data.names import TOKENS
from scalegen.diffusion.respace import create_diffusion
from scalegen.eval.flops import counted_flops
from scalegen.files import json_config
from scalegen.mixed_precision import autocast
from scalegen.models.dit import build_dit
from scalegen.models.var import VARConfig
from scalegen.tokenizers.vqvae import build_vqvae
from scalegen.train.var_task import VARTask

from timing import peak_memory_gib, seconds_per_call

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks, FLOP/s
TRAINING_TO_FORWARD = 3
NUM_CLASSES = 1000
DIT_SAMPLING_STEPS, DIT_TIMED_STEPS, DIT_CFG = 250, 10, 1.5
VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_VOCAB, VAR_Z = 4096, 32
SETTINGS = {  # full: the table; smoke: tiny models that run anywhere in seconds
    "full": {"dit": "DiT-XL/2", "latent": 32, "dit_batches": (32, 128), "sample_batch": 32, "var_depth": 16,
             "var_image": 256, "var_patch_nums": VAR_PATCH_NUMS, "var_batch": 64, "generate_batches": (1, 64)},
    "smoke": {"dit": "DiT-S/8", "latent": 16, "dit_batches": (2,), "sample_batch": 2, "var_depth": 2,
              "var_image": 32, "var_patch_nums": (1, 2, 4), "var_batch": 2, "generate_batches": (1, 2)},
}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, when it is a GPU we know."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)


def utilisation(flops_per_second: float, device: torch.device) -> float | None:
    peak = peak_flops(device)
    return 100 * flops_per_second / peak if peak else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def dit_training(preset: str, latent: int, batch: int, compiled: bool, device: torch.device, steps: int) -> dict:
    """One DiT training step (bf16 autocast, diffusion loss, backward, fused AdamW where available)."""
    reset_memory(device)
    model = build_dit(preset, input_size=latent, num_classes=NUM_CLASSES).to(device).train()
    if compiled:
        for block in model.blocks:
            block.compile()
    diffusion = create_diffusion("")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
    latents = torch.randn(batch, model.config.in_channels, latent, latent, device=device)  # (B, 4, h, w)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)  # (B,)

    def step() -> None:
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)  # (B,)
        with autocast("bf16", device):
            loss = diffusion.training_losses(model, latents, t, model_kwargs={"y": labels})["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    step()  # the first step compiles
    warm_seconds = time.perf_counter() - started
    seconds = seconds_per_call(step, steps, 2, device)
    forward = counted_flops(lambda: model(latents[:1], torch.zeros(1, device=device), labels[:1]))
    per_second = TRAINING_TO_FORWARD * forward * batch / seconds
    return {"row": f"{preset} training, batch {batch}, bf16{', compiled' if compiled else ''}",
            "images_per_second": batch / seconds, "tflops": per_second / 1e12, "mfu_percent": utilisation(per_second, device),
            "peak_memory_gib": peak_memory_gib(device), "first_step_seconds": warm_seconds}


def dit_sampling(preset: str, latent: int, batch: int, device: torch.device) -> dict:
    """DDPM sampling with guidance: a few steps of the 250-step loop, timed and scaled to 250."""
    reset_memory(device)
    model = build_dit(preset, input_size=latent, num_classes=NUM_CLASSES).to(device).eval()
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)  # (B,)
    run = lambda steps: model.generate(labels, cfg=DIT_CFG, steps=steps, sampler="ddpm", precision="bf16")  # noqa: E731
    seconds = seconds_per_call(lambda: run(DIT_TIMED_STEPS), 1, 1, device) / DIT_TIMED_STEPS * DIT_SAMPLING_STEPS
    forward = counted_flops(lambda: model(torch.randn(1, model.config.in_channels, latent, latent, device=device),
                                          torch.zeros(1, device=device), labels[:1]))
    per_second = 2 * forward * DIT_SAMPLING_STEPS * batch / seconds
    return {"row": f"{preset} {DIT_SAMPLING_STEPS}-step DDPM sampling, cfg {DIT_CFG}, batch {batch}, bf16",
            "images_per_second": batch / seconds, "tflops": per_second / 1e12,
            "mfu_percent": utilisation(per_second, device), "peak_memory_gib": peak_memory_gib(device)}


def var_task(settings: dict, device: torch.device) -> VARTask:
    patch_nums = settings["var_patch_nums"]
    levels = (settings["var_image"] // patch_nums[-1]).bit_length()  # ch_mult length giving that downsampling
    tokenizer = build_vqvae(vocab_size=VAR_VOCAB, z_channels=VAR_Z, ch=32, patch_nums=patch_nums,
                            ch_mult=(1,) * levels, num_res_blocks=1)
    config = VARConfig.for_depth(settings["var_depth"], num_classes=NUM_CLASSES, patch_nums=patch_nums,
                                 vocab_size=VAR_VOCAB, z_channels=VAR_Z)
    task = VARTask(config, tokenizer, {"model": json_config(tokenizer.config)})
    task.to(device)
    return task


def var_training(settings: dict, device: torch.device, steps: int) -> dict:
    """One VAR teacher-forcing step on cached tokens (bf16 autocast, backward, fused AdamW where available)."""
    reset_memory(device)
    task, batch = var_task(settings, device), settings["var_batch"]
    model = task.model.train()
    images = torch.rand(batch, 3, settings["var_image"], settings["var_image"], device=device) * 2 - 1
    with torch.no_grad():
        tokens = torch.cat(task.tokenizer.img_to_tokens(images), dim=1)  # (B, L)
    batch_data = Batch(TOKENS, label=torch.randint(0, NUM_CLASSES, (batch,), device=device), tokens=tokens)
    optimizer = torch.optim.AdamW(task.parameter_groups(0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")

    def step() -> None:
        with autocast("bf16", device):
            loss, _ = task.loss(model, batch_data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = seconds_per_call(step, steps, 2, device)
    var_input = task.tokenizer.tokens_to_var_input(list(tokens[:1].split(task.scale_lengths, dim=1)))
    forward = counted_flops(lambda: model(batch_data.label[:1], var_input))
    per_second = TRAINING_TO_FORWARD * forward * batch / seconds
    return {"row": f"VAR-d{settings['var_depth']} training, batch {batch}, bf16, token cache",
            "images_per_second": batch / seconds, "tflops": per_second / 1e12,
            "mfu_percent": utilisation(per_second, device), "peak_memory_gib": peak_memory_gib(device)}


def var_generation(settings: dict, batch: int, cuda_graphs: bool, device: torch.device) -> dict:
    """VAR generation with CFG 1.5, top-k 900, top-p 0.96 (the paper's FID setting), static KV cache, bf16, each
    scale's step replayed from a CUDA graph or not (the capture, on the first call, is not timed)."""
    reset_memory(device)
    model = var_task(settings, device).model.eval()
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)  # (B,)
    seconds = seconds_per_call(lambda: model.generate(labels, cfg=1.5, top_k=900, top_p=0.96, precision="bf16",
                                                      cuda_graphs=cuda_graphs), 2, 1, device)
    graphs = "CUDA graphs" if cuda_graphs else "eager"
    return {"row": f"VAR-d{settings['var_depth']} generation, batch {batch}, bf16, static KV cache, {graphs}",
            "images_per_second": batch / seconds, "peak_memory_gib": peak_memory_gib(device)}


def timed(rows: list[dict], measure: Callable[[], dict]) -> None:
    """Run one measurement, print its row at once, keep going when it fails (e.g. out of memory)."""
    try:
        row = measure()
    except (RuntimeError, torch.OutOfMemoryError) as error:
        row = {"row": getattr(measure, "label", "measurement"), "error": str(error).splitlines()[0]}
    rows.append(row)
    figures = ", ".join(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in row.items() if key != "row")
    print(f"{row['row']}: {figures}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="where to write the table")
    parser.add_argument("--smoke", action="store_true", help="tiny models: check the script on any device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per row")
    args = parser.parse_args()
    device, settings = torch.device(args.device), SETTINGS["smoke" if args.smoke else "full"]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu suite on {machine}, torch {torch.__version__}")
    rows: list[dict] = []
    for batch in settings["dit_batches"]:
        for compiled in (False, True):
            timed(rows, lambda: dit_training(settings["dit"], settings["latent"], batch, compiled, device, args.steps))
    timed(rows, lambda: dit_sampling(settings["dit"], settings["latent"], settings["sample_batch"], device))
    timed(rows, lambda: var_training(settings, device, args.steps))
    for batch in settings["generate_batches"]:
        for cuda_graphs in (False, True) if device.type == "cuda" else (False,):
            timed(rows, lambda: var_generation(settings, batch, cuda_graphs, device))
    with open(args.json, "w") as stream:
        json.dump({"machine": machine, "torch": torch.__version__, "rows": rows}, stream, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
