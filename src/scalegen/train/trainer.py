"""The one trainer every model uses: AdamW, EMA, mixed precision, accumulation, DDP, logs, samples, resume.

A model plugs in through a `TrainingTask` (see task.py): it owns the model, its loss, its sample grid and its
recipe; the trainer owns the loop and everything that must survive a crash.
"""
from __future__ import annotations

import copy
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from scalegen.checkpoint import (
    EMA_FILE, MODEL_FILE, RunFolder, load_training_state, read_weights_file, save_checkpoint, stored_config,
)
from scalegen.data import ResumableSampler, collate
from scalegen.distributed import DistributedContext, barrier, cleanup, mean_over_ranks, setup_distributed
from scalegen.errors import UserError
from scalegen.train.run_log import Logger, RunLog
from scalegen.train.task import Recipe, TrainingTask

Precision = Literal["auto", "fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Loop settings shared by every `scalegen train` command (model settings live in the task).

    The settings that default to None are the task's recipe (`TrainingTask.recipe`, see task.py): a VAR trains
    with the official VAR recipe, a DiT with DiT's, unless a value is given here.
    """

    out: str
    steps: int
    batch_size: int | None = None  # global, over all ranks and accumulation steps
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    ema_decay: float | None = None  # 0: no EMA copy, no ema.safetensors
    grad_clip: float | None = None  # 0 disables clipping
    warmup_steps: int | None = None
    lr_decay_to: float | None = None  # final lr as a fraction of lr, reached linearly after warm-up; 1.0 = constant
    checkpoint_every: int | None = None
    grad_accumulation: int = 1
    precision: Precision = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    num_workers: int = 0
    logger: Logger = "csv"
    device: str | None = None
    flip: bool = True


RECIPE_FIELDS = tuple(field.name for field in fields(Recipe))


def resolved_config(config: TrainConfig, task: TrainingTask) -> TrainConfig:
    """`config` with every setting left at None taken from the task's recipe for this run."""
    batch_size = config.batch_size if config.batch_size is not None else task.recipe.batch_size
    recipe = task.training_defaults(config.steps, batch_size)
    return replace(config, **{name: getattr(recipe, name) for name in RECIPE_FIELDS if getattr(config, name) is None})


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up from 0 to 1, then linear decay to `lr_decay_to` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    remaining = max(config.steps - config.warmup_steps, 1)
    progress = (step - config.warmup_steps) / remaining
    return 1.0 + (config.lr_decay_to - 1.0) * progress


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model over every parameter (frozen ones too, as the official code)."""
    ema_parameters = list(ema.parameters())
    model_parameters = [parameter.detach() for parameter in model.parameters()]
    torch._foreach_lerp_(ema_parameters, model_parameters, 1.0 - decay)


def rng_state() -> dict:
    """Every random generator the loop touches, for exact resume."""
    # Plain tensors and int lists only, so the state loads with torch.load(weights_only=True).
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_position": int(numpy_state[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_position"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """"auto" is bf16 on GPU and fp32 on CPU (CPU autocast is slower than fp32 for these models)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


class Trainer:
    """Runs `task` on `dataset` for `config.steps` optimizer steps, resuming from `config.out` when possible."""

    def __init__(self, task: TrainingTask, dataset: Dataset, config: TrainConfig, context: DistributedContext):
        config = resolved_config(config, task)
        self.task, self.dataset, self.config, self.context = task, dataset, config, context
        world = context.world_size * config.grad_accumulation
        if config.batch_size % world:
            raise UserError(
                f"--batch-size {config.batch_size} is not divisible by ranks × accumulation = {world}; change one"
            )
        self.micro_batch = config.batch_size // world
        self.folder = RunFolder(config.out)
        task.to(context.device)
        task.prepare(config.lr)
        self.model = task.model
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing = True
        # Without EMA (decay 0, as the VAR and tokenizer recipes) there is no copy to keep, update or save.
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval() if config.ema_decay > 0 else None
        self.optimizer = torch.optim.AdamW(
            task.parameter_groups(config.weight_decay), lr=config.lr, betas=config.betas, weight_decay=0.0
        )
        self.precision = resolve_precision(config.precision, context.device)
        self.scaler = torch.amp.GradScaler(enabled=self.precision == "fp16")
        self.step = 0
        self.sampler = ResumableSampler(
            len(dataset), self.micro_batch, context.rank, context.world_size, config.seed, config.flip
        )

    def resume(self) -> bool:
        """Continue from RUN/last.json when present: weights, EMA, optimizer, step, data position, RNG."""
        folder = self.folder.last_checkpoint()
        if folder is None:
            return False
        stored = stored_config(folder)
        if stored.get("model") != self.task.config().get("model"):
            raise UserError(
                f"{self.folder.root} holds a different model ({stored.get('model')}); use another --out or the same options"
            )
        self.model.load_state_dict(read_weights_file(folder / MODEL_FILE))
        if self.ema is not None:
            # A run checkpointed without EMA starts its EMA from the current weights.
            ema_file = folder / EMA_FILE if (folder / EMA_FILE).exists() else folder / MODEL_FILE
            self.ema.load_state_dict(read_weights_file(ema_file))
        state = load_training_state(folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.task.load_extra_state(state["task"])
        restore_rng_state(state["rng"][self.context.rank] if self.context.rank < len(state["rng"]) else state["rng"][0])
        if self.context.is_main:
            print(f"resuming {self.folder.root} from step {self.step}")
        return True

    def save(self) -> None:
        """Checkpoint (rank 0 writes; every rank contributes its RNG state so each resumes its own stream)."""
        states = [rng_state()]
        if self.context.enabled:
            states = [None] * self.context.world_size
            torch.distributed.all_gather_object(states, rng_state())
        if self.context.is_main:
            training_state = {
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "step": self.step,
                "rng": states,
                "train_config": asdict(self.config),
                "task": self.task.extra_state(),
            }
            ema_state = self.ema.state_dict() if self.ema is not None else None
            save_checkpoint(
                self.folder.root, self.step, self.task.config(), self.model.state_dict(), ema_state,
                training_state, self.config.keep_checkpoints,
            )
        barrier(self.context)

    def samples(self) -> None:
        """Sample grid from the EMA weights (the weights themselves without EMA) into RUN/samples/ (rank 0 only)."""
        if self.context.is_main:
            path = self.folder.sample_grid(self.step)
            path.parent.mkdir(parents=True, exist_ok=True)
            model = self.ema if self.ema is not None else self.model
            was_training = model.training
            self.task.write_samples(model.eval(), path)
            model.train(was_training)
            tqdm.write(f"samples: {path}")
        barrier(self.context)

    def run(self) -> dict[str, float]:
        """Train to `config.steps`; returns the last logged figures."""
        config, context = self.config, self.context
        self.folder.root.mkdir(parents=True, exist_ok=True)
        if not self.resume():
            if self.ema is not None:
                self.ema.load_state_dict(self.model.state_dict())  # the official code syncs EMA before step 0
            torch.manual_seed(config.seed * context.world_size + context.rank)  # per-rank seed, as DiT's train.py
        self.sampler.start_batch = self.step * config.grad_accumulation
        loader = DataLoader(
            self.dataset, batch_size=self.micro_batch, sampler=self.sampler, collate_fn=collate,
            num_workers=config.num_workers, pin_memory=context.device.type == "cuda", drop_last=True,
            # Its own generator: creating the iterator must not consume the global RNG restored on resume.
            generator=torch.Generator().manual_seed(config.seed),
        )
        network = self.model
        if context.enabled:
            network = DistributedDataParallel(network, device_ids=[context.local_rank] if context.device.type == "cuda" else None)
        if config.compile:
            network = torch.compile(network)
        log = RunLog(self.folder, config.logger, enabled=context.is_main)
        batches = iter(loader)
        progress = tqdm(total=config.steps, initial=self.step, disable=not context.is_main, desc=self.task.kind)
        figures: dict[str, float] = {}
        window_start, window_images, skipped = time.perf_counter(), 0, 0
        self.model.train()
        while self.step < config.steps:
            for group in self.optimizer.param_groups:
                group["lr"] = config.lr * learning_rate_factor(self.step, config)
            step_figures: dict[str, float] = {}
            for micro_step in range(config.grad_accumulation):
                batch = next(batches)
                skipped += batch.pop("skipped")
                batch = {key: value.to(context.device, non_blocking=True) for key, value in batch.items()}
                last_micro = micro_step == config.grad_accumulation - 1
                sync = network.no_sync() if context.enabled and not last_micro else nullcontext()
                autocast = torch.autocast(context.device.type, dtype=AUTOCAST_DTYPES[self.precision]) if self.precision in AUTOCAST_DTYPES else nullcontext()
                with sync, autocast:
                    loss, extra = self.task.loss(network, batch)
                self.scaler.scale(loss / config.grad_accumulation).backward()
                for name, value in {"loss": loss.item(), **extra}.items():
                    step_figures[name] = step_figures.get(name, 0.0) + value / config.grad_accumulation
                window_images += len(batch["label"]) * context.world_size
            if config.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                step_figures["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip).item()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                update_ema(self.ema, self.model, config.ema_decay)
            self.step += 1
            step_figures.update(self.task.after_step(self.step, context))
            progress.update(1)
            if self.step % config.log_every == 0 or self.step == config.steps:
                elapsed = time.perf_counter() - window_start
                figures = {name: mean_over_ranks(value, context) for name, value in step_figures.items()}
                figures.update(lr=self.optimizer.param_groups[0]["lr"], images_per_second=window_images / elapsed)
                figures["skipped_images"] = skipped
                log.write(self.step, figures)
                progress.set_postfix(loss=f"{figures['loss']:.4f}", img_s=f"{figures['images_per_second']:.0f}")
                window_start, window_images = time.perf_counter(), 0
            if config.sample_every and self.step % config.sample_every == 0 and self.step != config.steps:
                self.samples()
            if self.step % config.checkpoint_every == 0 and self.step != config.steps:
                self.save()
        progress.close()
        self.save()
        self.samples()
        log.close()
        return figures


def train(task: TrainingTask, dataset: Dataset, config: TrainConfig) -> dict[str, float]:
    """Set up (torchrun-aware) distribution, train, and tear down. Returns the last logged figures."""
    context = setup_distributed(config.device)
    try:
        return Trainer(task, dataset, config, context).run()
    finally:
        cleanup(context)

