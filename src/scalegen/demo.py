"""`scalegen demo`: the main job on the embedded default — a small DiT, and a small VQVAE tokenizer + VAR, trained
on Fashion-MNIST on the CPU, then a class-conditional grid of each (one row per class). Re-running resumes the
training where it stopped."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from scalegen import dit_commands, var_commands
from scalegen.classifier import fmnist_report

DEMO_CLASSES = 10  # Fashion-MNIST: one grid row per class
# A small pixel-space DiT: 32×32×1 Fashion-MNIST, patch 4 (64 tokens), 4 blocks of width 128.
DEMO_DIT_ARGUMENTS = [
    "--model", "DiT-S/4", "--depth", "4", "--hidden-size", "128", "--num-heads", "4",
    "--data", "fashion-mnist", "--image-size", "32", "--batch-size", "32",
    "--lr", "3e-4", "--ema", "0.999", "--checkpoint-every", "200", "--log-every", "20",
]

# A small tokenizer: 32×32×1 → 8×8×8 features, scales 1,2,3,4,6,8 (130 tokens), 256 codes; no attention (CPU).
DEMO_TOKENIZER_ARGUMENTS = [
    "--image-size", "32", "--patch-nums", "1,2,3,4,6,8", "--ch", "16", "--ch-mult", "1,2,2", "--num-res-blocks", "1",
    "--norm-groups", "8", "--no-attention", "--vocab-size", "256", "--z-channels", "8",
    "--batch-size", "32", "--lr", "1e-3", "--dead-code-every", "100", "--checkpoint-every", "200", "--log-every", "20",
]
# A small VAR on it: 4 blocks narrowed to width 128 (the official rule's 256 costs 4× the CPU time per step).
DEMO_VAR_ARGUMENTS = [
    "--depth", "4", "--width", "128", "--num-heads", "4", "--batch-size", "32", "--lr", "1e-3", "--ema", "0.99",
    "--checkpoint-every", "200", "--log-every", "20",
]


def register(commands) -> None:
    """Add `scalegen demo` to the command line."""
    parser = commands.add_parser("demo", help="train a small DiT and a small VAR on Fashion-MNIST and write their class grids")
    parser.add_argument("--out", default="runs/demo", help="folder for the run and the grid")
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist or a folder of its IDX files")
    parser.add_argument("--steps", type=int, default=1500, help="DiT training steps (about 5 minutes on 2 cores)")
    parser.add_argument("--sample-steps", type=int, default=100, help="diffusion steps for the grid")
    parser.add_argument("--tokenizer-steps", type=int, default=600, help="VQVAE training steps (0: skip VAR)")
    parser.add_argument("--var-steps", type=int, default=800, help="VAR training steps")
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    """Train (or resume) the demo DiT, then sample a 10-class grid from its EMA weights."""
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    train_parsers, sample_parsers = commands.add_parser("train").add_subparsers(), commands.add_parser("sample").add_subparsers()
    dit_commands.register(train_parsers, sample_parsers)
    var_commands.register(train_parsers, sample_parsers, commands)
    run_dir = Path(args.out) / "dit"
    started = time.perf_counter()
    train_args = parser.parse_args(
        ["train", "dit", *DEMO_DIT_ARGUMENTS, "--data", args.data, "--steps", str(args.steps), "--out", str(run_dir),
         "--sample-steps", str(args.sample_steps)]
    )
    train_args.handler(train_args)
    grid = Path(args.out) / "dit_grid.png"
    sample_args = parser.parse_args(
        ["sample", "dit", "--ckpt", str(run_dir), "--classes", "all", "--per-class", str(DEMO_CLASSES), "--steps",
         str(args.sample_steps), "--cfg-scale", "4.0", "--out", str(grid), "--batch-size", "100"]
    )
    sample_args.handler(sample_args)
    print(f"demo: DiT trained in {run_dir} ({time.perf_counter() - started:.0f} s); class grid (rows = classes 0-9): {grid}")
    report_grid("DiT", grid)
    if args.tokenizer_steps:
        run_var_demo(parser, args)


def run_var_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Train (or resume) the demo tokenizer and VAR, then sample a 10-class grid (cfg 4, top-p 0.95)."""
    started = time.perf_counter()
    tokenizer_dir, var_dir = Path(args.out) / "vqvae", Path(args.out) / "var"
    for command in (
        ["train", "vqvae", *DEMO_TOKENIZER_ARGUMENTS, "--data", args.data, "--steps", str(args.tokenizer_steps),
         "--out", str(tokenizer_dir)],
        ["train", "var", "--tokenizer", str(tokenizer_dir), *DEMO_VAR_ARGUMENTS, "--data", args.data,
         "--steps", str(args.var_steps), "--out", str(var_dir)],
        ["sample", "var", "--ckpt", str(var_dir), "--classes", "all", "--per-class", str(DEMO_CLASSES), "--cfg", "4.0",
         "--top-p", "0.95", "--out", str(Path(args.out) / "var_grid.png"), "--batch-size", "100"],
    ):
        parsed = parser.parse_args(command)
        parsed.handler(parsed)
    print(f"demo: tokenizer and VAR trained in {tokenizer_dir} and {var_dir} ({time.perf_counter() - started:.0f} s); "
          f"class grid (rows = classes 0-9): {Path(args.out) / 'var_grid.png'}")
    report_grid("VAR", Path(args.out) / "var_grid.png")


def report_grid(name: str, path: Path, rows: int = DEMO_CLASSES) -> dict:
    """Score a class grid (row r asked for class r) with the shipped Fashion-MNIST classifier and print it.

    Returns:
        {"fid": …, "accuracy": …, "num_samples": …}: FID in the classifier's features against the real test set,
        and the share of samples the classifier labels as the class they were asked for.
    """
    grid = np.asarray(Image.open(path).convert("L"))  # (rows·H, columns·W)
    side = grid.shape[0] // rows
    tiles = grid.reshape(rows, side, -1, side).transpose(0, 2, 1, 3)  # (rows, columns, H, W)
    images = tiles.reshape(-1, side, side)  # (rows·columns, H, W)
    labels = np.repeat(np.arange(rows), tiles.shape[1])  # (rows·columns,)
    report = fmnist_report(images, labels)
    print(f"demo: {name} grid scored by the Fashion-MNIST classifier: {json.dumps(report)}")
    return report
