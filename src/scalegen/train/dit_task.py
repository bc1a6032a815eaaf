"""Training a DiT: the task (diffusion loss, sample grid) and `train_dit`, which builds a run from `DiTOptions`
in pixel space, in SD-VAE latents, or in the quantized features of one of our tokenizers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scalegen.checkpoint import RunFolder, guarded_run, keep_tokenizer_copy
from scalegen.data import FASHION_MNIST_NAME, limited, open_dataset, run_description
from scalegen.distributed import barrier, setup_distributed
from scalegen.diffusion.respace import create_diffusion
from scalegen.errors import UserError
from scalegen.files import json_config
from scalegen.images import grid_labels, save_grid
from scalegen.models.dit import DiT, DiTConfig, preset_config
from scalegen.pretrained import PIXEL_SPACE, load_tokenizer
from scalegen.tokenizers.codec import TokenizerCodec, measure_latent_scale
from scalegen.tokenizers.sd_vae import LATENT_CHANNELS, LATENT_DOWNSAMPLE, LatentCodec, load_sd_vae
from scalegen.train.init_from import fine_tuning_origin
from scalegen.train.caches import LatentCache, extract_latents
from scalegen.train.task import GRID_MAX_CLASSES, GRID_PER_CLASS, TrainingTask
from scalegen.train.trainer import TrainConfig, train

GRID_SAMPLER = "ddpm"


class DiTTask(TrainingTask):
    """DiT trained with the diffusion loss (MSE on ε + VLB on the variance), t uniform over all 1000 steps.

    The batch holds either pixels ("image", encoded on the fly through the codec when one is given) or cached
    latents ("latent"). Recipe: the DiT paper's (AdamW lr 1e-4, no weight decay, EMA 0.9999, batch 64 here).
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
        super().__init__(DiT(model_config, decoder=codec), extra_config)
        self.codec, self.vae = codec, vae
        self.diffusion = create_diffusion("", learn_sigma=model_config.learn_sigma)
        self.sample_steps, self.sample_cfg_scale = sample_steps, sample_cfg_scale

    def helpers(self) -> list[nn.Module]:
        return [self.codec] if self.codec is not None else []

    def config(self) -> dict:
        return {**super().config(), "vae": self.vae}

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

    def write_samples(self, model: nn.Module, path: Path) -> None:
        classes = list(range(min(model.config.num_classes, GRID_MAX_CLASSES)))
        labels = grid_labels(classes, GRID_PER_CLASS)
        images = model.generate(labels, cfg=self.sample_cfg_scale, steps=self.sample_steps, sampler=GRID_SAMPLER,
                                seed=0)  # (N, C, H, W) in [0, 1]
        save_grid(images, len(classes), path)


@dataclass
class DiTOptions:
    """What a DiT run trains besides the loop settings (`TrainConfig`): the model, its latent space, its data.

    Fields:
        model: preset name ("DiT-S/2" … "DiT-XL/8"); depth / hidden_size / num_heads / patch_size override it.
        data: "fashion-mnist", a folder of its IDX files, or an ImageNet-style folder.
        image_size: image side in pixels.
        vae: a local SD-VAE folder or file: diffuse its latents; None (or "none") for pixel space.
        tokenizer: a `train vqvae` run: diffuse its quantized features instead (not with vae).
        latent_cache: encode the data set once into RUN/latents.safetensors.
        block: the conditioning block ("adaln_zero", the paper's, or an ablation).
        class_dropout: label dropout for classifier-free guidance.
        learn_sigma: predict the variance interpolation too.
        sample_steps, sample_cfg: the periodic sample grid's DDPM steps and guidance scale.
        init_from: start from these weights (an official .pt/.pth, a run or an export): fine-tuning.
    """

    model: str = "DiT-S/2"
    data: str = FASHION_MNIST_NAME
    image_size: int = 32
    vae: str | None = None
    tokenizer: str | None = None
    latent_cache: bool = False
    block: str = "adaln_zero"
    class_dropout: float = 0.1
    learn_sigma: bool = True
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    sample_steps: int = 50
    sample_cfg: float = 4.0
    init_from: str | None = None

    @property
    def pixel_space(self) -> bool:
        return self.vae is None or self.vae.lower() == PIXEL_SPACE


