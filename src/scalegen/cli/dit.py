"""`scalegen train dit`, `scalegen train kl` (the KL tokenizer of a DiT's latent space) and `scalegen sample dit`."""
from __future__ import annotations

import argparse
from collections.abc import Callable

from scalegen.cli.options import (
    COMPILE_WHOLE_MODEL_HELP, TOKENIZER_DATA_HELP, add_autoencoder_options, add_init_from, add_precision_option,
    add_reconstruction_loss_options, add_training_options, dataclass_from_args, training_data,
    train_config_from_args,
)
from scalegen.cli.parsing import NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, at_least, finite_float, fraction
from scalegen.cli.sampling import add_labels_option, add_weights_option, checkpoint_help, dit_settings
from scalegen.diffusion.names import (
    OBJECTIVE_ENTRIES, SAMPLERS, ObjectiveSetting, check_guidance_interval, objective_settings, objectives_help,
    samplers_help,
)
from scalegen.errors import UserError
from scalegen.models.settings import BLOCK_KINDS, MLP_KINDS, NORM_KINDS, PRESETS
from scalegen.train.task_options import (
    DEFAULT_OBJECTIVE, REPA_DEFAULT_DEPTH, REPA_WEIGHT, DiTOptions, KLLosses, KLVAEOptions, ObjectiveConfig,
)

SAMPLE_PER_CLASS, SAMPLE_BATCH_SIZE = 8, 32  # the official sample.py's
ALIGN_WEIGHT = 0.1  # VA-VAE's hyper-weight of `train kl --align-encoder` when --align-weight is not given
DIT_GUIDANCE = at_least(1.0, float)  # 1 = no guidance; the official sampler treats anything below as 1
CFG_INTERVAL_HELP = ("guide only at noise levels LOW <= t <= HIGH (t = 1 is pure noise, a DDPM step is t·1000), e.g. "
                     "0,0.7 as REPA or 0,0.89 as LightningDiT")


def guidance_interval(text: str) -> tuple[float, float]:
    """"LOW,HIGH" as a checked guidance interval."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError(text)
        return check_guidance_interval([finite_float(part) for part in parts])
    except (ValueError, UserError, argparse.ArgumentTypeError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is no interval LOW,HIGH with 0 <= LOW < HIGH <= 1 ({error})")


def setting_type(setting: ObjectiveSetting) -> Callable[[str], object] | None:
    """The argparse type of an objective setting's flag: none for a choice, else a number (an integer where the default
    is one; a float: finite) in the setting's range: [0, 1] (`fraction`), at least its minimum, or any."""
    if setting.choices is not None:
        return None
    kind = int if isinstance(setting.default, int) else float
    if setting.maximum is not None:
        if (setting.minimum, setting.maximum, kind) != (0.0, 1.0, float):
            raise ValueError(f"{setting.flag}: a setting's flag bounds a number above only as a fraction in [0, 1]")
        return fraction
    if setting.minimum is not None:
        return at_least(setting.minimum, kind)
    return finite_float if kind is float else int


def setting_dest(setting: ObjectiveSetting) -> str:
    """The attribute of a parsed command that holds an objective setting's value (its flag with underscores)."""
    return setting.flag.lstrip("-").replace("-", "_")


def add_objective_settings(parser: argparse.ArgumentParser) -> None:
    """A flag for every registered objective's training setting (`objective_settings`), as its dataclass declares it."""
    for setting in objective_settings().values():
        parser.add_argument(setting.flag, type=setting_type(setting), choices=setting.choices, default=setting.default,
                            help=setting.help)


