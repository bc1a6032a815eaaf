"""Benchmark: time to quality of the DiT recipes (ddpm, flow, flow + logit-normal, flow + logit-normal + REPA, flow +
logit-normal with LightningDiT's block options, with and without REPA).

    python bench/recipes.py --runs RUNS [--recipes ddpm,flow,...] [--num-samples 2000] [--steps 25] [--cfg 3]
                            [--json bench/recipes.json] [--plot bench/recipes.png]

RUNS holds one `scalegen train dit` run per recipe (RUNS/ddpm, RUNS/flow, …, made by the commands in
bench/README.md: the same model, latent space, data order and images for each). Every kept checkpoint of each run is
scored with `eval --features fmnist`'s numbers — FID against the real test set and the accuracy of the class asked
for — on `--num-samples` samples (an equal number per class, the same seeds for every checkpoint), drawn with
`--steps` network evaluations and guidance `--cfg` (DPM-Solver++ 2M for ddpm, Euler for flow: the same cost). Training FLOPs
per image are counted by torch's FLOP counter over one loss + backward of the run's own task (REPA's projector and
frozen encoder included). Points already in the JSON file are not scored again, so an interrupted run continues.
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
from scalegen.data.batch import Batch  # noqa: E402
from scalegen.data.names import IMAGES, LATENTS  # noqa: E402
from scalegen.eval.flops import counted_flops  # noqa: E402
from scalegen.eval.fmnist import fmnist_report  # noqa: E402
from scalegen.images import to_uint8  # noqa: E402
from scalegen.runs.folder import load_training_state  # noqa: E402
from scalegen.runs.loading import stored_dit_config  # noqa: E402
from scalegen.runs.weights import stored_config  # noqa: E402
from scalegen.tokenizers.codec import tokenizer_codec  # noqa: E402
from scalegen.tokenizers.kl_vae import KLVAE, KLVAEConfig  # noqa: E402
from scalegen.train.dit_task import DiTTask, ObjectiveConfig  # noqa: E402
from scalegen.train.end_to_end import EndToEnd  # noqa: E402
from scalegen.train.kl_task import KLLosses  # noqa: E402
from scalegen.train.repa import load_patch_encoder  # noqa: E402

RECIPES = ("ddpm", "flow", "flow-lognorm", "flow-lognorm-repa", "flow-lognorm-lightning", "flow-lognorm-repa-lightning")
SAMPLERS = {"ddpm": "dpm-solver++", "flow": "euler"}  # one network evaluation (×2 with guidance) per step each
FLOP_BATCH = 4
SAMPLE_BATCH = 250
CLASSES = 10


def training_flops_per_image(run: Path, repa_encoder: str | None = None) -> float:
    """FLOPs of one loss + backward per image of the run's (or export's) task, on cached latents (a frozen tokenizer
    is not counted; an end-to-end run's tokenizer, which trains with the DiT, is: its forward and backward and the
    second DiT pass); a REPA run's encoder is read from `repa_encoder`, else from where the run was trained with it."""
    stored = stored_config(run)
    config = stored_dit_config(stored, run)
    objective = ObjectiveConfig(**stored.get("objective", {}))
    encoder_path = repa_encoder or stored.get("repa_encoder")
    if encoder_path and not Path(encoder_path).is_file():
        raise SystemExit(f"{run} was trained with the REPA encoder {encoder_path}, which is not here: pass its path "
                         "(scalegen train classifier --export, RECIPE.md) to count its FLOPs")
    encoder = load_patch_encoder(encoder_path) if encoder_path else None
    images = torch.rand(FLOP_BATCH, 1, 32, 32) * 2 - 1  # (B, 1, 32, 32)
    if stored.get("tokenizer", {}).get("end_to_end"):
        codec = tokenizer_codec(KLVAE(KLVAEConfig(**stored["tokenizer"]["model"])), stored["tokenizer"])
        task = DiTTask(config, codec, objective=objective, repa_encoder=encoder,
                       end_to_end=EndToEnd(codec, KLLosses(), images))
        task.prepare(1e-4)
        batch = Batch(IMAGES, label=torch.arange(FLOP_BATCH), image=images)
    else:
        task = DiTTask(config, objective=objective, repa_encoder=encoder)
        latent = torch.randn(FLOP_BATCH, config.in_channels, config.input_size, config.input_size)
        batch = Batch(LATENTS, label=torch.arange(FLOP_BATCH), latent=latent, image=images)
    task.model.train()
    return counted_flops(lambda: task.loss(task.model, batch)[0].backward()) / FLOP_BATCH


def score(checkpoint: Path, num_samples: int, steps: int, cfg: float) -> dict:
    """FID and accuracy of `num_samples` samples of a checkpoint, and the seconds they took to draw."""
    model = load_dit(checkpoint)
    labels = torch.arange(num_samples) % CLASSES  # (N,)
    started = time.perf_counter()
    images = torch.cat([model.generate(chunk, cfg=cfg, steps=steps, sampler=SAMPLERS[model.objective.name], seed=index)
                        for index, chunk in enumerate(labels.split(SAMPLE_BATCH))])  # (N, 1, 32, 32) in [0, 1]
    seconds = time.perf_counter() - started
    report = fmnist_report(to_uint8(images)[:, 0].numpy(), labels.numpy())
    return {"fid": report["fid"], "accuracy": report["accuracy"], "sampling_seconds": seconds}


def plot(points: dict, path: Path) -> None:
    """FID against training FLOPs, one line per recipe."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for recipe, rows in points.items():
        rows = sorted(rows.values(), key=lambda row: row["training_flops"])
        axis.plot([row["training_flops"] for row in rows], [row["fid"] for row in rows], marker="o", label=recipe)
    axis.set_xscale("log")
    axis.set_xlabel("training FLOPs")
    axis.set_ylabel("FID (Fashion-MNIST classifier features)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="folder with one run per recipe")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--at", default="", help="score only these steps, e.g. 200,600,1000 (default: every kept one)")
    parser.add_argument("--json", default="bench/recipes.json")
    parser.add_argument("--plot", default="bench/recipes.png")
    args = parser.parse_args()
    path = Path(args.json)
    points = json.loads(path.read_text()) if path.exists() else {}
    wanted = {int(step) for step in args.at.split(",") if step}
    for recipe in args.recipes.split(","):
        run = Path(args.runs) / recipe
        per_image = training_flops_per_image(run)
        for checkpoint in sorted((run / "checkpoints").glob("step-*")):
            state = load_training_state(checkpoint)
            step, key = state["step"], str(state["step"])
            if key in points.get(recipe, {}) or (wanted and step not in wanted):
                continue
            images_seen = step * state["train_config"]["batch_size"]
            row = {"step": step, "images": images_seen, "flops_per_image": per_image,
                   "training_flops": images_seen * per_image, **score(checkpoint, args.num_samples, args.steps, args.cfg)}
            points.setdefault(recipe, {})[key] = row
            path.write_text(json.dumps(points, indent=1))
            print(f"{recipe:18s} step {step:5d}  {row['training_flops'] / 1e15:6.3f} PFLOPs  FID {row['fid']:6.2f}  "
                  f"accuracy {row['accuracy']:.3f}", flush=True)
    plot(points, Path(args.plot))
    print(f"wrote {path} and {args.plot}")


if __name__ == "__main__":
    main()
