"""`scalegen train dit` and `scalegen sample dit`."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from scalegen.checkpoint import keep_tokenizer_copy, load_weights
from scalegen.data import open_dataset
from scalegen.distributed import barrier, cleanup, setup_distributed
from scalegen.dit import MODEL_SIZES, PRESETS, DiT, DiTConfig, preset_config
from scalegen.dit_blocks import BLOCK_KINDS
from scalegen.errors import UserError
from scalegen.objectives import DiTTask
from scalegen.sample import grid_labels, parse_classes, sample_dit, sample_to_npz, save_grid
from scalegen.sd_vae import LATENT_DOWNSAMPLE, LatentCache, LatentCodec, extract_latents, load_sd_vae
from scalegen.tokenizer_codec import TokenizerCodec, measure_latent_scale
from scalegen.train import add_training_options, train, train_config_from_args
from scalegen.var_commands import load_tokenizer, stored_tokenizer

LATENT_CACHE_FILE = "latents.safetensors"


def register(train_parsers, sample_parsers) -> None:
    """Add `train dit` and `sample dit` to the command line."""
    parser = train_parsers.add_parser("dit", help="train a diffusion transformer")
    parser.add_argument("--model", default="DiT-S/2", help=f"preset: {', '.join(PRESETS)}")
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist, a folder of its IDX files, or an image folder")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--vae", default="none", help="local SD-VAE folder/file for latent space, or none for pixels")
    parser.add_argument("--tokenizer", default=None, help="`train vqvae` run: diffuse its quantized features instead of pixels")
    parser.add_argument("--latent-cache", action="store_true", help="encode the data set once into RUN/latents.safetensors")
    parser.add_argument("--block", choices=BLOCK_KINDS, default="adaln_zero", help="conditioning block (paper ablation)")
    parser.add_argument("--class-dropout", type=float, default=0.1)
    parser.add_argument("--no-learn-sigma", dest="learn_sigma", action="store_false")
    parser.add_argument("--depth", type=int, help="override the preset's depth")
    parser.add_argument("--hidden-size", type=int, help="override the preset's width")
    parser.add_argument("--num-heads", type=int, help="override the preset's heads")
    parser.add_argument("--patch-size", type=int, help="override the preset's patch size")
    parser.add_argument("--sample-steps", type=int, default=50, help="steps of the periodic sample grid")
    parser.add_argument("--sample-cfg", type=float, default=4.0, help="guidance scale of the periodic sample grid")
    add_training_options(parser)
    parser.set_defaults(handler=train_dit)

    parser = sample_parsers.add_parser("dit", help="sample a DiT: a class grid (.png) or ADM samples (.npz)")
    parser.add_argument("--ckpt", required=True, help="run folder, checkpoint folder/file, or official DiT .pt")
    parser.add_argument("--out", required=True, help="grid.png, or samples.npz with --num-samples")
    parser.add_argument("--classes", default="all", help="comma-separated class ids, or all")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=0, help="write this many uniformly-labelled samples to .npz")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    parser.add_argument("--guide-all-channels", action="store_true", help="guide every ε channel, not the official 3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vae", default=None, help="override the VAE path stored in the checkpoint")
    parser.add_argument("--device", default=None)
    parser.set_defaults(handler=sample_dit_command)


def model_config_from_args(args, input_size: int, in_channels: int, num_classes: int) -> DiTConfig:
    """The DiT config for a training run: the preset on inputs (in_channels, input_size²), with any overrides."""
    config = preset_config(
        args.model,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        class_dropout_prob=args.class_dropout,
        learn_sigma=args.learn_sigma,
        block=args.block,
    )
    for name in ("depth", "hidden_size", "num_heads", "patch_size"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if config.input_size % config.patch_size:
        raise UserError(f"input size {config.input_size} is not divisible by patch size {config.patch_size}; change --model")
    return config


def train_dit(args: argparse.Namespace) -> None:
    """Train a DiT in pixel space, in SD-VAE latents, or in a tokenizer's features (on the fly or from a cache)."""
    if args.tokenizer and args.vae.lower() != "none":
        raise UserError("pass --vae or --tokenizer, not both: each chooses the latent space")
    dataset = open_dataset(args.data, args.image_size)
    extra_config = {"data": args.data, "image_size": args.image_size}
    if args.tokenizer:
        codec, extra_config["tokenizer"] = tokenizer_latents(args, dataset)
        in_channels, input_size = codec.tokenizer.z_channels, codec.tokenizer.patch_nums[-1]
    elif args.vae.lower() != "none":
        if args.image_size % LATENT_DOWNSAMPLE:
            raise UserError(f"--image-size {args.image_size} must be a multiple of {LATENT_DOWNSAMPLE} with a VAE")
        codec, in_channels, input_size = load_sd_vae(args.vae), 4, args.image_size // LATENT_DOWNSAMPLE
    else:
        codec, in_channels, input_size = None, dataset.channels, args.image_size
    config = model_config_from_args(args, input_size, in_channels, dataset.num_classes)
    if codec is not None and args.latent_cache:
        cache = Path(args.out) / LATENT_CACHE_FILE
        context = setup_distributed(args.device)
        if context.is_main and not cache.exists():
            extract_latents(codec, dataset, cache, device=context.device)
        barrier(context)  # under torchrun, the other ranks wait for rank 0's cache instead of writing it too
        dataset = LatentCache(cache)  # batches now carry "latent"; the codec only decodes sample grids
    vae = args.vae if args.vae.lower() != "none" else None
    task = DiTTask(config, codec, vae, args.sample_steps, args.sample_cfg, extra_config=extra_config)
    train(task, dataset, train_config_from_args(args))


