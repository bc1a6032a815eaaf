"""`scalegen train vqvae`, `train var`, `sample var` and `edit var`.

A VAR run folder holds a copy of its tokenizer (RUN/tokenizer.safetensors, its config inside the VAR's config),
so `sample var` and `edit var` rebuild both models from the run alone. Both sample a categorical VAR (top-k, top-p,
draws) and a flow VAR (`--token-head flow`: flow steps and sampler), and print the settings that apply to its head.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from scalegen.cli.options import (
    COMPILE_WHOLE_MODEL_HELP, TOKENIZER_DATA_HELP, add_autoencoder_options, add_init_from, add_precision_option,
    add_reconstruction_loss_options, add_training_options, dataclass_from_args, training_data,
    train_config_from_args,
)
from scalegen.cli.parsing import NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, at_least, floats, fraction, integers
from scalegen.cli.sampling import (
    NO_REFINER, add_labels_option, add_weights_option, checkpoint_help, chosen_var_settings,
)
from scalegen.errors import UserError
from scalegen.models.settings import (
    ATTENTION_BACKENDS, CATEGORICAL_HEAD, DEFAULT_REFINED_SCALES, DEFAULT_UNPRUNED_FIRST_BLOCKS,
    DEFAULT_UNPRUNED_LAST_BLOCKS, DRAWS, FLOW_CONTEXT_NOISE, FLOW_HEAD,
)
from scalegen.models.sampling_settings import (
    FLOW_DEFAULTS, FLOW_METHODS, VARSampling, chosen_settings, settings_line, values,
)
from scalegen.train.task_options import TokenizerLosses, VAROptions, VQVAEOptions

if TYPE_CHECKING:  # the models import torch: the handlers import them when they run
    from scalegen.models.var import VAR

# How `sample var` lays its grid out and batches (its sampling settings are the model's: `cli/sampling.py`).
SAMPLE_PER_CLASS, SAMPLE_BATCH_SIZE = 8, 64


def register(train_parsers, sample_parsers, commands) -> None:
    """Add `train vqvae`, `train var`, `sample var` and `edit var` to the command line."""
    parser = train_parsers.add_parser("vqvae", help="train VAR's multi-scale VQVAE tokenizer")
    defaults, losses = VQVAEOptions, TokenizerLosses  # their field defaults (the parser builds no instance)
    add_autoencoder_options(parser, defaults)
    parser.add_argument("--patch-nums", type=integers, default=defaults.patch_nums, help="token grid side per scale")
    parser.add_argument("--no-attention", dest="use_attention", action="store_false", help="no attention blocks")
    parser.add_argument("--vocab-size", type=at_least(2), default=defaults.vocab_size, help="codebook size")
    parser.add_argument("--z-channels", type=POSITIVE, default=defaults.z_channels, help="latent (code) channels")
    parser.add_argument("--share-quant-resi", type=NON_NEGATIVE, default=defaults.share_quant_resi,
                        help="φ convs shared over scales (0: one per scale)")
    add_reconstruction_loss_options(parser, losses)
    parser.add_argument("--quantizer-weight", dest="quantizer", type=NON_NEGATIVE_FLOAT, default=losses.quantizer,
                        help="weight of the quantizer (commitment) loss")
    parser.add_argument("--dead-code-every", type=NON_NEGATIVE, default=losses.dead_code_every,
                        help="re-initialise dead codes every N steps (0: never)")
    add_init_from(parser, class_conditional=False)
    add_training_options(parser, "vqvae", {"compile": COMPILE_WHOLE_MODEL_HELP})
    parser.set_defaults(handler=run_train_vqvae)

    parser = train_parsers.add_parser("var", help="train a VAR transformer on a trained tokenizer")
    defaults = VAROptions  # its field defaults (the tokenizer has none)
    parser.add_argument("--tokenizer", required=True,
                        help="`train vqvae` run folder, checkpoint, or official vae .pth; with --token-head flow a KL "
                             "tokenizer (`train kl` run, or a DiT run on one)")
    parser.add_argument("--depth", type=POSITIVE, default=defaults.depth,
                        help="blocks; width 64·depth and depth heads unless overridden")
    parser.add_argument("--width", type=POSITIVE, default=defaults.width, help="override the width (default: 64·depth)")
    parser.add_argument("--num-heads", type=POSITIVE, default=defaults.num_heads, help="override the heads (default: depth)")
    parser.add_argument("--data", default=None, help=TOKENIZER_DATA_HELP)
    parser.add_argument("--image-size", type=POSITIVE, default=defaults.image_size, help="default: the tokenizer's image size")
    parser.add_argument("--token-cache", action="store_true",
                        help="tokenize the data set once into RUN/tokens/ (shards every rank builds, read memory-mapped)")
    parser.add_argument("--label-smoothing", type=fraction, default=defaults.label_smoothing, help="cross-entropy label smoothing")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default=defaults.attention,
                        help="teacher forcing: sdpa (dense block-causal mask, the official path) or flex "
                             "(FlexAttention block-sparse mask; GPU, else sdpa with a warning)")
    parser.add_argument("--label-dropout", type=fraction, default=defaults.label_dropout,
                        help="class dropout for classifier-free guidance")
    parser.add_argument("--base-lr", type=NON_NEGATIVE_FLOAT, default=defaults.base_lr, help="lr = base_lr · max(batch, 768) / 256 unless --lr is given")
    parser.add_argument("--sample-cfg", type=NON_NEGATIVE_FLOAT, default=defaults.sample_cfg, help="guidance of the periodic sample grid")
    parser.add_argument("--sample-top-p", type=fraction, default=defaults.sample_top_p, help="nucleus of the periodic sample grid")
    parser.add_argument("--token-head", default=defaults.token_head,
                        help=f"what the positions predict: {CATEGORICAL_HEAD} (VAR's, on a VQ tokenizer) or "
                             f"{FLOW_HEAD} (continuous tokens by per-token flow matching, on a KL tokenizer)")
    parser.add_argument("--patch-nums", type=integers, default=defaults.patch_nums,
                        help="with --token-head flow: token grid side per scale (default: 1,2,3,4,6,8,… to the "
                             "latent side)")
    parser.add_argument("--head-width", type=POSITIVE, default=defaults.head_width,
                        help="with --token-head flow: the head MLP's width (default: the transformer's)")
    parser.add_argument("--head-blocks", type=POSITIVE, default=defaults.head_blocks,
                        help="with --token-head flow: the head MLP's residual blocks")
    parser.add_argument("--head-draws", type=POSITIVE, default=defaults.head_draws,
                        help="with --token-head flow: noise draws per token of the training loss (MAR's diffusion "
                             "batch multiplier; the transformer runs once)")
    parser.add_argument("--context-noise", type=fraction, default=defaults.context_noise,
                        help="with --token-head flow: xAR's noisy context, the teacher-forcing input made of tokens "
                             "mixed with noise (1 - τ)·x + τ·ε, τ ~ U(0, this) per image and scale (0: clean; "
                             f"default: the head's, {FLOW_CONTEXT_NOISE:g} for flow, 0 for categorical)")
    add_init_from(parser)
    add_training_options(parser, "var")
    parser.set_defaults(handler=run_train_var)

    parser = sample_parsers.add_parser("var", help="sample a VAR: a class grid (.png) or ADM samples (.npz)")
    add_loading_options(parser, "seed of the sampling (and of the labels with --num-samples)")
    parser.add_argument("--out", required=True, help="grid.png, or samples.npz with --num-samples")
    parser.add_argument("--classes", default="all", help='class ids or names, e.g. "golden retriever,7", or all')
    parser.add_argument("--label-grid", action="store_true", help="write each row's class name beside it")
    parser.add_argument("--per-class", type=POSITIVE, default=SAMPLE_PER_CLASS, help="grid: samples per class (one row each)")
    parser.add_argument("--num-samples", type=NON_NEGATIVE, default=0, help="write this many labelled samples (--labels) to .npz")
    add_labels_option(parser)
    parser.add_argument("--batch-size", type=POSITIVE, default=SAMPLE_BATCH_SIZE, help="images per generation batch")
    parser.set_defaults(handler=run_sample)

    edit_parsers = commands.add_parser("edit", help="zero-shot editing").add_subparsers(dest="model", required=True)
    parser = edit_parsers.add_parser("var", help="in-paint or out-paint a box of an image with a VAR")
    add_loading_options(parser, "seed of the sampling")
    parser.add_argument("--image", required=True, help="input image (center-cropped and resized to the model's size)")
    parser.add_argument("--box", required=True, help="x0,y0,x1,y1 in pixels of the resized image")
    parser.add_argument("--mode", choices=["inpaint", "outpaint"], default="inpaint",
                        help="inpaint: regenerate the box; outpaint: keep only the box")
    parser.add_argument("--class", dest="class_id", default=None,
                        help="the class (id or name) to draw the new content as (default: unconditional)")
    parser.add_argument("--out", required=True, help="edited image .png; the input and the mask are written beside it")
    parser.set_defaults(handler=run_edit)


def add_loading_options(parser, seed_help: str) -> None:
    """Options shared by `sample var` and `edit var` (each says what its --seed seeds)."""
    parser.add_argument("--ckpt", required=True,
                        help=checkpoint_help("VAR run folder, checkpoint folder/file, or official var_d*.pth"))
    add_weights_option(parser)
    parser.add_argument("--tokenizer", default=None, help="override the tokenizer stored with the run")
    recommended = ("; default: the model's recommended one (its config's sampling section; an official file: the "
                   "paper's FID setting), else the official code's")
    parser.add_argument("--cfg", type=NON_NEGATIVE_FLOAT, default=None,
                        help="classifier-free guidance (ramped over scales)" + recommended)
    parser.add_argument("--top-k", type=NON_NEGATIVE, default=None,
                        help="keep the k most likely tokens (0: all)" + recommended)
    parser.add_argument("--top-p", type=fraction, default=None, help="nucleus sampling (0: off)" + recommended)
    parser.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax smoothing (visualisation only)")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_precision_option(parser)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each scale's network step from a CUDA graph (GPU only; the same tokens, faster)")
    parser.add_argument("--prune", type=floats, default=None, metavar="FRACTIONS",
                        help="FastVAR's cached token pruning: the fraction of tokens not computed at each of the last "
                             "scales, e.g. 0.4,0.5 for the last two (default: off, every token)")
    parser.add_argument("--unpruned-blocks", type=integers,
                        default=(DEFAULT_UNPRUNED_FIRST_BLOCKS, DEFAULT_UNPRUNED_LAST_BLOCKS), metavar="FIRST,LAST",
                        help="with --prune: how many first and last blocks still compute every token")
    parser.add_argument("--refiner", default=None, metavar="CKPT",
                        help="collaborative decoding (CoDe): a VAR on the same tokenizer (usually smaller) that "
                             "generates the finest scales after --ckpt drafted the others (default: the one the "
                             f"model's settings name, usually none; {NO_REFINER}: none)")
    parser.add_argument("--refiner-any-tokenizer", action="store_true",
                        help="use the --refiner even when it was trained on another tokenizer than --ckpt's")
    parser.add_argument("--refined-scales", type=POSITIVE, default=DEFAULT_REFINED_SCALES,
                        help="with --refiner: how many of the finest scales it generates")
    parser.add_argument("--flow-steps", type=POSITIVE, default=None,
                        help="a flow head's ODE steps per scale" + recommended)
    parser.add_argument("--flow-sampler", choices=FLOW_METHODS, default=None,
                        help="a flow head's ODE step (heun: two velocities a step)" + recommended)
    parser.add_argument("--draws", choices=DRAWS, default=None,
                        help="how tokens are drawn: multinomial (the official draws and tokens) or inverse-cdf (one "
                             "uniform per token: the same distribution, faster, other tokens for a seed)" + recommended)


def run_train_vqvae(args: argparse.Namespace) -> None:
    """Handler of `scalegen train vqvae`."""
    from scalegen.train.tokenizer_task import train_vqvae

    options = dataclass_from_args(VQVAEOptions, args, losses=dataclass_from_args(TokenizerLosses, args))
    train_vqvae(options, train_config_from_args(args))


def run_train_var(args: argparse.Namespace) -> None:
    """Handler of `scalegen train var`."""
    from scalegen.train.var_task import train_var

    train_var(dataclass_from_args(VAROptions, args, data=training_data(args, say=True)), train_config_from_args(args))


def sampling_options(args: argparse.Namespace, model: VAR, show: bool = True) -> VARSampling:
    """The VAR sampling settings of `sample var` / `edit var` for `model`: their flags, else the model's recommended
    settings, else the official code's defaults, printed (`show`) with where each came from (a refiner is loaded beside
    it, on its tokenizer and device). A flow VAR samples with its guidance and ODE (flow steps, flow sampler) alone: the
    line names those, and a flag of the categorical head is refused (`refuse_categorical_flags`)."""
    from scalegen.models.var_pruning import TokenPruning
    from scalegen.runs.loading import load_refiner

    if len(args.unpruned_blocks) != 2:
        raise UserError(f"--unpruned-blocks takes FIRST,LAST (two numbers), got {args.unpruned_blocks}")
    pruning = None if args.prune is None else TokenPruning(args.prune, *args.unpruned_blocks)
    chosen = chosen_var_settings(args, model)
    flow_flags = {name: getattr(args, name) for name in FLOW_DEFAULTS}
    if model.token_head.continuous_tokens:  # its guidance and ODE: the flag, the model's, the default
        refuse_categorical_flags(args)
        chosen = {"cfg": chosen["cfg"],
                  **chosen_settings(flow_flags, model.sampling, model.sampling_origin, FLOW_DEFAULTS)}
    elif any(flag is not None for flag in flow_flags.values()):
        raise UserError(f"--flow-steps and --flow-sampler set a flow head's sampling; this VAR has the "
                        f"{model.config.token_head} head: drop them")
    if show:
        print(settings_line(chosen))
    options = values(chosen)
    refiner = options.pop("refiner", None)  # a flow VAR takes none
    if refiner is not None and refiner != NO_REFINER:
        options["refiner"] = load_refiner(refiner, model, args.refiner_any_tokenizer)
    return VARSampling(**options, more_smooth=args.more_smooth, precision=args.precision,
                       cuda_graphs=args.cuda_graphs, pruning=pruning, refined_scales=args.refined_scales)


def refuse_categorical_flags(args: argparse.Namespace) -> None:
    """A one-line error for a flag given to a flow VAR that only the categorical head samples with (top-k, top-p,
    draws, more-smooth) or that only it speeds up (FastVAR's --prune, CoDe's --refiner; `--refiner none` is none)."""
    from scalegen.models.flow_head import CATEGORICAL_SETTINGS

    given = {name: getattr(args, name) for name in (*CATEGORICAL_SETTINGS, "prune", "refiner")}
    flags = [f"--{name.replace('_', '-')}" for name, value in given.items()
             if value is not None and value is not False and value != NO_REFINER]  # None, off: not given
    if flags:
        raise UserError(f"{', '.join(flags)}: the categorical head's only; this VAR has the flow head: drop "
                        f"{'them' if len(flags) > 1 else 'it'}")


def run_sample(args: argparse.Namespace) -> None:
    """Write a class grid PNG, or N labelled samples (class-balanced unless --labels random) as an ADM .npz (sharded
    over torchrun ranks)."""
    import torch

    from scalegen.distributed import process_group
    from scalegen.eval.samples import sample_to_npz
    from scalegen.images import check_output, grid_labels, parse_classes, save_grid
    from scalegen.runs.loading import load_var

    check_output(args.out, args.num_samples)
    with process_group(args.device) as context:
        model = load_var(args.ckpt, args.tokenizer, args.weights).to(context.device)
        settings = sampling_options(args, model, context.is_main)
        if args.num_samples:
            # sample_to_npz seeds the global RNG per rank, which `generate` draws from without a generator.
            path = sample_to_npz(lambda labels: model.generate(labels, settings=settings),
                                 model.config.num_classes, args.num_samples, args.batch_size, args.seed, args.out, context,
                                 model.class_names, args.labels)
            if path is not None:
                print(f"wrote {path} with {args.num_samples} samples")
        elif context.is_main:
            classes = parse_classes(args.classes, model.config.num_classes, model.class_names)
            generator = torch.Generator(context.device).manual_seed(args.seed)
            labels = grid_labels(classes, args.per_class).to(context.device)
            images = torch.cat([model.generate(chunk, settings=settings, generator=generator)
                                for chunk in labels.split(args.batch_size)])  # (N, C, H, W) in [0, 1]
            names = [model.class_names[label] for label in classes] if args.label_grid else None
            print(f"wrote {save_grid(images, len(classes), args.out, names)}")


def run_edit(args: argparse.Namespace) -> None:
    """In-paint (regenerate the box) or out-paint (keep only the box); writes OUT, OUT_input.png, OUT_mask.png."""
    import torch

    from scalegen.images import check_image_output, load_image, parse_classes, save_grid
    from scalegen.models.var_edit import edit_box, parse_box
    from scalegen.runs.loading import load_var

    check_image_output(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_var(args.ckpt, args.tokenizer, args.weights).to(device)
    tokenizer = model.tokenizer
    image = load_image(args.image, tokenizer.image_size, tokenizer.config.in_channels)  # (1, C, S, S) in [0, 1]
    generator = torch.Generator(device).manual_seed(args.seed)
    class_id = None if args.class_id is None else parse_classes(args.class_id, model.config.num_classes,
                                                                  model.class_names)[0]
    edited, regenerated = edit_box(model, image, parse_box(args.box), args.mode, class_id,
                                   settings=sampling_options(args, model), generator=generator)
    out = Path(args.out)
    save_grid(edited, 1, out)
    save_grid(image, 1, out.with_name(f"{out.stem}_input.png"))
    save_grid(regenerated, 1, out.with_name(f"{out.stem}_mask.png"))  # white = regenerated
    print(f"wrote {out} (input and mask beside it)")
