"""`scalegen demo`: the main job on the embedded default. It samples the shipped Fashion-MNIST DiT (50 steps), one-step
DiT (MeanFlow) and VAR (package data, trained by `scripts/train_fashion_mnist.sh`, see their RECIPE.md) — the VAR also
with its speed-ups ("VAR fast": bf16 where the CPU or GPU has bf16 units, inverse-CDF draws, the shipped CoDe
refiner) —, writes a 10×10 class grid of each, and prints for each its sampling time, FLOPs per image, classifier
accuracy and FID in the classifier's features."""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from scalegen.classes import FASHION_MNIST_NAME
from scalegen.cli.parsing import POSITIVE
from scalegen.runs.names import SHIPPED, SHIPPED_DIT, SHIPPED_MEANFLOW_DIT, SHIPPED_VAR, SHIPPED_VAR_REFINER

if TYPE_CHECKING:  # the models and the evaluation import torch: each function imports what it uses when it runs
    import torch

DEMO_CLASSES = 10  # Fashion-MNIST: one grid row per class
GRID_PER_CLASS = 10
FLOP_COUNT_IMAGES = 2  # images drawn under the FLOP counter (its bookkeeping would distort the timing)

Draw = Callable[["torch.Tensor", int], "torch.Tensor"]  # (labels (b,), seed) -> images (b, 1, H, W) in [0, 1]


def register(commands) -> None:
    """Add `scalegen demo` to the command line."""
    parser = commands.add_parser("demo", help="sample the shipped Fashion-MNIST DiT, MeanFlow DiT and VAR: grids, speed, "
                                 "FLOPs, FID")
    parser.add_argument("--out", default="runs/demo", help="folder for the grids and report.json")
    parser.add_argument("--data", default=FASHION_MNIST_NAME,
                        help="fashion-mnist or a folder of its IDX files (FID baseline)")
    parser.add_argument("--per-class", type=POSITIVE, default=GRID_PER_CLASS,
                        help="samples per class to score (the grid shows the first 10); more gives a steadier FID")
    parser.add_argument("--dit", default=str(SHIPPED_DIT), help="DiT folder (default: the shipped one)")
    parser.add_argument("--dit-meanflow", default=str(SHIPPED_MEANFLOW_DIT),
                        help="one-step (MeanFlow) DiT folder (default: the shipped one)")
    parser.add_argument("--var", default=str(SHIPPED_VAR), help="VAR folder (default: the shipped one)")
    parser.add_argument("--var-refiner", default=str(SHIPPED_VAR_REFINER),
                        help="the refiner of \"VAR fast\" (CoDe), on the --var's tokenizer (default: the shipped one)")
    parser.add_argument("--batch-size", type=POSITIVE, default=250, help="images per generation batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and of the real-image baseline")
    parser.set_defaults(handler=run_demo)


def dit_drawer(path: str | Path) -> Draw:
    """Sampling function of a DiT folder (with its tokenizer or VAE) at its recommended settings (its config's
    `sampling` section: the shipped DiT's 50 Euler steps at cfg 2.5, the MeanFlow DiT's one jump)."""
    from scalegen.runs.loading import load_dit

    model = load_dit(path)
    settings = model.sampling_settings()

    def draw(labels: torch.Tensor, seed: int) -> torch.Tensor:
        return model.generate(labels, settings=settings, seed=seed)

    return draw


def var_drawer(path: str | Path, refiner: str | Path | None = None) -> Draw:
    """Sampling function of a VAR folder (tokenizer inside) at its recommended settings: the official computation,
    or with a refiner (CoDe) its speed-ups — bf16 where the hardware has bf16 units and inverse-CDF draws too."""
    from scalegen.runs.loading import load_refiner, load_var

    model = load_var(path)
    fast = {} if refiner is None else dict(refiner=load_refiner(refiner, model), precision="auto", draws="inverse-cdf")
    settings = model.sampling_settings(**fast)

    def draw(labels: torch.Tensor, seed: int) -> torch.Tensor:
        return model.generate(labels, settings=settings, seed=seed)

    return draw


