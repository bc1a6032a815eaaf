"""`scalegen demo`: the main job on the embedded default — a small DiT trained on Fashion-MNIST on the CPU,
then a class-conditional grid (one row per class). Re-running resumes the training where it stopped."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from scalegen import dit_commands

# A small pixel-space DiT: 32×32×1 Fashion-MNIST, patch 4 (64 tokens), 4 blocks of width 128.
DEMO_DIT_ARGUMENTS = [
    "--model", "DiT-S/4", "--depth", "4", "--hidden-size", "128", "--num-heads", "4",
    "--data", "fashion-mnist", "--image-size", "32", "--batch-size", "32",
    "--lr", "3e-4", "--ema", "0.999", "--checkpoint-every", "200", "--log-every", "20",
]


def register(commands) -> None:
    """Add `scalegen demo` to the command line."""
    parser = commands.add_parser("demo", help="train a small DiT on Fashion-MNIST and write its class grid")
    parser.add_argument("--out", default="runs/demo", help="folder for the run and the grid")
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist or a folder of its IDX files")
    parser.add_argument("--steps", type=int, default=1500, help="DiT training steps (about 5 minutes on 2 cores)")
    parser.add_argument("--sample-steps", type=int, default=100, help="diffusion steps for the grid")
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    """Train (or resume) the demo DiT, then sample a 10-class grid from its EMA weights."""
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    train_parsers, sample_parsers = commands.add_parser("train").add_subparsers(), commands.add_parser("sample").add_subparsers()
    dit_commands.register(train_parsers, sample_parsers)
    run_dir = Path(args.out) / "dit"
    started = time.perf_counter()
    train_args = parser.parse_args(
        ["train", "dit", *DEMO_DIT_ARGUMENTS, "--data", args.data, "--steps", str(args.steps), "--out", str(run_dir),
         "--sample-steps", str(args.sample_steps)]
    )
    train_args.handler(train_args)
    grid = Path(args.out) / "dit_grid.png"
    sample_args = parser.parse_args(
        ["sample", "dit", "--ckpt", str(run_dir), "--classes", "all", "--per-class", "10", "--steps",
         str(args.sample_steps), "--cfg-scale", "4.0", "--out", str(grid), "--batch-size", "100"]
    )
    sample_args.handler(sample_args)
    print(f"demo: DiT trained in {run_dir} ({time.perf_counter() - started:.0f} s); class grid (rows = classes 0-9): {grid}")
