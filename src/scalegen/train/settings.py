"""The loop settings of every training run (`TrainConfig`) and each kind of model's recipe (`Recipe`, the values
the settings left at None take), free of torch so that the command line's parsers show their defaults without
loading the trainer (scalegen.train.trainer runs the loop, each task module its model)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, get_args

from scalegen.errors import UserError
from scalegen.precision import Precision

Logger = Literal["csv", "tensorboard", "wandb"]
LOGGERS: tuple[str, ...] = get_args(Logger)
# The official VAR recipe's learning rate (utils/lr_control.py): lr = base_lr · batch / 256.
VAR_BASE_LR = 1e-4
VAR_BATCH_REFERENCE = 256
# The smallest batch the official VAR trained at: below it the lr stays the official one at this batch (3e-4 with the
# base lr 1e-4) instead of shrinking with the batch. The linear rule keeps the gradient noise per unit of lr fixed as
# the batch grows; taken below the official batches it leaves AdamW, whose steps are about lr in size whatever the
# gradient's, with a step of 6.25e-6 at batch 16: a tiny VAR's loss stays at ln(vocab) for hundreds of steps, where
# 3e-4 lowers it by 0.3 in 60 steps (tests/train/test_var_learning_rate.py), and the Fashion-MNIST VAR of this project
# trained at 1e-3 on batch 256 (RECIPE.md). The lrs the official VAR-d16 trains with are kept: 3e-4 to 4e-4.
VAR_SMALLEST_OFFICIAL_BATCH = 768
WARMUP_FRACTION = 50  # official warm-up: the first 1/50 of training


@dataclass(frozen=True)
class Recipe:
    """Optimizer, schedule and EMA defaults of one kind of model (the base values: DiT's paper recipe)."""

    batch_size: int = 64  # global, over all ranks and accumulation steps
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = 0.9999  # 0: no EMA copy at all
    grad_clip: float = 0.0  # 0 disables clipping
    warmup_steps: int = 0
    lr_decay_to: float = 1.0  # final lr as a fraction of lr, reached linearly after warm-up; 1.0 = constant
    checkpoint_every: int = 500


RECIPE_FIELDS = tuple(field.name for field in fields(Recipe))
# Each task's recipe, by its `kind` (the task classes read theirs from here): DiT's paper recipe (AdamW lr 1e-4, no
# weight decay, EMA 0.9999, batch 64 here); the tokenizers' (lr 2e-4, no EMA, as the official tokenizer); the official
# VAR recipe (its lr and warm-up follow the batch and the steps: RECIPE_NOTES); the classifier's.
RECIPES: dict[str, Recipe] = {
    "dit": Recipe(),
    "vqvae": Recipe(lr=2e-4, ema_decay=0.0),
    "klvae": Recipe(lr=2e-4, ema_decay=0.0),
    "var": Recipe(weight_decay=0.05, betas=(0.9, 0.95), ema_decay=0.0, grad_clip=2.0, lr_decay_to=0.1),
    "classifier": Recipe(batch_size=128, lr=2e-3, weight_decay=5e-4, ema_decay=0.995, lr_decay_to=0.0,
                         warmup_steps=100, checkpoint_every=1000),
}
# The recipe settings a task's `training_defaults` computes, in words, by the task's kind.
RECIPE_NOTES: dict[str, dict[str, str]] = {
    "var": {"lr": f"base_lr × max(batch, {VAR_SMALLEST_OFFICIAL_BATCH}) / {VAR_BATCH_REFERENCE}",
            "warmup_steps": f"steps / {WARMUP_FRACTION}"},
}


# The smallest value each numeric loop setting accepts (the command line checks them at parse time too).
MINIMUMS = {"steps": 1, "batch_size": 1, "checkpoint_every": 1, "grad_accumulation": 1, "log_every": 1,
            "keep_checkpoints": 1, "max_nonfinite_steps": 1, "max_images": 1, "sample_every": 0, "num_workers": 0, "warmup_steps": 0,
            "lr": 0.0, "weight_decay": 0.0, "grad_clip": 0.0, "ema_decay": 0.0, "lr_decay_to": 0.0, "eval_every": 0,
            "eval_samples": 2}
EvaluatedWeights = Literal["ema", "raw"]
EVALUATED_WEIGHTS: tuple[str, ...] = get_args(EvaluatedWeights)


@dataclass
class TrainConfig:
    """Loop settings shared by every `scalegen train` command (model settings live in the task).

    The settings that default to None are the task's recipe (`TrainingTask.recipe`: `RECIPES`): a VAR trains
    with the official VAR recipe, a DiT with DiT's, unless a value is given here.
    """

    out: str
    steps: int
    batch_size: int | None = None  # global, over all ranks and accumulation steps
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    ema_decay: float | None = None  # 0: no EMA copy, no ema.safetensors
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) at step n; False: constant (official DiT)
    grad_clip: float | None = None  # 0 disables clipping
    warmup_steps: int | None = None
    lr_decay_to: float | None = None  # final lr as a fraction of lr, reached linearly after warm-up; 1.0 = constant
    checkpoint_every: int | None = None
    grad_accumulation: int = 1
    precision: Precision = "auto"
    compile: bool = False  # torch.compile each transformer block in place (regional)
    fsdp: bool = False  # under torchrun: shard the model with FSDP2 instead of replicating it with DDP
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    num_workers: int = 0
    logger: Logger = "csv"
    device: str | None = None
    flip: bool = True
    max_nonfinite_steps: int = 20  # stop after this many steps in a row with a non-finite loss or gradient
    max_images: int | None = None  # train (and cache) on the first N images only: a smoke test
    data_on_device: bool = False  # hold an in-memory data set on the device and gather whole batches there
    eval_every: int = 0  # score generated samples every N steps (0: never): FID, and accuracy on Fashion-MNIST
    eval_samples: int = 1000  # samples of each evaluation, over all ranks
    eval_weights: EvaluatedWeights = "ema"  # the weights evaluated (the raw ones for a run without EMA)
    eval_inception: str | None = None  # Inception weights for data other than Fashion-MNIST
    eval_reference: str | None = None  # reference statistics (ADM .npz or image folder) for data other than Fashion-MNIST

    def __post_init__(self) -> None:
        for name, smallest in MINIMUMS.items():
            value = getattr(self, name)
            if value is not None and not value >= smallest:  # NaN is no value (and compares False)
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} is {value}; it must be at least {smallest}")
        if self.betas is not None and (len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas)):
            raise UserError(f"--betas {','.join(map(str, self.betas))}: give two numbers in [0, 1), e.g. 0.9,0.95")
        if self.ema_decay is not None and self.ema_decay >= 1:
            raise UserError(f"--ema is {self.ema_decay}; an EMA decay must lie in [0, 1) (0: no EMA)")

