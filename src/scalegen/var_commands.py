"""`scalegen train vqvae`, `train var`, `sample var` and `edit var`.

A VAR run folder holds a copy of its tokenizer (RUN/tokenizer.safetensors, its config inside the VAR's config),
so `sample var` and `edit var` rebuild both models from the run alone.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from scalegen.checkpoint import TOKENIZER_FILE, find_tokenizer_copy, keep_tokenizer_copy, load_weights
from scalegen.data import center_crop_arr, open_dataset, to_model_range
from scalegen.distributed import barrier, cleanup, setup_distributed
from scalegen.errors import UserError
from scalegen.lpips import load_lpips
from scalegen.quantizer import phi_indices
from scalegen.sample import grid_labels, parse_classes, sample_to_npz, save_grid
from scalegen.train import add_training_options, train, train_config_from_args
from scalegen.var import VAR, VARConfig
from scalegen.var_edit import box_mask
from scalegen.var_objectives import TokenCache, TokenizerLosses, VARTask, VQVAETask, extract_tokens, json_config
from scalegen.vqvae import PATCH_NUMS_256, PATCH_NUMS_512, VQVAE, VQVAEConfig

TOKEN_CACHE_FILE = "tokens.safetensors"
GRID_IMAGES = 8  # inputs shown (over their reconstructions) in the tokenizer's sample grid
VAR_BATCH_REFERENCE = 256  # official rule: lr = base_lr · batch / 256
WARMUP_FRACTION = 50  # official warm-up: the first 1/50 of training


def integers(text: str) -> tuple[int, ...]:
    """"1,2,3" → (1, 2, 3) for argparse."""
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def register(train_parsers, sample_parsers, commands) -> None:
    """Add `train vqvae`, `train var`, `sample var` and `edit var` to the command line."""
    parser = train_parsers.add_parser("vqvae", help="train VAR's multi-scale VQVAE tokenizer")
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist, a folder of its IDX files, or an image folder")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-nums", type=integers, default=(1, 2, 3, 4, 6, 8), help="token grid side per scale")
    parser.add_argument("--ch", type=int, default=32, help="base width of encoder and decoder")
    parser.add_argument("--ch-mult", type=integers, default=(1, 2, 2), help="width multiplier per resolution level")
    parser.add_argument("--num-res-blocks", type=int, default=2)
    parser.add_argument("--norm-groups", type=int, default=32, help="GroupNorm groups (divide every level width)")
    parser.add_argument("--no-attention", dest="use_attention", action="store_false", help="no attention blocks")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--z-channels", type=int, default=16)
    parser.add_argument("--share-quant-resi", type=int, default=4, help="φ convs shared over scales (0: one per scale)")
    parser.add_argument("--l1", type=float, default=1.0, help="weight of the L1 reconstruction loss")
    parser.add_argument("--l2", type=float, default=1.0, help="weight of the L2 reconstruction loss")
    parser.add_argument("--quantizer-weight", type=float, default=1.0)
    parser.add_argument("--lpips-weights", default=None, help="local LPIPS-VGG state dict; enables the perceptual loss")
    parser.add_argument("--lpips-weight", type=float, default=1.0, help="weight of LPIPS (with --lpips-weights)")
    parser.add_argument("--gan-weight", type=float, default=0.0, help="patch-GAN weight (0: no GAN)")
    parser.add_argument("--gan-start-step", type=int, default=0, help="step at which the GAN loss starts")
    parser.add_argument("--disc-width", type=int, default=64)
    parser.add_argument("--disc-layers", type=int, default=3)
    parser.add_argument("--disc-lr", type=float, default=None, help="discriminator lr (default: --lr)")
    parser.add_argument("--dead-code-every", type=int, default=100, help="re-initialise dead codes every N steps (0: never)")
    add_training_options(parser)
    parser.set_defaults(handler=train_vqvae, ema_decay=0.0, lr=2e-4)  # tokenizers train without EMA officially

    parser = train_parsers.add_parser("var", help="train a VAR transformer on a trained tokenizer")
    parser.add_argument("--tokenizer", required=True, help="`train vqvae` run folder, checkpoint, or official vae .pth")
    parser.add_argument("--depth", type=int, default=16, help="blocks; width 64·depth and depth heads unless overridden")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-heads", type=int, default=None)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--image-size", type=int, default=None, help="default: the tokenizer's image size")
    parser.add_argument("--token-cache", action="store_true", help="tokenize the data set once into RUN/tokens.safetensors")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--label-dropout", type=float, default=0.1, help="class dropout for classifier-free guidance")
    parser.add_argument("--base-lr", type=float, default=1e-4, help="lr = base_lr · batch / 256 unless --lr is given")
    parser.add_argument("--sample-cfg", type=float, default=4.0, help="guidance of the periodic sample grid")
    parser.add_argument("--sample-top-p", type=float, default=0.95)
    add_training_options(parser)
    # The official VAR recipe: AdamW (0.9, 0.95), wd 0.05, clip 2, warm-up then linear decay to 0.1, no EMA.
    parser.set_defaults(handler=train_var, lr=None, weight_decay=0.05, grad_clip=2.0, lr_decay_to=0.1,
                        warmup_steps=None, ema_decay=0.0, betas=(0.9, 0.95))

    parser = sample_parsers.add_parser("var", help="sample a VAR: a class grid (.png) or ADM samples (.npz)")
    add_loading_options(parser)
    parser.add_argument("--out", required=True, help="grid.png, or samples.npz with --num-samples")
    parser.add_argument("--classes", default="all", help="comma-separated class ids, or all")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=0, help="write this many uniformly-labelled samples to .npz")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.set_defaults(handler=sample_var)

    edit_parsers = commands.add_parser("edit", help="zero-shot editing").add_subparsers(dest="model", required=True)
    parser = edit_parsers.add_parser("var", help="in-paint or out-paint a box of an image with a VAR")
    add_loading_options(parser)
    parser.add_argument("--image", required=True, help="input image (center-cropped and resized to the model's size)")
    parser.add_argument("--box", required=True, help="x0,y0,x1,y1 in pixels of the resized image")
    parser.add_argument("--mode", choices=["inpaint", "outpaint"], default="inpaint")
    parser.add_argument("--class", dest="class_id", type=int, default=None, help="class id (default: unconditional)")
    parser.add_argument("--out", required=True, help="edited image .png; the input and the mask are written beside it")
    parser.set_defaults(handler=edit_var)


def add_loading_options(parser) -> None:
    """Options shared by `sample var` and `edit var`."""
    parser.add_argument("--ckpt", required=True, help="VAR run folder, checkpoint folder/file, or official var_d*.pth")
    parser.add_argument("--tokenizer", default=None, help="override the tokenizer stored with the run")
    parser.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance (ramped over scales)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax smoothing (visualisation only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)


# ----- training -----

def train_vqvae(args: argparse.Namespace) -> None:
    """Train a multi-scale VQVAE tokenizer (channels follow the data set)."""
    dataset = open_dataset(args.data, args.image_size)
    config = VQVAEConfig(
        vocab_size=args.vocab_size, z_channels=args.z_channels, ch=args.ch, ch_mult=args.ch_mult,
        num_res_blocks=args.num_res_blocks, patch_nums=args.patch_nums, share_quant_resi=args.share_quant_resi,
        in_channels=dataset.channels, norm_groups=args.norm_groups, use_attention=args.use_attention,
        use_mid_attention=args.use_attention,
    )
    if config.image_size != args.image_size:
        raise UserError(
            f"last --patch-nums {config.patch_nums[-1]} × downsample {config.downsample_ratio} (from --ch-mult) = "
            f"{config.image_size}, not --image-size {args.image_size}; end --patch-nums with "
            f"{args.image_size // config.downsample_ratio}"
        )
    phi_count, scale_count = config.share_quant_resi, len(config.patch_nums)
    if phi_count > 1 and len(set(phi_indices(scale_count, phi_count))) < phi_count:
        # An unused φ conv never gets a gradient, which data-parallel training refuses.
        raise UserError(f"--share-quant-resi {phi_count} leaves a φ conv unused with {scale_count} scales; "
                        f"use fewer (e.g. {min(3, scale_count)}) or more --patch-nums")
    losses = TokenizerLosses(
        l1=args.l1, l2=args.l2, quantizer=args.quantizer_weight, lpips=args.lpips_weight if args.lpips_weights else 0.0,
        gan=args.gan_weight, gan_start_step=args.gan_start_step, discriminator_width=args.disc_width,
        discriminator_layers=args.disc_layers, discriminator_lr=args.disc_lr or args.lr,
        dead_code_every=args.dead_code_every,
    )
    lpips = load_lpips(args.lpips_weights) if args.lpips_weights else None
    items = (dataset[(index, False)] for index in range(min(len(dataset), 4 * GRID_IMAGES)))
    grid_images = torch.stack([item["image"] for item in items if item is not None][:GRID_IMAGES])  # (N, C, H, W)
    torch.manual_seed(args.seed)  # identical initial weights (the discriminator too) on every rank
    task = VQVAETask(config, losses, grid_images, lpips, extra_config={"data": args.data, "image_size": args.image_size})
    train(task, dataset, train_config_from_args(args))


def train_var(args: argparse.Namespace) -> None:
    """Train a VAR on a frozen tokenizer, copying the tokenizer into the run folder."""
    tokenizer, tokenizer_config = load_tokenizer(args.tokenizer)
    image_size = args.image_size or tokenizer.image_size
    if image_size != tokenizer.image_size:
        raise UserError(f"this tokenizer encodes {tokenizer.image_size}px images; drop --image-size or pass "
                        f"--image-size {tokenizer.image_size}")
    dataset = open_dataset(args.data, image_size)
    if dataset.channels != tokenizer.config.in_channels:
        raise UserError(f"the data have {dataset.channels} channel(s) but the tokenizer encodes "
                        f"{tokenizer.config.in_channels}; train a tokenizer on this data first")
    overrides = {name: getattr(args, name) for name in ("width", "num_heads") if getattr(args, name) is not None}
    config = VARConfig.for_depth(
        args.depth, num_classes=dataset.num_classes, patch_nums=tokenizer.patch_nums, vocab_size=tokenizer.vocab_size,
        z_channels=tokenizer.z_channels, label_dropout=args.label_dropout, **overrides,
    )
    if config.width % config.num_heads:
        raise UserError(f"width {config.width} is not divisible by {config.num_heads} heads; change --width or --num-heads")
    if args.lr is None:
        args.lr = args.base_lr * args.batch_size / VAR_BATCH_REFERENCE
    if args.warmup_steps is None:
        args.warmup_steps = args.steps // WARMUP_FRACTION
    run_dir = Path(args.out)
    context = setup_distributed(args.device)
    if context.is_main:
        keep_tokenizer_copy(tokenizer.state_dict(), run_dir)
        if args.token_cache and not (run_dir / TOKEN_CACHE_FILE).exists():
            extract_tokens(tokenizer, dataset, run_dir / TOKEN_CACHE_FILE, device=context.device)
    barrier(context)  # the other ranks wait for the token cache
    if args.token_cache:
        dataset = TokenCache(run_dir / TOKEN_CACHE_FILE)
    torch.manual_seed(args.seed)
    tokenizer_info = {"model": tokenizer_config, "source": str(Path(args.tokenizer).resolve())}
    task = VARTask(config, tokenizer, tokenizer_info, args.label_smoothing, args.sample_cfg, args.sample_top_p,
                   extra_config={"data": args.data, "image_size": image_size})
    train(task, dataset, train_config_from_args(args))


# ----- loading -----

def load_tokenizer(path: str | Path, official_patch_nums: tuple[int, ...] = PATCH_NUMS_256) -> tuple[VQVAE, dict]:
    """A tokenizer in eval mode from a `train vqvae` run/checkpoint or an official vae .pth.

    Args:
        path: the run folder, checkpoint or .pth file.
        official_patch_nums: scales to use with an official file, which stores none (the same weights serve the
            256px and the 512px VARs).
    Returns:
        (tokenizer, its config as stored in JSON).
    """
    if not Path(path).exists():
        raise UserError(f"tokenizer {path} not found; pass --tokenizer RUN (from `scalegen train vqvae`) "
                        "or a local vae_ch160v4096z32.pth")
    stored, weights = load_weights(path)
    if stored is not None and stored.get("kind") != "vqvae":
        raise UserError(f"{path} holds a {stored.get('kind')} model, not a tokenizer; pass a `train vqvae` run")
    config = VQVAEConfig(**stored["model"]) if stored else VQVAEConfig(patch_nums=official_patch_nums)
    return build_loaded(VQVAE(config), weights, path), json_config(config)


def build_loaded(model, weights: dict[str, torch.Tensor], path: str | Path):
    """Load `weights` strictly into `model`, turning a mismatch into a one-line error; returns it in eval mode."""
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise UserError(f"{path} does not match the model it describes: {str(error).splitlines()[0]}") from None
    return model.eval()


def stored_tokenizer(ckpt: Path, stored: dict) -> VQVAE:
    """The tokenizer copied into a VAR (or tokenizer-latent DiT) run, found by `find_tokenizer_copy`, else its source."""
    copy = find_tokenizer_copy(ckpt)
    if copy is not None:
        return build_loaded(VQVAE(VQVAEConfig(**stored["tokenizer"]["model"])), load_file(copy), copy)
    source = stored["tokenizer"].get("source")
    if source and Path(source).exists():
        return load_tokenizer(source)[0]
    raise UserError(f"no {TOKENIZER_FILE} beside {ckpt} and the original tokenizer {source} is gone; pass --tokenizer")


def var_config_from_state_dict(weights: dict[str, torch.Tensor], tokenizer: VQVAE) -> VARConfig:
    """Config of an official VAR checkpoint from its weight shapes (heads = depth, as every official model)."""
    try:
        width = weights["class_emb.weight"].shape[1]
        num_classes = weights["class_emb.weight"].shape[0] - 1
        depth = 1 + max(int(name.split(".")[1]) for name in weights if name.startswith("blocks."))
    except (KeyError, ValueError):
        raise UserError("the checkpoint is not a VAR state dict (class_emb / blocks missing)") from None
    return VARConfig.for_depth(depth, width=width, num_classes=num_classes, patch_nums=tokenizer.patch_nums,
                               vocab_size=tokenizer.vocab_size, z_channels=tokenizer.z_channels,
                               shared_aln="shared_ada_lin.1.weight" in weights)


def official_patch_nums(weights: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The scales of an official VAR checkpoint, read off its number of positions (680: 256px, 2240: 512px)."""
    positions = weights["pos_1LC"].shape[1] if "pos_1LC" in weights else None
    for patch_nums in (PATCH_NUMS_256, PATCH_NUMS_512):
        if positions == sum(side * side for side in patch_nums):
            return patch_nums
    raise UserError(f"a VAR checkpoint with {positions} positions matches neither official scale set; "
                    "use a scalegen run folder, which stores its scales")


