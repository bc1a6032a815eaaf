"""Drawing samples: DiT sampling loops, class-grid PNGs and ADM-format .npz files."""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from scalegen import metrics
from scalegen.data import to_uint8
from scalegen.distributed import DistributedContext, gather_tensors
from scalegen.dit import DiT
from scalegen.errors import UserError
from scalegen.respace import create_diffusion
from scalegen.sd_vae import LatentCodec
from scalegen.tokenizer_codec import TokenizerCodec

Sampler = Literal["ddpm", "ddim"]


@torch.no_grad()
def sample_dit(
    model: DiT,
    labels: torch.Tensor,
    cfg_scale: float = 4.0,
    steps: int = 250,
    sampler: Sampler = "ddpm",
    codec: LatentCodec | TokenizerCodec | None = None,
    noise: torch.Tensor | None = None,
    guide_all_channels: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Sample images of the given classes, as the official sample.py does.

    Args:
        model: a DiT in eval mode.
        labels: class ids (B,), on the model's device.
        cfg_scale: classifier-free guidance scale; 1.0 means no guidance (and no doubled batch).
        steps: number of respaced diffusion steps.
        sampler: "ddpm" (ancestral) or "ddim" (eta 0).
        codec: the SD VAE or tokenizer to decode latents with; None for a pixel-space model (x0 predictions are
            then clipped).
        noise: starting noise (B, C, h, w); drawn from the global torch RNG when None.
        guide_all_channels: guide every ε channel instead of the official first three (always, for a codec of
            our own whose `guide_all_channels` says so).
        progress: show a progress bar.
    Returns:
        Images (B, C, H, W) in [-1, 1] (clamped).
    """
    config = model.config
    device = labels.device
    guide_all_channels = guide_all_channels or (codec is not None and codec.guide_all_channels)
    shape = (len(labels), config.in_channels, config.input_size, config.input_size)
    diffusion = create_diffusion(f"ddim{steps}" if sampler == "ddim" else str(steps), learn_sigma=config.learn_sigma)
    latents = noise if noise is not None else torch.randn(shape, device=device)  # (B, C, h, w)
    if cfg_scale > 1.0:
        latents = torch.cat([latents, latents], dim=0)  # (2B, C, h, w)
        labels = torch.cat([labels, torch.full_like(labels, config.num_classes)], dim=0)  # (2B,)
        forward = partial(model.forward_with_cfg, cfg_scale=cfg_scale, guide_all_channels=guide_all_channels)
    else:
        forward = model.forward
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    # Pixels live in [-1, 1], so x0 predictions are clipped there (ADM's default); SD latents are unbounded (DiT).
    latents = loop(
        forward, latents.shape, noise=latents, clip_denoised=codec is None, model_kwargs={"y": labels},
        progress=progress,
    )  # (B or 2B, C, h, w)
    if cfg_scale > 1.0:
        latents = latents.chunk(2, dim=0)[0]  # (B, C, h, w)
    images = codec.decode(latents) if codec is not None else latents  # (B, C, H, W)
    return images.clamp(-1, 1)


def parse_classes(text: str, num_classes: int) -> list[int]:
    """"0,1,2" or "all" -> class ids, each checked against the model's number of classes."""
    if text == "all":
        return list(range(num_classes))
    try:
        classes = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"--classes {text!r} is not a comma-separated list of integers (or 'all')") from None
    bad = [label for label in classes if not 0 <= label < num_classes]
    if bad or not classes:
        raise UserError(f"class ids {bad or text} are out of range; this model has classes 0..{num_classes - 1}")
    return classes


def grid_labels(classes: list[int], per_class: int) -> torch.Tensor:
    """Labels laid out one row per class: (len(classes) * per_class,)."""
    return torch.tensor(classes).repeat_interleave(per_class)


def save_grid(images: torch.Tensor, rows: int, path: str | Path) -> Path:
    """Save images (N, C, H, W) in [-1, 1] as one PNG with `rows` rows (grayscale when C == 1)."""
    pixels = to_uint8(images.float().cpu())  # (N, C, H, W)
    count, channels, height, width = pixels.shape
    columns = -(-count // rows)
    canvas = torch.zeros(channels, rows * height, columns * width, dtype=torch.uint8)  # (C, rows·H, cols·W)
    for index, image in enumerate(pixels):
        row, column = divmod(index, columns)
        canvas[:, row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    array = canvas.permute(1, 2, 0).numpy()  # (rows·H, cols·W, C)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if channels == 1 else array).save(path)
    return path


def save_npz(images: np.ndarray, path: str | Path, labels: np.ndarray | None = None) -> Path:
    """Write uint8 images (N, H, W, 3) as an ADM-format .npz (`arr_0`); written to a temporary name first.

    The class labels, when given, go in an extra `labels` array (the ADM evaluator reads only `arr_0`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + ".partial.npz")
    metrics.write_npz(temporary, {"arr_0": images, **({} if labels is None else {metrics.LABELS_KEY: labels})})
    temporary.replace(path)
    return path


def sample_to_npz(
    draw: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    num_samples: int,
    batch_size: int,
    seed: int,
    path: str | Path,
    context: DistributedContext,
) -> Path | None:
    """Draw `num_samples` uniformly-labelled samples, sharded over ranks, into an ADM .npz (`arr_0`, `labels`).

    Each rank seeds the global RNG with seed·world + rank (as DiT's sample_ddp.py) and draws its share in batches;
    rank 0 gathers every batch and streams it into the file, so the samples never sit in memory all at once.

    Args:
        draw: labels (b,) on the context's device -> images (b, C, H, W) in [-1, 1].
        num_classes, num_samples, batch_size, seed: what to draw.
        path: the .npz to write (through a temporary name).
        context: this process's place in the torchrun group.
    Returns:
        The path written (rank 0), or None on other ranks.
    """
    per_rank = math.ceil(num_samples / context.world_size)
    torch.manual_seed(seed * context.world_size + context.rank)
    path = Path(path)
    temporary = path.with_name(path.stem + ".partial.npz")
    writer, written, all_labels = None, 0, []
    progress = tqdm(total=per_rank * context.world_size, desc="sampling", unit="img", disable=not context.is_main)
    for start in range(0, per_rank, batch_size):
        count = min(batch_size, per_rank - start)
        labels = torch.randint(0, num_classes, (count,), device=context.device)  # (b,)
        images = torch.from_numpy(to_adm_uint8(draw(labels))).to(context.device)  # (b, H, W, 3)
        images, labels = gather_tensors(images, context), gather_tensors(labels, context)  # (world·b, …)
        if context.is_main:
            if writer is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                writer = metrics.NpzWriter(temporary)
                writer.begin_images((num_samples, *images.shape[1:]))
            keep = min(len(images), num_samples - written)
            writer.add_images(images[:keep].cpu().numpy())
            all_labels.append(labels[:keep].cpu().numpy())
            written += keep
        progress.update(count * context.world_size)
    progress.close()
    if not context.is_main:
        return None
    writer.add_array(metrics.LABELS_KEY, np.concatenate(all_labels))
    writer.close()
    temporary.replace(path)
    print(f"wrote {path} with {num_samples} samples")
    return path


def to_adm_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, 3) as sample_ddp.py (grayscale repeated to 3 channels)."""
    pixels = to_uint8(images.float().cpu())  # (N, C, H, W)
    if pixels.shape[1] == 1:
        pixels = pixels.repeat(1, 3, 1, 1)  # (N, 3, H, W)
    return pixels.permute(0, 2, 3, 1).numpy()