def dit_model_config(options: DiTOptions, input_size: int, in_channels: int, num_classes: int) -> DiTConfig:
    """The DiT config for a training run: the preset on inputs (in_channels, input_size²), with any overrides
    (checked when the DiT is built)."""
    config = preset_config(
        options.model, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
        class_dropout_prob=options.class_dropout, learn_sigma=options.learn_sigma, block=options.block,
    )
    for name in ("depth", "hidden_size", "num_heads", "patch_size"):
        if getattr(options, name) is not None:
            setattr(config, name, getattr(options, name))
    return config


def tokenizer_latents(options: DiTOptions, dataset, run: RunFolder, device: str | None) -> tuple[TokenizerCodec, dict]:
    """The codec of `options.tokenizer` and its stored description; its weights are copied into the run folder."""
    tokenizer = load_tokenizer(options.tokenizer)
    if tokenizer.image_size != options.image_size or tokenizer.config.in_channels != dataset.channels:
        raise UserError(f"the tokenizer encodes {tokenizer.image_size}px images of {tokenizer.config.in_channels} "
                        f"channel(s), the data are {options.image_size}px with {dataset.channels}; match --image-size "
                        "or train a tokenizer on this data")
    context = setup_distributed(device)
    if context.is_main:
        keep_tokenizer_copy(tokenizer.state_dict(), run.root)
    latent_scale = measure_latent_scale(tokenizer, dataset, context.device)
    description = {"model": json_config(tokenizer.config), "source": str(Path(options.tokenizer).resolve()),
                   "latent_scale": latent_scale}
    return TokenizerCodec(tokenizer, latent_scale), description


def train_dit(options: DiTOptions, config: TrainConfig) -> dict[str, float]:
    """Train (or resume) a DiT run in `config.out`; returns the last logged figures.

    Args:
        options: the model, latent space and data.
        config: the loop settings; those left at None follow the DiT recipe (`DiTTask.recipe`).
    """
    with guarded_run(config.out):
        if options.tokenizer and not options.pixel_space:
            raise UserError("pass --vae or --tokenizer, not both: each chooses the latent space")
        run = RunFolder(config.out)
        dataset = limited(open_dataset(options.data, options.image_size), config.max_images)
        extra_config = run_description(options.data, options.image_size, dataset)
        if options.tokenizer:
            codec, extra_config["tokenizer"] = tokenizer_latents(options, dataset, run, config.device)
            in_channels, input_size = codec.tokenizer.z_channels, codec.tokenizer.patch_nums[-1]
        elif not options.pixel_space:
            if options.image_size % LATENT_DOWNSAMPLE:
                raise UserError(f"--image-size {options.image_size} must be a multiple of {LATENT_DOWNSAMPLE} with a VAE")
            codec, in_channels = load_sd_vae(options.vae), LATENT_CHANNELS
            input_size = options.image_size // LATENT_DOWNSAMPLE
        else:
            codec, in_channels, input_size = None, dataset.channels, options.image_size
        model_config = dit_model_config(options, input_size, in_channels, dataset.num_classes)
        if codec is not None and options.latent_cache:
            context = setup_distributed(config.device)
            if context.is_main and not run.latent_cache.exists():
                extract_latents(codec, dataset, run.latent_cache, device=context.device)
            barrier(context)  # under torchrun, the other ranks wait for rank 0's cache instead of writing it too
            dataset = LatentCache(run.latent_cache)  # batches now carry "latent"; the codec only decodes sample grids
        vae = None if options.pixel_space else options.vae
        torch.manual_seed(config.seed)  # the initial weights follow --seed (and are the same on every rank)
        task = DiTTask(model_config, codec, vae, options.sample_steps, options.sample_cfg, extra_config=extra_config)
        if options.init_from:
            task.extra_config["init_from"] = fine_tuning_origin(task.model, options.init_from, config.out)
        return train(task, dataset, config)
