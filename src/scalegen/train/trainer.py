"""The one trainer every model uses: AdamW, EMA, mixed precision, accumulation, DDP, logs, samples, resume.

A model plugs in through a `TrainingTask` (see task.py): it owns the model, its loss, its sample grid and its
recipe; the trainer owns the loop and everything that must survive a crash.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from scalegen.checkpoint import (
    EMA_FILE, MODEL_FILE, RunFolder, guarded_run, load_training_state, save_checkpoint, stored_config,
)
from scalegen.data import ResumableSampler, collate
from scalegen.distributed import (
    DistributedContext, Precision, autocast, barrier, cleanup, mean_over_ranks, resolve_precision, setup_distributed,
)
from scalegen.errors import UserError
from scalegen.files import read_weights_file
from scalegen.train.guards import NonFiniteSteps, changed_options
from scalegen.train.optimization import average_gradients, learning_rate_factor, update_ema
from scalegen.train.rng import restore_rng_state, rng_state
from scalegen.train.run_log import Logger, RunLog
from scalegen.train.task import Recipe, TrainingTask, parameter_count



# The smallest value each numeric loop setting accepts (the command line checks them at parse time too).
MINIMUMS = {"steps": 1, "batch_size": 1, "checkpoint_every": 1, "grad_accumulation": 1, "log_every": 1,
            "keep_checkpoints": 1, "max_nonfinite_steps": 1, "max_images": 1, "sample_every": 0, "num_workers": 0, "warmup_steps": 0,
            "lr": 0.0, "weight_decay": 0.0, "grad_clip": 0.0, "ema_decay": 0.0, "lr_decay_to": 0.0}


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
    max_nonfinite_steps: int = 20  # stop after this many steps in a row with a non-finite loss or gradient
    max_images: int | None = None  # train (and cache) on the first N images only: a smoke test

    def __post_init__(self) -> None:
        for name, smallest in MINIMUMS.items():
            value = getattr(self, name)
            if value is not None and value < smallest:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} is {value}; it must be at least {smallest}")
        if self.betas is not None and (len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas)):
            raise UserError(f"--betas {','.join(map(str, self.betas))}: give two numbers in [0, 1), e.g. 0.9,0.95")
        if self.ema_decay is not None and self.ema_decay >= 1:
            raise UserError(f"--ema is {self.ema_decay}; an EMA decay must lie in [0, 1) (0: no EMA)")


RECIPE_FIELDS = tuple(field.name for field in fields(Recipe))


def resolved_config(config: TrainConfig, task: TrainingTask) -> TrainConfig:
    """`config` with every setting left at None taken from the task's recipe for this run."""
    batch_size = config.batch_size if config.batch_size is not None else task.recipe.batch_size
    recipe = task.training_defaults(config.steps, batch_size)
    return replace(config, **{name: getattr(recipe, name) for name in RECIPE_FIELDS if getattr(config, name) is None})


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
        # Trained beside the model (REPA's projector): DDP does not see them, so the trainer averages their gradients.
        model_parameters = {id(parameter) for parameter in self.model.parameters()}
        self.outside_parameters = [parameter for group in self.optimizer.param_groups for parameter in group["params"]
                                   if id(parameter) not in model_parameters]
        self.precision = resolve_precision(config.precision, context.device)
        self.scaler = torch.amp.GradScaler(enabled=self.precision == "fp16")
        self.step = 0
        self.figures: dict[str, float] = {}  # the last logged figures
        self.log: RunLog | None = None
        self.sampler = ResumableSampler(
            len(dataset), self.micro_batch, context.rank, context.world_size, config.seed, config.flip
        )

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint (the one `last.json` names unless it is broken): weights, EMA,
        optimizer, step, data position, RNG. A checkpoint that cannot be read is skipped, saying why."""
        candidates = self.folder.resume_candidates()
        for folder, problem in candidates:
            try:
                if problem is not None:
                    raise UserError(problem)
                stored = stored_config(folder)
                weights = read_weights_file(folder / MODEL_FILE)
                # A run checkpointed without EMA starts its EMA from the current weights.
                ema_file = folder / EMA_FILE if (folder / EMA_FILE).exists() else folder / MODEL_FILE
                ema_weights = read_weights_file(ema_file) if self.ema is not None else None
                state = load_training_state(folder)
            except UserError as error:
                if self.context.is_main:
                    tqdm.write(f"skipping checkpoint {folder.name if folder else 'pointer'}: {error}")
                continue
            if stored.get("model") != self.task.config().get("model"):
                raise UserError(f"{self.folder.root} holds a different model ({stored.get('model')}); "
                                "use another --out or the same options")
            self.load_state(weights, ema_weights, state)
            if self.context.is_main:
                print(f"resuming {self.folder.root} from step {self.step} ({folder.name})")
                changed = changed_options(state.get("train_config", {}), asdict(self.config))
                if changed:
                    print(f"options changed since the run was checkpointed (the new values are used): {changed}")
            return True
        if candidates:
            raise UserError(f"{self.folder.root} holds checkpoints but none is complete; move the folder away to "
                            "start afresh")
        return False

    def load_state(self, weights: dict, ema_weights: dict | None, state: dict) -> None:
        """Put a checkpoint's weights, EMA, optimizer, step, task and RNG state in place."""
        self.model.load_state_dict(weights)
        if self.ema is not None:
            self.ema.load_state_dict(ema_weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.task.load_extra_state(state["task"])
        restore_rng_state(state["rng"][self.context.rank] if self.context.rank < len(state["rng"]) else state["rng"][0])

    def summary(self) -> str:
        """What this run is about to do, in one line."""
        config, context = self.config, self.context
        parameters = parameter_count(self.model)
        data = self.task.extra_config.get("data", type(self.dataset).__name__)
        return (f"train {self.task.kind}: {type(self.model).__name__} with {parameters / 1e6:.2f} M parameters on "
                f"{context.device}, {self.precision}, {context.world_size} process(es); data {data} "
                f"({len(self.dataset):,} items); batch {config.batch_size} = {self.micro_batch} per micro-batch × "
                f"{config.grad_accumulation} accumulation × {context.world_size} rank(s); steps {self.step} → "
                f"{config.steps}; out {self.folder.root}")

    def weights_are_finite(self) -> bool:
        """Whether every parameter (and EMA parameter) is finite: a checkpoint is written only then. (Buffers may hold
        infinities on purpose, as VAR's attention mask.)"""
        modules = [self.model] + ([self.ema] if self.ema is not None else [])
        return all(bool(torch.isfinite(parameter).all()) for module in modules for parameter in module.parameters())

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
            if self.weights_are_finite():
                save_checkpoint(
                    self.folder.root, self.step, self.task.config(), self.model.state_dict(), ema_state,
                    training_state, self.config.keep_checkpoints,
                )
            else:
                tqdm.write(f"not writing checkpoint step {self.step}: the weights are not finite")
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
            if self.log is not None:
                self.log.add_image(self.step, path)
            tqdm.write(f"samples: {path}")
        barrier(self.context)

    def run(self) -> dict[str, float]:
        """Train to `config.steps`; returns the last logged figures."""
        config, context = self.config, self.context
        if context.is_main:
            self.folder.root.mkdir(parents=True, exist_ok=True)
            self.folder.clean_leftovers()
        barrier(context)
        resumed = self.resume()
        if not resumed:
            if self.ema is not None:
                self.ema.load_state_dict(self.model.state_dict())  # the official code syncs EMA before step 0
            torch.manual_seed(config.seed * context.world_size + context.rank)  # per-rank seed, as DiT's train.py
        start_step = self.step
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
        self.log = log = RunLog(self.folder, config.logger, enabled=context.is_main)
        log.forget_after(self.step)  # rows a crashed run logged past its last checkpoint are logged again
        batches = iter(loader)
        # On a terminal a progress bar; otherwise (a batch job) a line per logged step in RUN/progress.log.
        interactive = sys.stdout.isatty()
        progress = tqdm(total=config.steps, initial=self.step, disable=not (context.is_main and interactive),
                        desc=self.task.kind)
        if context.is_main:
            print(self.summary())
        started = time.perf_counter()
        self.model.train()
        try:
            self.train_steps(batches, network, log, progress, interactive)
        finally:
            progress.close()  # an error's message starts on a line of its own
        if self.step > start_step or not resumed:  # a finished run re-run has nothing new to save
            self.save()
        self.samples()
        log.close()
        if context.is_main:
            loss = self.figures.get("loss")
            print(f"done: steps {start_step} → {self.step} in {time.perf_counter() - started:.1f} s; last loss "
                  f"{loss if loss is None else f'{loss:.4f}'}; checkpoint {self.folder.pointed_checkpoint()}")
        return self.figures

    def train_steps(self, batches, network: nn.Module, log: RunLog, progress: tqdm, interactive: bool) -> None:
        """The loop: optimizer steps up to `config.steps`, with logging, sample grids and checkpoints on the way."""
        config, context = self.config, self.context
        window_start, window_images, skipped, nonfinite = time.perf_counter(), 0, 0, NonFiniteSteps(config)
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
                with sync, autocast(self.precision, context.device):
                    loss, extra = self.task.loss(network, batch)
                self.scaler.scale(loss / config.grad_accumulation).backward()
                for name, value in {"loss": loss.item(), **extra}.items():
                    step_figures[name] = step_figures.get(name, 0.0) + value / config.grad_accumulation
                window_images += len(batch["label"]) * context.world_size
            finite = self.gradient_step(step_figures)
            self.step += 1
            if finite:
                nonfinite.passed()
                step_figures.update(self.task.after_step(self.step, context))
            else:
                nonfinite.skipped(self.step, self.folder)
            progress.update(1)
            if self.step % config.log_every == 0 or self.step == config.steps:
                elapsed = time.perf_counter() - window_start
                self.figures = figures = {name: mean_over_ranks(value, context) for name, value in step_figures.items()}
                figures.update(lr=self.optimizer.param_groups[0]["lr"], images_per_second=window_images / elapsed)
                figures.update(skipped_images=skipped, nonfinite_steps=nonfinite.total)
                log.write(self.step, figures)
                progress.set_postfix(loss=f"{figures['loss']:.4f}", img_s=f"{figures['images_per_second']:.0f}",
                                     **({"nonfinite": nonfinite.total} if nonfinite.total else {}))
                if context.is_main and not interactive:
                    with open(self.folder.progress, "a") as stream:
                        stream.write(f"step {self.step}/{config.steps} loss {figures['loss']:.4f} "
                                     f"{figures['images_per_second']:.0f} img/s nonfinite {nonfinite.total}\n")
                window_start, window_images = time.perf_counter(), 0
            if config.sample_every and self.step % config.sample_every == 0 and self.step != config.steps:
                self.samples()
            if self.step % config.checkpoint_every == 0 and self.step != config.steps and not nonfinite.in_a_row:
                self.save()  # not in the middle of skipped steps: the last checkpoint stays the last good one

    def gradient_step(self, step_figures: dict[str, float]) -> bool:
        """Clip, check and apply this step's gradients (optimizer, scaler, EMA); returns False when the loss or the
        gradients were not finite on any rank, in which case nothing is updated."""
        config = self.config
        finite = math.isfinite(step_figures["loss"])
        if self.context.enabled:
            average_gradients(self.outside_parameters, self.context)
        if config.grad_clip > 0 or self.precision != "fp16":
            self.scaler.unscale_(self.optimizer)
            parameters = [parameter for group in self.optimizer.param_groups for parameter in group["params"]
                          if parameter.grad is not None]
            norm = nn.utils.clip_grad_norm_(parameters, config.grad_clip if config.grad_clip > 0 else math.inf)
            step_figures["grad_norm"] = norm.item()
            # fp16's scaler skips steps with overflowing gradients itself and lowers its scale; they are no failure.
            finite = finite and (math.isfinite(step_figures["grad_norm"]) or self.precision == "fp16")
        finite = mean_over_ranks(float(finite), self.context) == 1.0  # every rank skips together
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                update_ema(self.ema, self.model, config.ema_decay)
        self.optimizer.zero_grad(set_to_none=True)
        return finite


def train(task: TrainingTask, dataset: Dataset, config: TrainConfig) -> dict[str, float]:
    """Set up (torchrun-aware) distribution, train, and tear down. Returns the last logged figures.

    The run folder is locked while training (rank 0 of a launch holds it); a full disk or an unwritable folder is a
    one-line error that names the intact checkpoint.
    """
    context = setup_distributed(config.device)
    try:
        with guarded_run(config.out):
            return Trainer(task, dataset, config, context).run()
    finally:
        cleanup(context)