def load_var(path: str | Path, tokenizer_path: str | None = None) -> tuple[VAR, dict]:
    """A VAR (eval mode, tokenizer attached) from a run folder, checkpoint or official .pth; returns (model, config)."""
    stored, weights = load_weights(path)
    if stored is not None and stored.get("kind") != "var":
        raise UserError(f"{path} holds a {stored.get('kind')} model, not a VAR; use `scalegen sample {stored.get('kind')}`")
    if tokenizer_path:
        patch_nums = tuple(stored["model"]["patch_nums"]) if stored else official_patch_nums(weights)
        tokenizer = load_tokenizer(tokenizer_path, patch_nums)[0]
    elif stored is not None:
        tokenizer = stored_tokenizer(Path(path), stored)
    else:
        raise UserError(f"{path} is an official VAR checkpoint; pass --tokenizer with its vae_ch160v4096z32.pth")
    config = VARConfig(**stored["model"]) if stored else var_config_from_state_dict(weights, tokenizer)
    model = build_loaded(VAR(config), weights, path)
    model.attach_tokenizer(tokenizer)
    return model, stored or {"kind": "var"}


# ----- sampling and editing -----

def sample_var(args: argparse.Namespace) -> None:
    """Write a class grid PNG, or N uniformly-labelled samples as an ADM .npz (sharded over torchrun ranks)."""
    context = setup_distributed(args.device)
    model, _ = load_var(args.ckpt, args.tokenizer)
    model.to(context.device)
    model.tokenizer.to(context.device)

    def draw(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        images = model.generate(labels, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                more_smooth=args.more_smooth, generator=generator)  # (b, C, H, W) in [0, 1]
        return images * 2 - 1  # (b, C, H, W) in [-1, 1]

    try:
        if args.num_samples:
            # sample_to_npz seeds the global RNG per rank, which `generate` draws from without a generator.
            sample_to_npz(draw, model.config.num_classes, args.num_samples, args.batch_size, args.seed, args.out, context)
        elif context.is_main:
            classes = parse_classes(args.classes, model.config.num_classes)
            generator = torch.Generator(context.device).manual_seed(args.seed)
            labels = grid_labels(classes, args.per_class).to(context.device)
            images = torch.cat([draw(chunk, generator) for chunk in labels.split(args.batch_size)])
            print(f"wrote {save_grid(images, len(classes), args.out)}")
    finally:
        cleanup(context)


def read_image(path: str | Path, image_size: int, channels: int) -> torch.Tensor:
    """An image file center-cropped to image_size, as (1, channels, S, S) in [-1, 1]."""
    try:
        with Image.open(path) as handle:
            image = center_crop_arr(handle.convert("L" if channels == 1 else "RGB"), image_size)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read image {path} ({error}); pass a PNG or JPEG file") from None
    pixels = torch.from_numpy(np.array(image)).reshape(image_size, image_size, channels).permute(2, 0, 1)  # (C, S, S)
    return to_model_range(pixels).unsqueeze(0)  # (1, C, S, S)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """"x0,y0,x1,y1" → four floats."""
    try:
        x0, y0, x1, y1 = (float(item) for item in text.split(","))
    except ValueError:
        raise UserError(f"--box {text!r} must be four comma-separated numbers x0,y0,x1,y1") from None
    return x0, y0, x1, y1


def edit_var(args: argparse.Namespace) -> None:
    """In-paint (regenerate the box) or out-paint (keep only the box); writes OUT, OUT_input.png, OUT_mask.png."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = load_var(args.ckpt, args.tokenizer)
    tokenizer = model.tokenizer
    num_classes = model.config.num_classes
    if args.class_id is not None and not 0 <= args.class_id < num_classes:
        raise UserError(f"--class {args.class_id} is out of range; this model has classes 0..{num_classes - 1}")
    class_id = num_classes if args.class_id is None else args.class_id  # the null class: unconditional
    size = tokenizer.image_size
    keep = box_mask(size, parse_box(args.box), tokenizer.patch_nums[-1], args.mode)  # (p, p), 1 = keep
    model.to(device)
    tokenizer.to(device)
    image = read_image(args.image, size, tokenizer.config.in_channels).to(device)  # (1, C, S, S)
    source_tokens = tokenizer.img_to_tokens(image)
    generator = torch.Generator(device).manual_seed(args.seed)
    edited = model.edit([class_id], source_tokens, keep, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                        more_smooth=args.more_smooth, generator=generator)  # (1, C, S, S) in [0, 1]
    out = Path(args.out)
    generated = torch.nn.functional.interpolate((1 - keep)[None, None], size=(size, size), mode="nearest")  # (1, 1, S, S)
    save_grid(edited * 2 - 1, 1, out)
    save_grid(image, 1, out.with_name(f"{out.stem}_input.png"))
    save_grid(generated * 2 - 1, 1, out.with_name(f"{out.stem}_mask.png"))  # white = regenerated
    print(f"wrote {out} (input and mask beside it)")
