"""Training curves of any runs, from each run's RUN/log.csv (`scalegen plot`).

    plot_curves(["runs/dit-s", "runs/dit-b"], "curves.png")                   # loss against step, a line per run
    plot_curves(runs, "curves.png", ["loss", "mse"], x="images", log_scale=True)  # a panel per figure
    plot_curves(runs, "curves.png", ["l1", "l2"], by="run")                  # a panel per run, a line per figure

Every numeric column a run logs can be plotted; x is the step or the images seen (step × the run's global batch
size, read from its last checkpoint). Rows a resumed run logged twice for one step count once (the last).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scalegen.errors import UserError
from scalegen.runs.folder import LOG_FILE, STATE_FILE, RunFolder, load_training_state
from scalegen.train.curve_axes import STEP, PanelBy, XAxis
from scalegen.train.run_log import read_log

PANELS_PER_ROW = 2
PANEL_WIDTH, PANEL_HEIGHT = 5.0, 3.6  # inches
DPI = 110


def read_curves(run: str | Path) -> dict[str, np.ndarray]:
    """The columns of a run's log.csv, rows in step order (a step logged twice keeps its last row).

    Returns:
        {"step": (T,), figure name: (T,) float64, NaN where a row lacks the figure}.
    """
    if not RunFolder(run).log.is_file():
        raise UserError(f"{run} has no {LOG_FILE}; pass run folders written by `scalegen train` (with the default "
                        "--logger csv)")
    try:
        rows = {int(row[STEP]): row for row in read_log(run) if STEP in row}
    except ValueError as error:
        raise UserError(f"{RunFolder(run).log} holds a value that is not a number ({error})") from None
    if not rows:
        raise UserError(f"{RunFolder(run).log} has no rows yet; plot it once the run has logged a step")
    steps = sorted(rows)
    names = list(dict.fromkeys(name for step in steps for name in rows[step]))
    return {name: np.array([rows[step].get(name, math.nan) for step in steps], dtype=np.float64) for name in names}


def images_per_step(run: str | Path) -> int:
    """The global batch size of a run, as its last checkpoint's training state records it."""
    checkpoint = RunFolder(run).last_checkpoint()
    if checkpoint is None or not (checkpoint / STATE_FILE).is_file():
        raise UserError(f"{run} has no checkpoint with a {STATE_FILE} recording its batch size; plot against steps "
                        "(--x step)")
    return int(load_training_state(checkpoint)["train_config"]["batch_size"])


def run_labels(runs: Sequence[str | Path]) -> list[str]:
    """Legend names: the run folders' names, or their paths where two runs share a name."""
    names = [Path(run).name for run in runs]
    return [name if names.count(name) == 1 else str(run) for name, run in zip(names, runs)]


def plot_curves(runs: Sequence[str | Path], out: str | Path, metrics: Sequence[str] = ("loss",), x: XAxis = STEP,
                by: PanelBy = "metric", log_scale: bool = False) -> Path:
    """Draw runs' logged figures into one image, two panels a row.

    Args:
        runs: run folders (each with a log.csv).
        out: the image to write (PNG).
        metrics: figures (log.csv columns) to draw; each must be logged by at least one run.
        x: "step" or "images" (images seen: step × the run's global batch size).
        by: "metric": a panel per figure, a line per run; "run": a panel per run, a line per figure it logs.
        log_scale: a logarithmic y axis.
    Returns:
        The path written.
    """
    from matplotlib.figure import Figure  # imported here: only plotting needs it

    figure = Figure()
    if Path(out).suffix.lower().lstrip(".") not in figure.canvas.get_supported_filetypes():
        raise UserError(f"--out {out}: {Path(out).suffix or 'no extension'} is no image format; name a .png")
    if not runs:
        raise UserError("give at least one run folder to plot")
    if not metrics:
        raise UserError("give at least one figure to plot, e.g. --metric loss")
    labels = run_labels(runs)
    curves = [read_curves(run) for run in runs]
    available = sorted(set().union(*curves) - {STEP})
    missing = [metric for metric in metrics if metric not in available]
    if missing:
        raise UserError(f"no run logs {', '.join(missing)}; these runs log: {', '.join(available)}")
    positions = [curve[STEP] * (images_per_step(run) if x == "images" else 1) for run, curve in zip(runs, curves)]
    # Each panel: (title, [(legend label, x values, y values), …]).
    runs_drawn = list(zip(labels, positions, curves))
    if by == "metric":
        panels = [(metric, [(label, position, curve[metric]) for label, position, curve in runs_drawn
                            if metric in curve]) for metric in metrics]
    else:
        panels = [(label, [(metric, position, curve[metric]) for metric in metrics if metric in curve])
                  for label, position, curve in runs_drawn]
    columns = min(len(panels), PANELS_PER_ROW)
    rows = math.ceil(len(panels) / columns)
    figure.set_size_inches(PANEL_WIDTH * columns, PANEL_HEIGHT * rows)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for axis, (title, lines) in zip(axes, panels):
        for label, position, values in lines:
            known = ~np.isnan(values)  # a figure logged only on some rows
            axis.plot(position[known], values[known], label=label)
        axis.set(title=title, xlabel="images seen" if x == "images" else STEP,
                 yscale="log" if log_scale else "linear")
        axis.grid(alpha=0.3)
        if lines:
            axis.legend()
    for axis in axes[len(panels):]:  # the empty cell of an odd number of panels
        axis.set_visible(False)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI)
    return out
