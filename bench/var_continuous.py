"""Benchmark (issue 33): the continuous VAR (flow head on a KL tokenizer) against the discrete VAR (categorical head
on a VQ tokenizer), same transformer, equal training FLOPs, on Fashion-MNIST at 32×32.

    python bench/var_continuous.py --work /tmp/var_continuous --flow-steps 1453 --out bench/var_continuous.json
    python bench/var_continuous.py --work /tmp/var_continuous --flow-steps 1453 --heads flow --context-noise 0.5 \
        --out bench/var_continuous.json

(1,453 steps of the 64-wide flow head cost what 1,640 discrete steps do.) The second line trains and scores a flow
run with xAR's noisy context beside the first (its own folder and figures).

--heads and --parts run a part of it (e.g. the scores of one model while the other trains, the timings last on a
quiet machine); every part merges its figures into --out.

Steps (each resumable: a finished run is left as it is, an interrupted one resumes from its last checkpoint):
1. Training FLOPs per image of one step of each model, by torch's FLOP counter (forward + backward of the
   transformer and its head on cached tokens; the frozen tokenizer's encoding, done once into the token cache, is
   not counted). The discrete run gets round(flow_steps · flow FLOPs / discrete FLOPs) steps, so both spend the same.
2. The two trainings with `scalegen train var ... --token-cache` (run folders under --work), same depth, width,
   heads, batch, lr recipe and seed: (a) discrete on the shipped MeanFlow DiT's VQ tokenizer (256 codes, scales
   1,2,3,4,6,8), (b) flow on the shipped DiT's KL tokenizer on the same scales (a head 64 wide with 3 blocks, each
   scale's tokens at unit spread). Both checkpoint at half and full
   budget, so they are compared at two matched FLOP points (--budgets 0.5,1).
3. Guidance sweep at the largest budget on --sweep-samples samples (class-balanced), then the best cfg at --samples
   samples at each budget; FID and accuracy in the shipped classifier's features (`fmnist_report`, the
   reference being its Fashion-MNIST test-set statistics), with --samples real training images as the floor.
4. The final score (best cfg, largest budget, its samples) under sampling seeds 10,000 and 20,000 beside seed 0.
5. Sampling cost: GFLOPs per image (torch's FLOP counter, guidance included; network alone and with the decoder) and
   s/image at batch 1 and 64; the flow head at its default ODE steps and one lower and higher setting.
6. A plot of FID and accuracy against training FLOPs of every model scored so far (--out with .png).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scalegen.data.fashion_mnist import load_fashion_mnist
from scalegen.eval.flops import GIGA, counted_flops
from scalegen.eval.fmnist import fmnist_report
from scalegen.models.sampling_settings import VARSampling
from scalegen.models.var import VAR, VARConfig
from scalegen.runs.loading import load_var

ASSETS = Path(__file__).resolve().parents[1] / "src" / "scalegen" / "assets" / "fashion_mnist"
DISCRETE_TOKENIZER = ASSETS / "dit_meanflow"  # the shipped one-step DiT's multi-scale VQ tokenizer
CONTINUOUS_TOKENIZER = ASSETS / "dit"  # the shipped DiT's KL tokenizer
PATCH_NUMS = (1, 2, 3, 4, 6, 8)
LATENT_CHANNELS = 8
VOCAB_SIZE = 256
NUM_CLASSES = 10
DEPTH, WIDTH, HEADS = 4, 128, 4
FLOW_HEAD_WIDTH, FLOW_HEAD_BLOCKS = 64, 3  # the flow head's MLP (--head-width, --head-blocks)
BATCH_SIZE = 64
SEED = 0
CFG_SWEEP = (1.0, 1.5, 2.5)
FLOW_STEP_SETTINGS = (5, 10, 20)  # the head's default (VARSampling.flow_steps) and one lower and higher
TIMING_BATCHES = (1, 64)
TIMING_IMAGES = 64  # images generated per timing at each batch size
GENERATION_BATCH = 250
HEADS_COMPARED = ("flow", "categorical")
PARTS = ("train", "quality", "seeds", "cost", "plot")
SPREAD_SEEDS = (0, 10_000, 20_000)  # sampling seeds of the spread of the final score
MODEL_LABELS = {"categorical": "discrete VAR (categorical head)", "flow": "continuous VAR (flow head), clean context"}
# The flow head at its defaults; the categorical head with plain draws (no top-k / top-p), the shipped VAR's best.
BASE_SAMPLING = {"flow": VARSampling(), "categorical": VARSampling(top_k=0, top_p=0.0)}


def training_flops_per_image(token_head: str, head_draws: int = 1) -> float:
    """FLOPs of one training step per image: the transformer and its head (the flow head's loss at `head_draws`
    draws per token), forward and backward, on cached tokens."""
    vocab_size = 0 if token_head == "flow" else VOCAB_SIZE
    config = VARConfig.for_depth(DEPTH, width=WIDTH, num_heads=HEADS, num_classes=NUM_CLASSES, patch_nums=PATCH_NUMS,
                                 vocab_size=vocab_size, z_channels=LATENT_CHANNELS, token_head=token_head,
                                 head_width=FLOW_HEAD_WIDTH, head_blocks=FLOW_HEAD_BLOCKS, head_draws=head_draws)
    model = VAR(config).train()
    length = sum(side * side for side in PATCH_NUMS)
    labels = torch.randint(0, NUM_CLASSES, (BATCH_SIZE,))
    var_input = torch.randn(BATCH_SIZE, length - 1, LATENT_CHANNELS)  # (B, L - 1, Cvae)
    if token_head == "flow":
        targets = torch.randn(BATCH_SIZE, length, LATENT_CHANNELS)  # (B, L, Cvae) continuous tokens
    else:
        targets = torch.randint(0, VOCAB_SIZE, (BATCH_SIZE, length))  # (B, L) codebook ids

    def step() -> None:
        output = model(labels, var_input, targets)
        per_position, _ = model.token_head.loss(model, output, targets)  # (B, L)
        per_position.mean().backward()

    return counted_flops(step) / BATCH_SIZE


def checkpoint(run: Path, steps: int) -> Path:
    """The checkpoint of `run` after `steps` steps."""
    return run / "checkpoints" / f"step-{steps:07d}"


def budget_steps(steps: int, fraction: float) -> int:
    """The step at which `fraction` of a `steps`-step budget is spent: the step the training checkpoints at (floor, as
    `steps // 2` for half)."""
    return int(steps * fraction)


def train(run: Path, tokenizer: Path, token_head: str, steps: int, context_noise: float = 0.0,
          head_draws: int = 1) -> None:
    """Train (or resume, or leave as it is when finished) one VAR run with the command line, checkpoints at half and
    full budget."""
    command = [sys.executable, "-m", "scalegen", "train", "var", "--tokenizer", str(tokenizer),
               "--token-head", token_head, "--depth", str(DEPTH), "--width", str(WIDTH), "--num-heads", str(HEADS),
               "--data", "fashion-mnist", "--steps", str(steps), "--batch-size", str(BATCH_SIZE),
               "--token-cache", "--precision", "fp32", "--seed", str(SEED), "--checkpoint-every", str(steps // 2),
               "--keep-checkpoints", "10", "--log-every", "50", "--sample-every", "0", "--eval-every", "0",
               "--out", str(run)]
    if token_head == "flow":
        command += ["--patch-nums", ",".join(map(str, PATCH_NUMS)), "--head-width", str(FLOW_HEAD_WIDTH),
                    "--head-blocks", str(FLOW_HEAD_BLOCKS), "--context-noise", str(context_noise),
                    "--head-draws", str(head_draws)]
    if checkpoint(run, steps).exists():
        return
    subprocess.run(command, check=True)


def balanced_labels(count: int) -> torch.Tensor:
    """Class ids 0..9 repeated: `count` labels, as balanced as `count` allows."""
    return torch.arange(count) % NUM_CLASSES


def sample_images(model: VAR, count: int, settings: VARSampling, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` class-balanced samples as uint8 (N, H, W, 1), and their labels (N,)."""
    labels = balanced_labels(count)
    images = []
    for start in range(0, count, GENERATION_BATCH):
        batch = model.generate(labels[start:start + GENERATION_BATCH], settings=settings, seed=seed + start)
        images.append((batch * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))  # (B, H, W, 1)
    return torch.cat(images).numpy(), labels.numpy()


