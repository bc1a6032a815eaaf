"""What stops a run from going wrong quietly: the count of skipped non-finite steps, and the list of options that
changed since a run was checkpointed."""
from __future__ import annotations

import json

from scalegen.checkpoint import RunFolder
from scalegen.errors import UserError


def changed_options(stored: dict, current: dict) -> str:
    """The loop settings that differ from the ones a run was checkpointed with, as "--lr 0.001 (was 0.002), …"."""
    stored, current = json.loads(json.dumps(stored)), json.loads(json.dumps(current))  # tuples and lists alike
    return ", ".join(f"--{name.replace('_', '-')} {value} (was {stored[name]})" for name, value in current.items()
                     if name in stored and stored[name] != value)


class NonFiniteSteps:
    """Counts steps skipped for a non-finite loss or gradient; too many in a row stop training in one line."""

    def __init__(self, config) -> None:
        """`config`: the run's TrainConfig (its max_nonfinite_steps and lr)."""
        self.limit, self.lr = config.max_nonfinite_steps, config.lr
        self.total, self.in_a_row = 0, 0

    def passed(self) -> None:
        self.in_a_row = 0

    def skipped(self, step: int, run: RunFolder) -> None:
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            live = run.pointed_checkpoint() if run.last_pointer.exists() else None
            good = f"the last good checkpoint is {live}" if live else "no checkpoint was written yet"
            raise UserError(f"training diverged: the loss or the gradients were not finite for {self.in_a_row} steps "
                            f"in a row (up to step {step}); {good}; lower --lr (now {self.lr:g}) or set --grad-clip, "
                            "then re-run to resume from it")