def register(train_parsers, sample_parsers) -> None:
    """Add `train dit`, `train kl` and `sample dit` to the command line."""
    register_train_kl(train_parsers)
    parser = train_parsers.add_parser("dit", help="train a diffusion transformer")
    parser.add_argument("--model", default=DiTOptions.model, help=f"preset: {', '.join(PRESETS)}")
    parser.add_argument("--data", default=None, help=TOKENIZER_DATA_HELP)
    parser.add_argument("--image-size", type=POSITIVE, default=DiTOptions.image_size, help="image side in pixels")
    parser.add_argument("--vae", default=DiTOptions.vae,
                        help="local SD-VAE folder/file for latent space (default: pixels)")
    parser.add_argument("--tokenizer", default=DiTOptions.tokenizer,
                        help="`train vqvae` run: diffuse its quantized features instead of pixels; `train kl` run: "
                             "diffuse its latents, normalised per channel")
    parser.add_argument("--latent-cache", action="store_true",
                        help="encode the data set once into RUN/latents/ (shards every rank builds, read memory-mapped)")
    parser.add_argument("--block", choices=BLOCK_KINDS, default=DiTOptions.block,
                        help="conditioning block (paper ablation)")
    parser.add_argument("--norm", choices=NORM_KINDS, default=DiTOptions.norm,
                        help="the adaLN blocks' two affine-free norms: DiT's layernorm or LightningDiT's rmsnorm")
    parser.add_argument("--mlp", choices=MLP_KINDS, default=DiTOptions.mlp,
                        help="the blocks' MLP: DiT's tanh-GELU, or LightningDiT's SwiGLU at 2/3 of its hidden width")
    parser.add_argument("--rope", action="store_true",
                        help="2-D rotary position embedding of queries and keys (LightningDiT's; the sin-cos "
                             "position embedding stays)")
    parser.add_argument("--qk-norm", action="store_true",
                        help="RMS-normalise each head's queries and keys (learnable weights) before RoPE and attention")
    parser.add_argument("--class-dropout", type=fraction, default=DiTOptions.class_dropout,
                        help="label dropout, which classifier-free guidance needs")
    parser.add_argument("--no-learn-sigma", dest="learn_sigma", action="store_false", default=None,
                        help="ddpm: predict ε only (fixed variance) instead of ε and the variance (flow never learns σ)")
    parser.add_argument("--depth", type=POSITIVE, help="override the preset's depth")
    parser.add_argument("--hidden-size", type=POSITIVE, help="override the preset's width")
    parser.add_argument("--num-heads", type=POSITIVE, help="override the preset's heads")
    parser.add_argument("--patch-size", type=POSITIVE, help="override the preset's patch size")
    parser.add_argument("--sample-steps", type=POSITIVE, default=DiTOptions.sample_steps,
                        help="steps of the periodic sample grid")
    parser.add_argument("--sample-cfg", type=DIT_GUIDANCE, default=DiTOptions.sample_cfg,
                        help="guidance scale of the periodic sample grid")
    parser.add_argument("--objective", choices=tuple(OBJECTIVE_ENTRIES), default=DEFAULT_OBJECTIVE,
                        help=objectives_help())
    add_objective_settings(parser)
    parser.add_argument("--cfg-interval", type=guidance_interval, default=DiTOptions.cfg_interval, metavar="LOW,HIGH",
                        help=CFG_INTERVAL_HELP + "; stored as the model's sampling default (meanflow: where "
                             "--train-cfg is trained in)")
    parser.add_argument("--repa-encoder", default=DiTOptions.repa_encoder, metavar="FILE.safetensors",
                        help="REPA: align a block with this frozen encoder's features (`train classifier --export`)")
    parser.add_argument("--repa-depth", type=POSITIVE, default=REPA_DEFAULT_DEPTH, help="REPA: the aligned block (1-based)")
    parser.add_argument("--repa-weight", type=finite_float, default=REPA_WEIGHT,
                        help="REPA: λ of the alignment loss")
    parser.add_argument("--end-to-end", action="store_true",
                        help="REPA-E: tune the --tokenizer (a `train kl` run) with the DiT through REPA's loss; the "
                             "latents are batch-normalised, the diffusion loss stops at them")
    parser.add_argument("--end-to-end-weight", type=NON_NEGATIVE_FLOAT, default=DiTOptions.end_to_end_weight,
                        help="REPA-E: weight of the REPA loss that reaches the tokenizer")
    parser.add_argument("--tokenizer-lr", type=NON_NEGATIVE_FLOAT, default=None,
                        help="REPA-E: the tokenizer's learning rate (default: --lr)")
    add_init_from(parser)
    add_training_options(parser, "dit")
    parser.set_defaults(handler=run_train)

    parser = sample_parsers.add_parser("dit", help="sample a DiT: a class grid (.png) or ADM samples (.npz)")
    parser.add_argument("--ckpt", required=True,
                        help=checkpoint_help("run folder, checkpoint folder/file, or official DiT .pt"))
    add_weights_option(parser)
    parser.add_argument("--out", required=True, help="grid.png, or samples.npz with --num-samples")
    parser.add_argument("--classes", default="all", help='class ids or names, e.g. "golden retriever,7", or all')
    parser.add_argument("--label-grid", action="store_true", help="write each row's class name beside it")
    parser.add_argument("--per-class", type=POSITIVE, default=SAMPLE_PER_CLASS, help="grid: samples per class (one row each)")
    parser.add_argument("--num-samples", type=NON_NEGATIVE, default=0, help="write this many labelled samples (--labels) to .npz")
    add_labels_option(parser)
    parser.add_argument("--cfg", "--cfg-scale", dest="cfg_scale", type=DIT_GUIDANCE, default=None,
                        help="classifier-free guidance scale (1: none; --cfg-scale is the official name); default: the "
                             "model's recommended one (its config's sampling section; an official file: the paper's "
                             "1.5), else the objective's (ddpm and flow 4, as the official sample.py; meanflow 1)")
    parser.add_argument("--steps", type=POSITIVE, default=None,
                        help="sampling steps (respaced diffusion steps, ODE steps, MeanFlow jumps); default: the "
                             "model's recommended ones, else the objective's (ddpm 250, as the official sample.py; "
                             "flow 50; meanflow 1)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help=samplers_help() + "; default: the model's recommended one, else the objective's first")
    parser.add_argument("--cfg-interval", type=guidance_interval, default=None, metavar="LOW,HIGH",
                        help=CFG_INTERVAL_HELP + "; default: the model's stored interval (none: every step)")
    parser.add_argument("--guide-all-channels", action="store_true", help="guide every ε channel, not the official 3")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (and of the labels with --num-samples)")
    parser.add_argument("--batch-size", type=POSITIVE, default=SAMPLE_BATCH_SIZE, help="images per forward batch")
    parser.add_argument("--vae", default=None, help="override the VAE path stored in the checkpoint")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_precision_option(parser)
    parser.set_defaults(handler=run_sample)


def register_train_kl(train_parsers) -> None:
    """Add `train kl`: a KL autoencoder (SD's VAE architecture, diffusers' AutoencoderKL layout), optionally aligned
    with an encoder (VA-VAE)."""
    parser = train_parsers.add_parser("kl", help="train a KL tokenizer (SD-VAE architecture) for a DiT's latent space")
    defaults, losses = KLVAEOptions, KLLosses  # their field defaults (the parser builds no instance)
    add_autoencoder_options(parser, defaults)
    parser.add_argument("--attention", dest="use_attention", action="store_true",
                        help="the middle attention blocks of SD's VAE (off by default: small images)")
    parser.add_argument("--latent-channels", type=POSITIVE, default=defaults.latent_channels, help="latent channels")
    add_reconstruction_loss_options(parser, losses)
    parser.add_argument("--kl-weight", dest="kl", type=NON_NEGATIVE_FLOAT, default=losses.kl,
                        help="weight of the mean KL divergence per latent element")
    parser.add_argument("--align-encoder", default=None, metavar="FILE.safetensors",
                        help="VA-VAE: align the latents with this frozen encoder's features (`train classifier "
                             "--export`; never the classifier that scores FID)")
    parser.add_argument("--align-weight", dest="alignment", type=NON_NEGATIVE_FLOAT, default=None,
                        help="VA-VAE: hyper-weight of the alignment losses (default with --align-encoder: 0.1, as VA-VAE)")
    parser.add_argument("--no-adaptive-alignment", dest="adaptive_alignment", action="store_false",
                        help="VA-VAE: use --align-weight as it is, not scaled by the gradient-norm ratio")
    parser.add_argument("--cosine-margin", type=NON_NEGATIVE_FLOAT, default=losses.cosine_margin,
                        help="VA-VAE: margin m1 of the cosine-similarity loss")
    parser.add_argument("--distance-margin", type=NON_NEGATIVE_FLOAT, default=losses.distance_margin,
                        help="VA-VAE: margin m2 of the distance-matrix loss")
    add_init_from(parser, class_conditional=False)
    add_training_options(parser, "klvae", {"compile": COMPILE_WHOLE_MODEL_HELP})
    parser.set_defaults(handler=run_train_kl)


def run_train_kl(args: argparse.Namespace) -> None:
    """Handler of `scalegen train kl`."""
    from scalegen.train.kl_task import train_kl

    alignment = args.alignment if args.alignment is not None else (ALIGN_WEIGHT if args.align_encoder else 0.0)
    losses = dataclass_from_args(KLLosses, args, alignment=alignment)
    train_kl(dataclass_from_args(KLVAEOptions, args, losses=losses), train_config_from_args(args))


def run_train(args: argparse.Namespace) -> None:
    """Handler of `scalegen train dit`."""
    from scalegen.train.dit_task import train_dit

    settings = {name: getattr(args, setting_dest(setting)) for name, setting in objective_settings().items()}
    objective = ObjectiveConfig(name=args.objective, repa_depth=args.repa_depth, repa_weight=args.repa_weight,
                                **settings)
    train_dit(dataclass_from_args(DiTOptions, args, objective=objective, data=training_data(args, say=True)),
              train_config_from_args(args))


def run_sample(args: argparse.Namespace) -> None:
    """Write a class grid PNG, or N labelled samples (class-balanced unless --labels random) as an ADM .npz (sharded
    over torchrun ranks)."""
    import torch

    from scalegen.distributed import process_group
    from scalegen.eval.samples import sample_to_npz
    from scalegen.images import check_output, grid_labels, parse_classes, save_grid
    from scalegen.runs.loading import load_dit
    from scalegen.models.sampling_settings import settings_line

    check_output(args.out, args.num_samples)
    with process_group(args.device) as context:
        model = load_dit(args.ckpt, args.vae, args.weights).to(context.device)
        given = dit_settings(args)
        if context.is_main:
            print(settings_line(model.chosen_sampling(given)))
        settings = model.sampling_settings(given)

        def draw(labels: torch.Tensor) -> torch.Tensor:
            return model.generate(labels, settings=settings)  # (b, C, H, W) in [0, 1]

        if args.num_samples:
            path = sample_to_npz(draw, model.config.num_classes, args.num_samples, args.batch_size, args.seed,
                                 args.out, context, model.class_names, args.labels)
            if path is not None:
                print(f"wrote {path} with {args.num_samples} samples")
        elif context.is_main:
            classes = parse_classes(args.classes, model.config.num_classes, model.class_names)
            torch.manual_seed(args.seed)
            labels = grid_labels(classes, args.per_class).to(context.device)
            images = torch.cat([draw(chunk) for chunk in labels.split(args.batch_size)])
            names = [model.class_names[label] for label in classes] if args.label_grid else None
            print(f"wrote {save_grid(images, len(classes), args.out, names)}")
