"""FID while training (`--eval-every N --eval-samples K`), as REPA and LightningDiT evaluate along the way.

Every N steps each rank draws its share of K class-balanced samples from the EMA weights (or the raw ones) with
the task's sampling settings, rank 0 gathers them into an ADM .npz and scores it: on Fashion-MNIST in the shipped
classifier's features (FID and the accuracy of the asked class), elsewhere with the Inception weights and reference
statistics given by path (FID, sFID, IS, precision and recall where the reference holds images). The random state of
training is put back afterwards, so a run with evaluation trains exactly as one without.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scalegen.classes import FASHION_MNIST_CLASSES, FASHION_MNIST_NAME, class_names
from scalegen.distributed import DistributedContext
from scalegen.errors import UserError
from scalegen.eval.evaluate import evaluate, evaluate_fmnist
from scalegen.eval.samples import sample_to_npz
from scalegen.train.rng import restore_rng_state, rng_state
from scalegen.train.task import TrainingTask

EVAL_SEED = 0  # the same noise and labels at every evaluation: the figures move with the weights only
EVAL_BATCH_SIZE = 64  # samples a rank draws at once
EVAL_DIR = "eval"  # RUN/eval/step-N.npz while it is scored (removed after)


def scores_fashion_mnist(task: TrainingTask) -> bool:
    """Whether a run's samples are Fashion-MNIST images of its classes (scored in the shipped classifier's features)."""
    return (task.extra_config.get("data") == FASHION_MNIST_NAME
            and task.model.config.num_classes == len(FASHION_MNIST_CLASSES))


class Evaluator:
    """Scores a model's samples during training (see the module docstring).

    Args:
        task: the training task; it draws the samples (`TrainingTask.generate`).
        samples: how many samples each evaluation draws, over all ranks.
        run_root: the run folder (the samples are written under RUN/eval/ while they are scored).
        context: this process's place among the ranks.
        inception, reference: Inception weights and reference statistics (an ADM .npz or image folder), needed for
            data other than Fashion-MNIST.
    Raises:
        UserError: the task draws no samples, or neither scorer applies.
    """

    def __init__(self, task: TrainingTask, samples: int, run_root: Path, context: DistributedContext,
                 inception: str | None = None, reference: str | None = None):
        if not task.generates:
            raise UserError(f"--eval-every scores generated samples, and a {task.kind} run generates none; drop it")
        self.fashion = scores_fashion_mnist(task) and inception is None
        if not self.fashion and not (inception and reference):
            raise UserError("--eval-every on data other than Fashion-MNIST needs --eval-inception FILE (the "
                            "pt_inception-2015-12-05 weights) and --eval-reference REF (an ADM .npz or image folder)")
        if samples < 2:
            raise UserError(f"--eval-samples is {samples}; FID needs at least 2 samples")
        self.task, self.samples, self.context = task, samples, context
        self.inception, self.reference = inception, reference
        self.folder = Path(run_root) / EVAL_DIR

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        """Draw and score this step's samples (every rank calls this); returns the figures on rank 0, {} elsewhere."""
        state = rng_state()
        was_training = model.training
        path = self.folder / f"step-{step:07d}.npz"
        try:
            model.eval()
            with torch.no_grad():
                written = sample_to_npz(lambda labels: self.task.generate(model, labels), model.config.num_classes,
                                        self.samples, EVAL_BATCH_SIZE, EVAL_SEED, path, self.context,
                                        class_names(model.config.num_classes, self.task.extra_config))
            if written is None:
                return {}
            if self.fashion:
                scores = evaluate_fmnist(str(written))
            else:
                scores = evaluate(str(written), self.reference, self.inception)
            return {name: float(value) for name, value in scores.items()
                    if name != "num_samples" and isinstance(value, (int, float))}
        finally:
            path.unlink(missing_ok=True)
            model.train(was_training)
            restore_rng_state(state)