def score(model: VAR, count: int, settings: VARSampling, seed: int = SEED) -> dict:
    """FID and accuracy of `count` samples in the shipped classifier's features."""
    images, labels = sample_images(model, count, settings, seed)
    report = fmnist_report(images, labels)
    return {"fid": round(report["fid"], 2), "accuracy": round(report["accuracy"], 4), "samples": count}


def real_floor(count: int) -> dict:
    """FID and accuracy of `count` real training images (class-balanced as the samples), the floor of the scores."""
    images, labels = load_fashion_mnist(split="train")
    chosen = torch.cat([torch.nonzero(labels == label).flatten()[:count // NUM_CLASSES] for label in range(NUM_CLASSES)])
    report = fmnist_report(images[chosen].numpy(), labels[chosen].numpy())
    return {"fid": round(report["fid"], 2), "accuracy": round(report["accuracy"], 4), "samples": len(chosen)}


def sampling_cost(model: VAR, settings: VARSampling) -> dict:
    """GFLOPs per image (network alone, and with the decoder) and seconds per image at each timing batch size."""
    labels = balanced_labels(1)
    network = counted_flops(lambda: model.generate_tokens(labels, settings=settings, seed=SEED)) / GIGA
    total = counted_flops(lambda: model.generate(labels, settings=settings, seed=SEED)) / GIGA
    cost = {"gflops_network": round(network, 4), "gflops_with_decoder": round(total, 4)}
    for batch_size in TIMING_BATCHES:
        batch = balanced_labels(batch_size)
        model.generate(batch, settings=settings, seed=SEED)  # warm-up
        started = time.perf_counter()
        for call in range(TIMING_IMAGES // batch_size):
            model.generate(batch, settings=settings, seed=SEED + call)
        cost[f"seconds_per_image_batch_{batch_size}"] = round((time.perf_counter() - started) / TIMING_IMAGES, 5)
    return cost


def quality(run: Path, head: str, steps: int, flops: float, budgets: list[float], samples: int,
            sweep_samples: int) -> dict:
    """The guidance sweep at the largest budget, then FID and accuracy of the best cfg at each budget (a fraction of
    `steps`) and, for the flow head, at its other ODE step settings at the largest budget."""
    checkpoints = {fraction: checkpoint(run, budget_steps(steps, fraction)) for fraction in budgets}
    final = load_var(checkpoints[max(budgets)])
    sweep = {cfg: score(final, sweep_samples, BASE_SAMPLING[head].with_given(cfg=cfg)) for cfg in CFG_SWEEP}
    best_cfg = min(sweep, key=lambda cfg: sweep[cfg]["fid"])
    best = BASE_SAMPLING[head].with_given(cfg=best_cfg)
    at_budget = {}
    for fraction, path in checkpoints.items():
        model = final if fraction == max(budgets) else load_var(path)
        spent = budget_steps(steps, fraction)
        at_budget[f"{fraction:g}"] = {"steps": spent, "training_pflops": round(spent * BATCH_SIZE * flops / 1e15, 4),
                                      **score(model, samples, best)}
    figures = {"training_flops_per_image_step": flops, "steps": steps, "scored_step": budget_steps(steps, max(budgets)),
               "cfg_sweep": {f"{cfg:g}": values for cfg, values in sweep.items()}, "best_cfg": best_cfg,
               "at_budget": at_budget}
    if head == "flow":
        figures["flow_steps_fid"] = {  # the default's figures are the sweep's
            f"{count}": sweep[best_cfg] if count == best.flow_steps
            else score(final, sweep_samples, best.with_given(flow_steps=count)) for count in FLOW_STEP_SETTINGS}
    return figures


def seed_spread(run: Path, head: str, steps: int, best_cfg: float, final_score: dict) -> dict:
    """The final score of the checkpoint after `steps` steps at its best cfg under each of SPREAD_SEEDS, as many
    samples as `final_score` (the quality part's, SEED's: not scored again): how far sampling alone moves it."""
    model = load_var(checkpoint(run, steps))
    settings = BASE_SAMPLING[head].with_given(cfg=best_cfg)
    scored = {key: final_score[key] for key in ("fid", "accuracy", "samples")}  # `score`'s figures, not the budget's
    return {f"{seed}": scored if seed == SEED else score(model, scored["samples"], settings, seed)
            for seed in SPREAD_SEEDS}


def cost(run: Path, head: str, steps: int, best_cfg: float) -> dict:
    """Sampling cost of the checkpoint after `steps` steps at its best cfg (the flow head at each of its ODE step
    settings)."""
    final = load_var(checkpoint(run, steps))
    best = BASE_SAMPLING[head].with_given(cfg=best_cfg)
    if head == "flow":
        return {f"flow_steps_{count}": sampling_cost(final, best.with_given(flow_steps=count))
                for count in FLOW_STEP_SETTINGS}
    return {"plain": sampling_cost(final, best)}


def plot(results: dict, path: Path) -> None:
    """FID and accuracy of every scored model against its training FLOPs (its scores at each budget), one PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 5))
    fid_axes, accuracy_axes = figure.subplots(1, 2)
    for name, entry in results["models"].items():
        points = sorted((values["training_pflops"], values["fid"], values["accuracy"])
                        for values in entry.get("at_budget", {}).values())
        if not points:
            continue
        pflops, fids, accuracies = zip(*points)
        label = MODEL_LABELS.get(name, name.replace("flow_context", "continuous VAR (flow head), noisy context ")
                                 .replace("_draws", ", draws per token "))
        fid_axes.plot(pflops, fids, marker="o", label=label)
        accuracy_axes.plot(pflops, accuracies, marker="o", label=label)
    for axes, metric in ((fid_axes, "FID (shipped classifier's features)"), (accuracy_axes, "classifier accuracy")):
        axes.set_xlabel("training PFLOPs")
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
    figure.suptitle(f"Fashion-MNIST 32px, depth {DEPTH}, width {WIDTH}, batch {BATCH_SIZE}: equal training FLOPs")
    figure.legend(*fid_axes.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8)
    figure.tight_layout(rect=(0, 0.14, 1, 1))  # room for the legend below
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/var_continuous"), help="the two run folders")
    parser.add_argument("--flow-steps", type=int, default=1200, help="training steps of the flow run (batch 64)")
    parser.add_argument("--samples", type=int, default=2000, help="samples (and real images) of the final scores")
    parser.add_argument("--sweep-samples", type=int, default=500, help="samples of each cfg of the sweep")
    parser.add_argument("--budgets", default="0.5,1",
                        help="fractions of the training budget at which both are scored (the sweep and the costs at "
                             "the largest); both runs checkpoint at half and full budget")
    parser.add_argument("--heads", default=",".join(HEADS_COMPARED), help="which models: flow, categorical or both")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="what to do: train, quality (sweep and scores), seeds (the final score under other "
                             "sampling seeds), cost (sampling GFLOPs and seconds; run it on a quiet machine); the "
                             "figures are merged into --out")
    parser.add_argument("--context-noise", type=float, default=0.0,
                        help="the flow run's xAR noisy context (`train var --context-noise`); nonzero: its own run "
                             "folder and figures (flow_context<strength>)")
    parser.add_argument("--head-draws", type=int, default=1,
                        help="the flow run's noise draws per token (`train var --head-draws`); above 1: its own run "
                             "folder and figures (…_draws<count>), and fewer steps, so it spends --flow-steps steps "
                             "of a one-draw head")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the scoring (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("var_continuous.json"))
    args = parser.parse_args()
    heads, parts = args.heads.split(","), args.parts.split(",")
    budgets = [float(fraction) for fraction in args.budgets.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)

    flops = {"flow": training_flops_per_image("flow", args.head_draws),
             "categorical": training_flops_per_image("categorical")}
    budget = args.flow_steps * training_flops_per_image("flow")  # per image: --flow-steps steps of a one-draw head
    steps = {head: round(budget / flops[head]) for head in HEADS_COMPARED}
    flow_name = f"flow_context{args.context_noise:g}" if args.context_noise else "flow"
    flow_name += f"_draws{args.head_draws}" if args.head_draws > 1 else ""
    runs = {"flow": args.work / flow_name, "categorical": args.work / "discrete"}
    names = {"flow": flow_name, "categorical": "categorical"}
    tokenizers = {"flow": CONTINUOUS_TOKENIZER, "categorical": DISCRETE_TOKENIZER}
    results = json.loads(args.out.read_text()) if args.out.exists() else {"models": {}}
    results["setup"] = {"depth": DEPTH, "width": WIDTH, "heads": HEADS, "batch_size": BATCH_SIZE,
                        "patch_nums": list(PATCH_NUMS), "seed": SEED, "precision": "fp32", "flow_steps": args.flow_steps,
                        "machine": "2-core AMD EPYC (AVX512-BF16), torch CPU, shared"}
    for head in heads:
        if "train" in parts:
            train(runs[head], tokenizers[head], head, steps[head], args.context_noise, args.head_draws)
        entry = results["models"].setdefault(names[head], {})
        final_step = budget_steps(steps[head], max(budgets))
        if "quality" in parts:
            results["real_training_images"] = real_floor(args.samples)
            entry.update(quality(runs[head], head, steps[head], flops[head], budgets, args.samples,
                                 args.sweep_samples))
        if "seeds" in parts:
            entry["seed_spread"] = seed_spread(runs[head], head, final_step, entry["best_cfg"],
                                               entry["at_budget"][f"{max(budgets):g}"])
        if "cost" in parts:
            entry["sampling"] = cost(runs[head], head, final_step, entry["best_cfg"])
        print(json.dumps({names[head]: entry}, indent=1), flush=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    if "plot" in parts:
        plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