def flops_per_image(draw: Draw) -> float:
    """FLOPs of one sample, counted by torch's FLOP counter over a small batch (network, guidance and decoder)."""
    import torch

    from scalegen.eval.flops import counted_flops

    return counted_flops(lambda: draw(torch.arange(FLOP_COUNT_IMAGES) % DEMO_CLASSES, 0)) / FLOP_COUNT_IMAGES


def evaluate_model(name: str, draw: Draw, args: argparse.Namespace, real_baseline: float) -> dict:
    """Draw `per_class` samples of every class, save the grid, score them; returns the report."""
    import torch

    from scalegen.eval.flops import GIGA
    from scalegen.eval.fmnist import fmnist_report
    from scalegen.images import grid_labels, save_grid, to_uint8

    labels = grid_labels(list(range(DEMO_CLASSES)), args.per_class)  # (N,)
    started = time.perf_counter()
    images = torch.cat([draw(chunk, args.seed + index) for index, chunk in enumerate(labels.split(args.batch_size))])
    seconds = time.perf_counter() - started
    pixels = to_uint8(images)[:, 0].numpy()  # (N, H, W) uint8
    grid_rows = images.reshape(DEMO_CLASSES, args.per_class, *images.shape[1:])[:, :GRID_PER_CLASS]  # (10, 10, 1, H, W)
    grid = save_grid(grid_rows.flatten(0, 1), DEMO_CLASSES, Path(args.out) / grid_file(name))
    scores = fmnist_report(pixels, labels.numpy())
    report = {
        "grid": str(grid), "num_samples": len(labels), "sampling_seconds": round(seconds, 2),
        "images_per_second": round(len(labels) / seconds, 1), "threads": torch.get_num_threads(),
        "gflops_per_image": round(flops_per_image(draw) / GIGA, 3), "accuracy": scores["accuracy"],
        "fid": scores["fid"], "fid_real_train_same_count": real_baseline,
    }
    print(f"{name}: {len(labels)} samples in {seconds:.1f} s ({report['images_per_second']} img/s, "
          f"{report['threads']} CPU thread(s)), {report['gflops_per_image']} GFLOPs/image (real FLOPs: 2 per "
          f"multiply-add, decoder included); classifier accuracy {scores['accuracy']:.3f}; FID {scores['fid']:.2f} "
          f"(real training images, same count: {real_baseline:.2f}); grid: {grid}")
    return report


def grid_file(name: str) -> str:
    """The grid's file name of a model of the report: "DiT MeanFlow" -> dit_meanflow_grid.png."""
    return f"{name.lower().replace(' ', '_')}_grid.png"


def real_train_fid(data: str, count: int, seed: int) -> float:
    """FID of `count` random real training images in the classifier's features: the floor for that many samples."""
    import numpy as np
    import torch

    from scalegen.data.fashion_mnist import FashionMNIST
    from scalegen.eval.fmnist import fmnist_report

    train_set = FashionMNIST(None if data == FASHION_MNIST_NAME else data, split="train")
    chosen = np.random.default_rng(seed).choice(len(train_set), size=min(count, len(train_set)), replace=False)
    return fmnist_report(train_set.images[torch.from_numpy(chosen), 0])["fid"]


def run_demo(args: argparse.Namespace) -> None:
    """Sample the shipped models, write their grids and report.json, and print each one's figures."""
    import torch

    baseline = real_train_fid(args.data, DEMO_CLASSES * args.per_class, args.seed)
    with torch.no_grad():
        reports = {
            "DiT": evaluate_model("DiT", dit_drawer(args.dit), args, baseline),
            "DiT MeanFlow": evaluate_model("DiT MeanFlow", dit_drawer(args.dit_meanflow), args, baseline),
            "VAR": evaluate_model("VAR", var_drawer(args.var), args, baseline),
            "VAR fast": evaluate_model("VAR fast", var_drawer(args.var, args.var_refiner), args, baseline),
        }
    path = Path(args.out) / "report.json"
    path.write_text(json.dumps(reports, indent=2) + "\n")
    print(f"demo: report in {path}; train either model from scratch with the commands of {SHIPPED / 'RECIPE.md'}")
