"""Training log: CSV (always readable, no extra package), TensorBoard or Weights & Biases (offline), appended across
resumes; TensorBoard and W&B get the sample grids too."""
from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from scalegen.errors import UserError
from scalegen.files import replace_atomically
from scalegen.runs.folder import RunFolder
from scalegen.train.settings import Logger

SAMPLES_TAG = "samples"
EVALUATION_TAG = "evaluation"


class RunLog:
    """Appends one row of figures per logged step to RUN/log.csv (or TensorBoard events in RUN/tensorboard, or an
    offline W&B run in RUN/wandb that `wandb sync` uploads later)."""

    def __init__(self, run: RunFolder, kind: Logger = "csv", enabled: bool = True):
        self.kind, self.enabled, self.path = kind, enabled, run.log
        self.evaluation_path = run.evaluation_log
        self.writer = None
        if enabled and kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter  # an optional package: imported only when asked
            except ImportError:
                raise UserError("--logger tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(run.tensorboard)
        elif enabled and kind == "wandb":
            try:
                import wandb  # an optional package: imported only when asked
            except ImportError:
                raise UserError("--logger wandb needs the wandb package: pip install wandb") from None
            self.writer = wandb.init(project="scalegen", name=run.root.name, dir=run.root, mode="offline")

    def forget_after(self, step: int) -> None:
        """Drop the CSV rows past `step` (logged by a run that crashed before its next checkpoint), so the steps
        trained again are not logged twice."""
        if not self.enabled:
            return
        for path in ([] if self.writer is not None else [self.path]) + [self.evaluation_path]:
            if not path.exists():
                continue
            with open(path, newline="") as stream:
                rows = list(csv.reader(stream))
            kept = rows[:1] + [row for row in rows[1:] if row and float(row[0]) <= step]
            if len(kept) < len(rows):
                replace_atomically(path, partial(write_rows, rows=kept))

    def write(self, step: int, figures: dict[str, float]) -> None:
        """Record the figures of one step."""
        if not self.enabled:
            return
        if self.kind == "tensorboard" and self.writer is not None:
            for name, value in figures.items():
                self.writer.add_scalar(name, value, step)
            return
        if self.kind == "wandb" and self.writer is not None:
            self.writer.log(figures, step=step)
            return
        append_row(self.path, step, figures)

    def write_evaluation(self, step: int, figures: dict[str, float]) -> None:
        """Record one evaluation's figures (FID, …) in RUN/eval.csv, and as `evaluation/…` in TensorBoard or W&B."""
        if not self.enabled:
            return
        append_row(self.evaluation_path, step, figures)
        if self.kind == "tensorboard" and self.writer is not None:
            for name, value in figures.items():
                self.writer.add_scalar(f"{EVALUATION_TAG}/{name}", value, step)
        elif self.kind == "wandb" and self.writer is not None:
            self.writer.log({f"{EVALUATION_TAG}/{name}": value for name, value in figures.items()}, step=step)

    def add_image(self, step: int, path: Path) -> None:
        """Show a sample grid (a PNG) in TensorBoard or W&B; the CSV log keeps its path only in RUN/samples/."""
        if not self.enabled or self.writer is None:
            return
        pixels = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3)
        if self.kind == "tensorboard":
            self.writer.add_image(SAMPLES_TAG, pixels, step, dataformats="HWC")
        else:
            import wandb

            self.writer.log({SAMPLES_TAG: wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        """Flush TensorBoard events or finish the W&B run."""
        if self.kind == "tensorboard" and self.writer is not None:
            self.writer.close()
        elif self.kind == "wandb" and self.writer is not None:
            self.writer.finish()


def write_rows(path: Path, rows: list[list[str]]) -> None:
    """Write CSV rows (the header first) to `path`."""
    with open(path, "w", newline="") as stream:
        csv.writer(stream).writerows(rows)


def append_row(path: Path, step: int, figures: dict[str, float]) -> None:
    """Append a row to a CSV log, whose header its first row set (figures it does not name are left out)."""
    row = {"step": step, **figures}
    header = list(row)
    if path.exists():
        with open(path, newline="") as stream:
            header = next(csv.reader(stream), header)
    new_file = not path.exists()
    with open(path, "a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=header, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerow(row)


def read_log(run_dir: str | Path, evaluations: bool = False) -> list[dict[str, float]]:
    """All rows of RUN/log.csv (RUN/eval.csv with `evaluations`) as floats (missing figures are absent)."""
    run = RunFolder(run_dir)
    with open(run.evaluation_log if evaluations else run.log, newline="") as stream:
        return [{key: float(value) for key, value in row.items() if value not in ("", None)} for row in csv.DictReader(stream)]
