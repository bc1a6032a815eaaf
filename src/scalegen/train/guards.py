"""What stops a run from going wrong quietly: the count of skipped non-finite steps, the finiteness check of what a
checkpoint writes, and the list of options that changed since a run was checkpointed."""
from __future__ import annotations

import json

import torch

from scalegen.errors import UserError
from scalegen.runs.folder import RunFolder


# What a task's stored config holds that no option of a resumed run changes: the model (a run refuses another one),
# its size and class names (they follow from the model and the data), and the weights a fine-tuning run first loaded.
TASK_FACTS = ("kind", "model", "params", "classes", "init_from")


def changed_options(stored: dict, current: dict, stored_task: dict, current_task: dict) -> str:
    """The options that differ from the ones a run was checkpointed with, as "--lr 0.001 (was 0.002), --vae B (was A),
    objective repa_weight 0.3 (was 0.5)": the loop's (its `TrainConfig`) and the task's that change what is trained
    (the data, image size, latent space, encoders and settings such as the objective's). A network loaded from a file
    (a tokenizer) is named by its path; a setting one config lacks reads as none.

    Args:
        stored, current: the loop settings, as checkpointed and as now.
        stored_task, current_task: the task's config (`TrainingTask.config`), as checkpointed and as now.
    """
    stored, current, stored_task, current_task = json.loads(json.dumps([stored, current, stored_task, current_task]))
    changes = [f"--{name.replace('_', '-')} {value} (was {stored[name]})" for name, value in current.items()
               if name in stored and stored[name] != value]
    for name in dict.fromkeys([*current_task, *stored_task]):
        value, earlier = current_task.get(name), stored_task.get(name)
        if name in TASK_FACTS or value == earlier:
            continue
        if any(isinstance(setting, dict) and "source" in setting for setting in (value, earlier)):
            # A network loaded from a file (a tokenizer): its path; what else it records follows from it and the data.
            value, earlier = (setting.get("source") if isinstance(setting, dict) else setting
                              for setting in (value, earlier))
            if value != earlier:
                changes.append(f"--{name.replace('_', '-')} {shown(value)} (was {shown(earlier)})")
        elif isinstance(value, dict) or isinstance(earlier, dict):  # a group of settings (the objective's): each one
            value, earlier = value or {}, earlier or {}
            changes += [f"{name} {setting} {shown(value.get(setting))} (was {shown(earlier.get(setting))})"
                        for setting in dict.fromkeys([*value, *earlier]) if value.get(setting) != earlier.get(setting)]
        else:
            changes.append(f"--{name.replace('_', '-')} {shown(value)} (was {shown(earlier)})")
    return ", ".join(changes)


def shown(value: object) -> str:
    """A task setting in the list of changes: none for a missing one, a string as it is."""
    return "none" if value is None else value if isinstance(value, str) else json.dumps(value)


def changed_settings(stored: dict, current: dict) -> str:
    """The settings (e.g. of a model config) that differ between `stored` and `current`, as
    "input_size 16 (was 8), depth 2 (was 1)"; a setting one of them lacks reads as null."""
    stored, current = json.loads(json.dumps(stored)), json.loads(json.dumps(current))  # tuples and lists alike
    return ", ".join(f"{name} {json.dumps(current.get(name))} (was {json.dumps(stored.get(name))})"
                     for name in dict.fromkeys([*current, *stored]) if current.get(name) != stored.get(name))


def tensors_are_finite(nest: object) -> bool:
    """Whether every floating-point tensor in a nest of dicts, lists and tuples (state dicts, optimizer states) is
    finite: what a checkpoint writes beside the model must not be NaN either."""
    if isinstance(nest, torch.Tensor):
        return not nest.is_floating_point() or bool(torch.isfinite(nest).all())
    if isinstance(nest, dict):
        return all(tensors_are_finite(value) for value in nest.values())
    if isinstance(nest, (list, tuple)):
        return all(tensors_are_finite(value) for value in nest)
    return True


class NonFiniteSteps:
    """Counts steps skipped for a non-finite loss or gradient; too many in a row stop training in one line.

    The counts live on the device (`record` needs no host sync); `read` brings them to the host, which the trainer
    does at log and checkpoint steps (every step where the host must know, e.g. a task's `after_step`). A diverged
    run therefore stops at the first read after its limit was reached, and says at which step it was reached.
    """

    def __init__(self, config, device: torch.device) -> None:
        """`config`: the run's TrainConfig (its max_nonfinite_steps and lr); `device`: where the counts live."""
        self.limit, self.lr = config.max_nonfinite_steps, config.lr
        self.total, self.in_a_row = 0, 0  # as of the last `read`
        # (3,) long: skipped steps in all, in a row now, and the step where the row first reached the limit (0: not)
        self.counts = torch.zeros(3, dtype=torch.long, device=device)

    def record(self, applied: torch.Tensor, step: int) -> None:
        """Count optimizer step `step`, applied or skipped (`applied`: a 0-dim bool tensor on the device)."""
        skipped = (~applied).long()  # ()
        in_a_row = (self.counts[1] + 1) * skipped  # ()
        reached = torch.where((self.counts[2] == 0) & (in_a_row >= self.limit), step, self.counts[2])  # ()
        self.counts = torch.stack([self.counts[0] + skipped, in_a_row, reached])  # (3,)

    def read(self, step: int, run: RunFolder) -> None:
        """Bring the counts to the host (one sync); stop the run, naming its last good checkpoint, once too many steps
        in a row were skipped."""
        self.total, self.in_a_row, reached = self.counts.tolist()
        if reached:
            noticed = f", noticed at step {step}" if reached != step else ""
            live = run.pointed_checkpoint() if run.last_pointer.exists() else None
            good = f"the last good checkpoint is {live}" if live else "no checkpoint was written yet"
            raise UserError(f"training diverged: the loss or the gradients were not finite for {self.limit} steps "
                            f"in a row (up to step {reached}{noticed}); {good}; lower --lr (now {self.lr:g}) or set "
                            "--grad-clip, then re-run to resume from it")
