"""Scaling-law fits L = (a·X)^b over several runs, as in the VAR paper (L = (2.5·N)^-0.20, Pearson ≈ -0.998).

Two input layouts:
- a table: a CSV file with a header row, one row per run, holding the two columns named by x and y
  (an optional `name` column labels the points), e.g. `name,params,loss`;
- run folders, as `scalegen train` writes them (or exported folders): a column of the last row of the run's
  `log.csv` is used when present, else the key of its stored config (the last checkpoint's `config.json`, which
  holds `params`, the parameter count); e.g. x=params from the config and y=loss from the final log row.
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from scalegen.errors import UserError
from scalegen.runs.folder import CONFIG_FILE, LOG_FILE, RunFolder
from scalegen.runs.weights import stored_config

NAME_COLUMN = "name"
MIN_POINTS_FOR_CORRELATION = 3  # any two points lie on a line: their Pearson r is ±1 and says nothing
SIGNIFICANT_DIGITS = 4  # of a and b in the report: a handful of runs supports no more
PEARSON_DECIMALS = 4  # enough to tell the VAR paper's -0.998 from a perfect line


@dataclass
class PowerLawFit:
    """L = (a·X)^b, fitted as log L = b·log a + b·log X; pearson is the correlation of log X with log L."""

    a: float
    b: float
    pearson: float
    num_points: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        """L at X."""
        return (self.a * np.asarray(x, dtype=np.float64)) ** self.b


def fit_power_law(x: np.ndarray, y: np.ndarray) -> PowerLawFit:
    """Least-squares fit of L = (a·X)^b in log space.

    Args:
        x: (N,) positive compute / parameter counts.
        y: (N,) positive losses or error rates.
    Returns:
        The fit with its Pearson correlation in log space.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or len(x) != len(y):
        raise UserError(f"a power-law fit needs at least 2 (x, y) points, got {len(x)}")
    if (x <= 0).any() or (y <= 0).any():
        raise UserError("power-law fits need positive x and y values: drop the rows with zero or negative values")
    log_x, log_y = np.log(x), np.log(y)
    if np.ptp(log_x) == 0:
        raise UserError("all runs have the same x: a fit needs runs of different sizes")
    slope, intercept = np.polyfit(log_x, log_y, 1)  # log L = b·log X + b·log a
    pearson = float(np.corrcoef(log_x, log_y)[0, 1]) if np.ptp(log_y) > 0 else 0.0
    return PowerLawFit(a=math.exp(intercept / slope) if slope != 0 else math.nan, b=float(slope),
                       pearson=pearson, num_points=len(x))


def parse_number(text: str, where: str) -> float:
    """A float from a CSV cell or JSON value, with a clear error."""
    try:
        return float(text)
    except (TypeError, ValueError) as error:
        raise UserError(f"{where}: {text!r} is not a number") from error


def read_table(path: str | Path, x_column: str, y_column: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Points from a CSV table with one row per run.

    Args:
        path: CSV file with a header.
        x_column, y_column: header names of the two columns.
    Returns:
        Names (from the `name` column, else row numbers), x and y arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"table {path} not found")
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows or x_column not in rows[0] or y_column not in rows[0]:
        columns = list(rows[0]) if rows else []
        raise UserError(f"{path} needs columns {x_column!r} and {y_column!r} (it has {columns})")
    names = [row.get(NAME_COLUMN) or str(index) for index, row in enumerate(rows)]
    x = [parse_number(row[x_column], f"{path} row {index + 2}") for index, row in enumerate(rows)]
    y = [parse_number(row[y_column], f"{path} row {index + 2}") for index, row in enumerate(rows)]
    return names, np.array(x), np.array(y)


def read_run_value(folder: Path, key: str) -> float:
    """`key` from the last row of the run's log.csv, else from its stored config."""
    log_path = RunFolder(folder).log
    if log_path.is_file():
        with open(log_path, newline="") as file:
            rows = [row for row in csv.DictReader(file) if row.get(key) not in (None, "")]
        if rows:
            return parse_number(rows[-1][key], f"{log_path} column {key}")
    config = stored_config(folder)
    if key in config:
        return parse_number(config[key], f"{folder} {CONFIG_FILE} key {key}")
    raise UserError(f"run {folder} has no {key!r} in {LOG_FILE} or its {CONFIG_FILE}")


def read_runs(folders: list[str | Path], x_key: str, y_key: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Points from run folders (see the module docstring); names are the folder names."""
    paths = [Path(folder) for folder in folders]
    for path in paths:
        if not path.is_dir():
            raise UserError(f"run folder {path} not found")
    x = np.array([read_run_value(path, x_key) for path in paths])
    y = np.array([read_run_value(path, y_key) for path in paths])
    return [path.name for path in paths], x, y


def plot_fit(names: list[str], x: np.ndarray, y: np.ndarray, fit: PowerLawFit, x_label: str, y_label: str,
             out: str | Path) -> None:
    """Log-log scatter of the runs with the fitted line, saved as an image (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(5, 4))
    axes.scatter(x, y, zorder=2)
    for name, x_value, y_value in zip(names, x, y):
        axes.annotate(name, (x_value, y_value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    line_x = np.geomspace(x.min(), x.max(), 100)
    axes.plot(line_x, fit.predict(line_x), "--",
              label=f"{y_label} = ({fit.a:.3g}·{x_label})^{fit.b:.3f}"
                    + ("" if few_points_warning(fit.num_points) else f", r = {fit.pearson:.{PEARSON_DECIMALS}f}"))
    axes.set(xscale="log", yscale="log", xlabel=x_label, ylabel=y_label)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=150)
    pyplot.close(figure)


def significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """`value` rounded to `digits` significant digits (for the report: no digits the fit cannot support)."""
    return float(f"{value:.{digits}g}")


def few_points_warning(num_points: int) -> str | None:
    """Why a fit of `num_points` points says little, or None when it has enough points for its Pearson r to mean
    something."""
    if num_points >= MIN_POINTS_FOR_CORRELATION:
        return None
    return (f"only {num_points} points: any two lie on a line, so the fit passes through them exactly and Pearson's r "
            f"is 1 or -1 whatever the law; give at least {MIN_POINTS_FOR_CORRELATION} runs")


def scaling_report(names: list[str], x: np.ndarray, y: np.ndarray, x_label: str, y_label: str,
                   out: str | Path | None = None) -> dict:
    """Fit, optionally plot, and return the JSON-ready result: a and b to 4 significant digits, Pearson's r to 4
    decimals (None, with a "warning", under 3 points, where it is ±1 by construction)."""
    fit = fit_power_law(x, y)
    if out is not None:
        plot_fit(names, x, y, fit, x_label, y_label, out)
    warning = few_points_warning(fit.num_points)
    return {"formula": f"{y_label} = (a*{x_label})^b", **asdict(fit), "a": significant(fit.a), "b": significant(fit.b),
            "pearson": None if warning else round(fit.pearson, PEARSON_DECIMALS),
            **({"warning": warning} if warning else {}), "plot": str(out) if out else None}
