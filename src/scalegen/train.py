"""The one trainer every model uses: AdamW, EMA, mixed precision, accumulation, DDP, logs, samples, resume.

A model plugs in through a `TrainingTask` (see objectives.py): it owns the model, its loss and its sample grid;
the trainer owns the loop and everything that must survive a crash.
"""
from __future__ import annotations

import copy
import json
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from scalegen.checkpoint import last_checkpoint, load_training_state, save_checkpoint
from scalegen.data import ResumableSampler, collate
from scalegen.distributed import DistributedContext, barrier, cleanup, mean_over_ranks, setup_distributed
from scalegen.errors import UserError
from scalegen.run_log import RunLog

Precision = Literal["auto", "fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Loop settings shared by every `scalegen train` command (model settings live in the task)."""

    out: str
    steps: int
    batch_size: int = 64  # global, over all ranks and accumulation steps
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = 0.9999
    grad_accumulation: int = 1
    grad_clip: float = 0.0  # 0 disables clipping
    warmup_steps: int = 0
    lr_decay_to: float = 1.0  # final lr as a fraction of lr, reached linearly after warm-up; 1.0 = constant
    precision: Precision = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_workers: int = 0
    logger: Literal["csv", "tensorboard"] = "csv"
    device: str | None = None
    flip: bool = True


class TrainingTask(Protocol):
    """What a model must provide to be trained."""

    kind: str
    model: nn.Module

    def to(self, device: torch.device) -> None:
        """Move the model and any frozen helper (e.g. a VAE) to `device`."""

    def config(self) -> dict:
        """JSON-able description stored with every checkpoint (enough to rebuild the model)."""

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss of one micro-batch and extra figures to log."""

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups (e.g. no decay on norms and embeddings)."""

    def write_samples(self, model: nn.Module, path: Path) -> None:
        """Write a sample grid drawn from `model` (the EMA weights) to `path`."""


# Optional task hooks, looked up with getattr so a task without them trains unchanged:
#   after_step(step, context) -> dict[str, float]: runs on every rank after each optimizer step (a second
#       optimizer such as a GAN discriminator, codebook statistics); the figures it returns are logged.
#   extra_state() -> dict and load_extra_state(state): task state beyond the model (a discriminator and its
#       optimizer, counters), saved in training_state.pt (tensors and plain containers only) and restored on resume.


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
        self.task, self.dataset, self.config, self.context = task, dataset, config, context
        world = context.world_size * config.grad_accumulation
        if config.batch_size % world:
            raise UserError(
                f"--batch-size {config.batch_size} is not divisible by ranks × accumulation = {world}; change one"
            )
        self.micro_batch = config.batch_size // world
        self.run_dir = Path(config.out)
        task.to(context.device)
        self.model = task.model
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing = True
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
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
        folder = last_checkpoint(self.run_dir)
        if folder is None:
            return False
        stored = json.loads((folder / "config.json").read_text())
        if stored.get("model") != self.task.config().get("model"):
            raise UserError(
                f"{self.run_dir} holds a different model ({stored.get('model')}); use another --out or the same options"
            )
        self.model.load_state_dict(load_file(folder / "model.safetensors"))
        self.ema.load_state_dict(load_file(folder / "ema.safetensors"))
        state = load_training_state(folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        if hasattr(self.task, "load_extra_state"):
            self.task.load_extra_state(state["task"])
        restore_rng_state(state["rng"][self.context.rank] if self.context.rank < len(state["rng"]) else state["rng"][0])
        if self.context.is_main:
            print(f"resuming {self.run_dir} from step {self.step}")
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
            }
            if hasattr(self.task, "extra_state"):
                training_state["task"] = self.task.extra_state()
            save_checkpoint(
                self.run_dir, self.step, self.task.config(), self.model.state_dict(), self.ema.state_dict(),
                training_state, self.config.keep_checkpoints,
            )
        barrier(self.context)

    def samples(self) -> None:
        """Sample grid from the EMA weights into RUN/samples/ (rank 0 only)."""
        if self.context.is_main:
            path = self.run_dir / "samples" / f"step-{self.step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.task.write_samples(self.ema, path)
            tqdm.write(f"samples: {path}")
        barrier(self.context)

    def run(self) -> dict[str, float]:
        """Train to `config.steps`; returns the last logged figures."""
        config, context = self.config, self.context
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume():
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
        log = RunLog(self.run_dir, config.logger, enabled=context.is_main)
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
            update_ema(self.ema, self.model, config.ema_decay)
            self.step += 1
            if hasattr(self.task, "after_step"):
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


def add_training_options(parser) -> None:
    """The loop options every `scalegen train` command shares (defaults: the DiT recipe)."""
    parser.add_argument("--out", required=True, help="run folder; re-running with the same folder resumes")
    parser.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--ema", type=float, default=0.9999, dest="ema_decay", help="EMA decay")
    parser.add_argument("--grad-accumulation", type=int, default=1)
    parser.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0: off)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--lr-decay-to", type=float, default=1.0, help="final lr fraction after linear decay")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--sample-every", type=int, default=0, help="sample grid every N steps (0: at the end)")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--logger", choices=["csv", "tensorboard"], default="csv")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def train_config_from_args(args) -> TrainConfig:
    """Build the TrainConfig from parsed `add_training_options` arguments."""
    names = TrainConfig.__dataclass_fields__
    return TrainConfig(**{name: getattr(args, name) for name in names if hasattr(args, name)})
