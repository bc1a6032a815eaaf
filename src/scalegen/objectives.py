"""Training tasks: what the one trainer needs to know about each model (its loss, config and sample grid)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from scalegen.dit import DiT, DiTConfig
from scalegen.respace import create_diffusion
from scalegen.sample import grid_labels, sample_dit, save_grid
from scalegen.sd_vae import LatentCodec
from scalegen.tokenizer_codec import TokenizerCodec

GRID_PER_CLASS = 8
GRID_MAX_CLASSES = 10


class DiTTask:
    """DiT trained with the diffusion loss (MSE on ε + VLB on the variance), t uniform over all 1000 steps.

    The batch holds either pixels ("image", encoded on the fly through the VAE when one is given) or cached
    latents ("latent").
    """

    kind = "dit"

    def __init__(
        self,
        model_config: DiTConfig,
        codec: LatentCodec | TokenizerCodec | None = None,
        vae: str | None = None,
        sample_steps: int = 50,
        sample_cfg_scale: float = 4.0,
        extra_config: dict | None = None,
    ):
        self.model = DiT(model_config)
        self.codec, self.vae = codec, vae
        self.diffusion = create_diffusion("", learn_sigma=model_config.learn_sigma)
        self.sample_steps, self.sample_cfg_scale = sample_steps, sample_cfg_scale
        self.extra_config = extra_config or {}
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> None:
        self.device = device
        self.model.to(device)
        if self.codec is not None:
            self.codec.to(device)

    def config(self) -> dict:
        return {"kind": self.kind, "model": asdict(self.model.config), "vae": self.vae, **self.extra_config}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        if "latent" in batch:
            x_start = batch["latent"]  # (B, C_latent, h, w)
        elif self.codec is not None:
            x_start = self.codec.encode(batch["image"])  # (B, C_latent, h, w)
        else:
            x_start = batch["image"]  # (B, C, H, W)
        t = torch.randint(0, self.diffusion.num_timesteps, (x_start.shape[0],), device=x_start.device)  # (B,)
        terms = self.diffusion.training_losses(model, x_start, t, model_kwargs={"y": batch["label"]})
        extra = {name: terms[name].mean().item() for name in ("mse", "vb") if name in terms}
        return terms["loss"].mean(), extra

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        return [{"params": trainable, "weight_decay": weight_decay}]

    def write_samples(self, model: nn.Module, path: Path) -> None:
        classes = list(range(min(model.config.num_classes, GRID_MAX_CLASSES)))
        labels = grid_labels(classes, GRID_PER_CLASS).to(self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(0)
            images = sample_dit(model, labels, self.sample_cfg_scale, self.sample_steps, "ddpm", self.codec)
        save_grid(images, len(classes), path)