def tokenizer_latents(args: argparse.Namespace, dataset) -> tuple[TokenizerCodec, dict]:
    """The codec of `--tokenizer` and its stored description; its weights are copied into the run folder."""
    tokenizer, tokenizer_config = load_tokenizer(args.tokenizer)
    if tokenizer.image_size != args.image_size or tokenizer.config.in_channels != dataset.channels:
        raise UserError(f"the tokenizer encodes {tokenizer.image_size}px images of {tokenizer.config.in_channels} "
                        f"channel(s), the data are {args.image_size}px with {dataset.channels}; match --image-size "
                        "or train a tokenizer on this data")
    context = setup_distributed(args.device)
    if context.is_main:
        keep_tokenizer_copy(tokenizer.state_dict(), Path(args.out))
    latent_scale = measure_latent_scale(tokenizer, dataset, context.device)
    description = {"model": tokenizer_config, "source": str(Path(args.tokenizer).resolve()), "latent_scale": latent_scale}
    return TokenizerCodec(tokenizer, latent_scale), description


def dit_config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> DiTConfig:
    """Infer the config of an official DiT checkpoint from its weight shapes (heads from the size table)."""
    try:
        tokens, hidden_size = state_dict["pos_embed"].shape[1:]
        patch_weight = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        depth = 1 + max(int(name.split(".")[1]) for name in state_dict if name.startswith("blocks."))
        num_heads = next(heads for (d, width, heads) in MODEL_SIZES.values() if width == hidden_size)
        out_features = state_dict["final_layer.linear.weight"].shape[0]
    except (KeyError, StopIteration, ValueError):
        raise UserError("the checkpoint is not a DiT state dict (pos_embed / x_embedder / blocks missing)") from None
    in_channels, patch_size = patch_weight.shape[1], patch_weight.shape[2]
    return DiTConfig(
        input_size=int(math.isqrt(tokens)) * patch_size, patch_size=patch_size, in_channels=in_channels,
        hidden_size=hidden_size, depth=depth, num_heads=num_heads,
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_features == patch_size * patch_size * in_channels * 2,
    )


def load_dit(path: str | Path) -> tuple[DiT, dict]:
    """A DiT in eval mode from a run folder, checkpoint, or official .pt; returns (model, stored config)."""
    stored, weights = load_weights(path)
    if stored is not None and stored.get("kind") != "dit":
        raise UserError(f"{path} holds a {stored.get('kind')} model, not a DiT; use `scalegen sample {stored.get('kind')}`")
    config = DiTConfig(**stored["model"]) if stored else dit_config_from_state_dict(weights)
    model = DiT(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise UserError(f"{path} does not match the DiT it describes: {str(error).splitlines()[0]}") from None
    return model.eval(), stored or {"kind": "dit", "vae": None}


def load_codec(ckpt: Path, stored: dict, config: DiTConfig, vae: str | None = None) -> LatentCodec | TokenizerCodec | None:
    """The decoder of a DiT's latents: its run's tokenizer, an SD VAE (`vae` overrides the stored path), or None (pixels)."""
    if "tokenizer" in stored:
        return TokenizerCodec(stored_tokenizer(ckpt, stored), stored["tokenizer"]["latent_scale"])
    vae = vae or stored.get("vae")
    if config.in_channels == 4 and not vae:
        raise UserError("this DiT works in SD-VAE latent space; pass --vae PATH to a local sd-vae-ft-ema/mse folder")
    return load_sd_vae(vae) if vae and vae.lower() != "none" else None


def sample_dit_command(args: argparse.Namespace) -> None:
    """Write a class grid PNG, or N uniformly-labelled samples as an ADM .npz (sharded over torchrun ranks)."""
    context = setup_distributed(args.device)
    model, stored = load_dit(args.ckpt)
    model.to(context.device)
    codec = load_codec(Path(args.ckpt), stored, model.config, args.vae)
    if codec is not None:
        codec.to(context.device)

    def draw(labels: torch.Tensor) -> torch.Tensor:
        return sample_dit(
            model, labels, args.cfg_scale, args.steps, args.sampler, codec, guide_all_channels=args.guide_all_channels
        )

    try:
        if args.num_samples:
            sample_to_npz(draw, model.config.num_classes, args.num_samples, args.batch_size, args.seed, args.out, context)
        else:
            if context.is_main:
                classes = parse_classes(args.classes, model.config.num_classes)
                torch.manual_seed(args.seed)
                images = torch.cat([draw(labels.to(context.device)) for labels in grid_labels(classes, args.per_class).split(args.batch_size)])
                print(f"wrote {save_grid(images, len(classes), args.out)}")
    finally:
        cleanup(context)
