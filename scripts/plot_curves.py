"""Training curves of the shipped Fashion-MNIST models: one panel per run, from each run's log.csv.

Usage: python scripts/plot_curves.py RUNS_FOLDER OUT.png   (RUNS_FOLDER holds some of tokenizer/, dit/,
tokenizer_var/, var/: one panel for each found; a column a run does not log is left out)
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

PANELS = {  # run folder -> (title, columns to plot)
    "tokenizer": ("DiT's VQ tokenizer (CPU)", ["l1", "l2", "quantizer"]),
    "dit": ("DiT in that tokenizer's latents (CPU)", ["loss", "mse", "vb", "repa"]),
    "tokenizer_var": ("VAR's VQ tokenizer (GPU, patch GAN)", ["l1", "l2", "quantizer"]),
    "var": ("VAR (GPU)", ["loss", "accuracy"]),
}


def read_log(path: Path) -> dict[str, list[float]]:
    """Columns of a run's log.csv as floats (rows of a resumed run that repeat a step keep the last)."""
    rows = {}
    with path.open() as stream:
        for row in csv.DictReader(stream):
            rows[int(row["step"])] = row
    steps = sorted(rows)
    return {name: [float(rows[step][name]) for step in steps] for name in rows[steps[0]]} if steps else {}


def main(runs: Path, out: Path) -> None:
    """Draw a panel for each run found, two per row, into `out`."""
    panels = {folder: panel for folder, panel in PANELS.items() if (runs / folder / "log.csv").is_file()}
    if not panels:
        sys.exit(f"{runs} holds none of {', '.join(f'{folder}/log.csv' for folder in PANELS)}")
    columns_of_figure = min(len(panels), 2)
    rows_of_figure = -(-len(panels) // columns_of_figure)
    figure, axes = plt.subplots(rows_of_figure, columns_of_figure, figsize=(5 * columns_of_figure, 3.6 * rows_of_figure),
                                squeeze=False)
    for axis, (folder, (title, columns)) in zip(axes.flat, panels.items()):
        log = read_log(runs / folder / "log.csv")
        for column in columns:
            if column in log:
                axis.plot(log["step"], log[column], label=column)
        axis.set(title=title, xlabel="step", yscale="log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
