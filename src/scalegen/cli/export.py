"""`scalegen export`: a run's final weights in a small self-contained folder."""
from __future__ import annotations

import argparse

from scalegen.errors import UserError
from scalegen.runs.names import WEIGHT_CHOICES

FORMATS = ("scalegen", "diffusers")


def run_export(args: argparse.Namespace) -> None:
    """Handler of `scalegen export`."""
    from scalegen.runs.diffusers_export import export_diffusers
    from scalegen.runs.export import export_weights

    if args.format == "diffusers":
        if not args.half or args.weights != WEIGHT_CHOICES[0]:
            raise UserError("--format diffusers writes the EMA weights in fp32; drop --fp32 / --weights raw")
        exported = export_diffusers(args.run, args.out, args.vae)
        print(f"exported {exported.folder} ({exported.summary})")
        return
    if args.vae:
        raise UserError("--vae names the SD-VAE a --format diffusers export ships; scalegen's format keeps the run's")
    print(f"exported {export_weights(args.run, args.out, args.half, prefer_ema=args.weights == WEIGHT_CHOICES[0])}")


def register(commands) -> None:
    """Add `scalegen export` to the command line."""
    parser = commands.add_parser("export", help="copy a run's final (EMA) weights into a small self-contained folder")
    parser.add_argument("--run", required=True, help="run or checkpoint folder")
    parser.add_argument("--out", required=True, help="folder to write (model.safetensors, config.json, tokenizer)")
    parser.add_argument("--fp32", dest="half", action="store_false", help="keep fp32 weights (default: fp16)")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default=WEIGHT_CHOICES[0],
                        help="EMA (default; the weights themselves for a run without EMA) or raw weights")
    parser.add_argument("--format", choices=FORMATS, default=FORMATS[0],
                        help="scalegen (any --ckpt) or diffusers (a DDPM DiT on an SD-VAE or a KL tokenizer as a "
                             "DiTPipeline folder: transformer/, scheduler/, vae/; a `train kl` tokenizer as an "
                             "AutoencoderKL folder)")
    parser.add_argument("--vae", help="diffusers: the local SD-VAE folder/file to ship as vae/ (default: the run's)")
    parser.set_defaults(handler=run_export)
