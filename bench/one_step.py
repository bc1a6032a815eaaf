"""Benchmark: quality against sampling cost of DiTs on the shipped DiT's latent space — MeanFlow at 1 and 2 steps
against flow matching at 50, and the guidance interval's effect.

    python bench/one_step.py --setting NAME=CKPT,SAMPLER,STEPS,CFG[,LOW,HIGH] [--setting …] [--num-samples 2000]
                             [--json bench/one_step.json] [--plot bench/one_step.png]

Each setting samples `--num-samples` images (an equal number per class, seeds 0, 1, … per batch of 250, the same for
every setting), scored as `scalegen eval --features fmnist` does: FID against the real test set and the accuracy of
the class asked for. Sampling cost per image is counted by torch's FLOP counter over one guided sample (network and
tokenizer decoder; GFLOPs, 2 per multiply-add), beside the objective's network calls (`Objective.network_calls`) and
the seconds the samples took on this machine. Settings already in the JSON file are not scored again.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from scalegen import load_dit  # noqa: E402
from scalegen.eval.flops import counted_flops  # noqa: E402
from scalegen.eval.fmnist import fmnist_report  # noqa: E402
from scalegen.images import to_uint8  # noqa: E402

SAMPLE_BATCH = 250
CLASSES = 10
FLOP_IMAGES = 4
GIGA = 1e9


def parse_setting(text: str) -> tuple[str, dict]:
    """NAME=CKPT,SAMPLER,STEPS,CFG[,LOW,HIGH] -> (name, options)."""
    name, values = text.split("=", 1)
    ckpt, sampler, steps, cfg, *interval = values.split(",")
    return name, {"ckpt": ckpt, "sampler": sampler, "steps": int(steps), "cfg": float(cfg),
                  "cfg_interval": [float(value) for value in interval] if interval else None}


def score(options: dict, num_samples: int) -> dict:
    """FID, accuracy, sampling GFLOPs per image, network calls and seconds of one setting."""
    model = load_dit(options["ckpt"])
    interval = tuple(options["cfg_interval"]) if options["cfg_interval"] else None
    draw = lambda labels, seed: model.generate(labels, cfg=options["cfg"], steps=options["steps"],  # noqa: E731
                                               sampler=options["sampler"], cfg_interval=interval, seed=seed)
    labels = torch.arange(num_samples) % CLASSES  # (N,)
    started = time.perf_counter()
    images = torch.cat([draw(chunk, index) for index, chunk in enumerate(labels.split(SAMPLE_BATCH))])  # (N, 1, H, W)
    seconds = time.perf_counter() - started
    report = fmnist_report(to_uint8(images)[:, 0].numpy(), labels.numpy())
    flops = counted_flops(lambda: draw(torch.arange(FLOP_IMAGES), 0)) / FLOP_IMAGES
    calls = model.objective.network_calls(options["sampler"], options["steps"], options["cfg"],
                                          interval or model.config.cfg_interval)
    return {**options, "fid": report["fid"], "accuracy": report["accuracy"], "gflops_per_image": flops / GIGA,
            "network_calls": calls, "sampling_seconds": seconds, "num_samples": num_samples}


def plot(points: dict, path: Path) -> None:
    """FID against sampling GFLOPs per image, one labelled point per setting."""
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for name, row in points.items():
        axis.scatter(row["gflops_per_image"], row["fid"])
        axis.annotate(f"{name} (acc {row['accuracy']:.2f})", (row["gflops_per_image"], row["fid"]), fontsize=7,
                      textcoords="offset points", xytext=(4, 3))
    axis.set_xscale("log")
    axis.set_xlabel("sampling GFLOPs per image (network + decoder)")
    axis.set_ylabel("FID (Fashion-MNIST classifier features)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", action="append", required=True, help="NAME=CKPT,SAMPLER,STEPS,CFG[,LOW,HIGH]")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--json", default="bench/one_step.json")
    parser.add_argument("--plot", default="bench/one_step.png")
    args = parser.parse_args()
    path = Path(args.json)
    points = json.loads(path.read_text()) if path.exists() else {}
    for text in args.setting:
        name, options = parse_setting(text)
        if name in points:
            continue
        row = points[name] = score(options, args.num_samples)
        path.write_text(json.dumps(points, indent=1))
        print(f"{name:28s} FID {row['fid']:6.2f}  accuracy {row['accuracy']:.3f}  {row['gflops_per_image']:7.3f} "
              f"GFLOPs/image  {row['network_calls']:3d} calls  {row['sampling_seconds']:6.1f} s", flush=True)
    plot(points, Path(args.plot))
    print(f"wrote {path} and {args.plot}")


if __name__ == "__main__":
    main()
