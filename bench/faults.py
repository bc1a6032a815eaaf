"""Fault trials (not a test): `kill -9` a tiny `scalegen train dit` at random moments, then check the run resumes.

Each trial starts a training run that checkpoints every step (or re-runs a finished one, which re-saves its last
step), kills it with SIGKILL after a random delay, and runs the same command again to the end. A trial passes when
that second run exits 0 at the last step and its final checkpoint loads. Prints the counts.

    .venv/bin/python bench/faults.py --trials 20
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scalegen.data.fashion_mnist import write_fashion_mnist_subset
from scalegen.runs.folder import last_checkpoint
from scalegen.runs.weights import load_weights

SUBSET = 256
STEPS = 12


def command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "scalegen", "train", "dit", "--model", "DiT-S/4", "--depth", "1", "--hidden-size", "32",
            "--num-heads", "2", "--image-size", "8", "--data", str(data), "--steps", str(STEPS), "--batch-size", "8",
            "--checkpoint-every", "1", "--sample-steps", "2", "--log-every", "1", "--device", "cpu", "--out", str(out)]


def trial(data: Path, out: Path, rerun_finished: bool, longest_delay: float, generator: random.Random) -> str:
    """One kill-and-resume trial; returns "resumed", "failed: …" (and the kill's moment in the words)."""
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    if rerun_finished:
        subprocess.run(command(data, out), env=environment, capture_output=True, check=True)
    process = subprocess.Popen(command(data, out), env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(generator.uniform(0.2, longest_delay))
    finished_before_kill = process.poll() is not None
    process.send_signal(signal.SIGKILL)
    process.wait()
    again = subprocess.run(command(data, out), env=environment, capture_output=True, text=True)
    if again.returncode != 0:
        return f"failed: rc {again.returncode}: {again.stderr.strip().splitlines()[-1:]}"
    folder = last_checkpoint(out)
    load_weights(out)
    if folder is None or not folder.name.startswith(f"step-{STEPS:07d}"):
        return f"failed: ended at {folder}"
    return "resumed (the run had finished first)" if finished_before_kill else "resumed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--longest-delay", type=float, default=6.0, help="seconds; kills land in [0.2, this]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = random.Random(args.seed)
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as root:
        data = write_fashion_mnist_subset(Path(root) / "data", SUBSET)
        for index in range(args.trials):
            rerun = index % 4 == 3  # every fourth trial kills a re-run of a finished run (a re-save)
            outcome = trial(data, Path(root) / f"run{index}", rerun, args.longest_delay, generator)
            key = f"{'re-run of a finished run' if rerun else 'fresh run'}: {outcome}"
            counts[key] = counts.get(key, 0) + 1
            print(f"trial {index + 1}/{args.trials}: {key}", flush=True)
    print("\nsummary:")
    for key, count in sorted(counts.items()):
        print(f"  {count:3d}  {key}")


if __name__ == "__main__":
    main()
