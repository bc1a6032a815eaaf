"""The one trainer every model uses: AdamW, EMA, mixed precision, accumulation, logs, samples, resume.

A model plugs in through a `TrainingTask` (see task.py): it owns the model, its loss, its sample grid and its
recipe; the trainer owns the loop and everything that must survive a crash. How the model is spread over the ranks
(DDP, FSDP), and so the checkpoint format, is a `Parallelism` (see parallel.py) the trainer calls without knowing which.

The hot loop does not wait for the device: losses and figures stay on it as 0-dim tensors, a non-finite step is
skipped there (fused AdamW's `found_inf`, a masked EMA update), and the host reads figures and counts only at log and
checkpoint steps — or every step where it must know the outcome (fp16's scaler, a task with an `after_step`).
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from scalegen.data.batch import collate
from scalegen.data.sampling import OnDevice, epoch_sampler
from scalegen.data.source import DataSource
from scalegen.distributed import DistributedContext, barrier, process_group
from scalegen.errors import UserError
from scalegen.mixed_precision import autocast, resolve_precision
from scalegen.runs.folder import RunFolder, guarded_run
from scalegen.train.evaluation import Evaluator
from scalegen.train.guards import NonFiniteSteps, changed_options, changed_settings, tensors_are_finite
from scalegen.train.optimization import EMA_WARMUP_OFFSET, build_optimizer, ema_start_share, learning_rate_factor
from scalegen.train.parallel import ParallelismFactory, default_parallelism
from scalegen.train.rng import restore_rng_state, rng_state
from scalegen.train.run_log import RunLog
from scalegen.train.settings import RECIPE_FIELDS, TrainConfig
from scalegen.train.sharding import parameters_are_finite
from scalegen.train.stepping import GradientStep, compile_regions, device_figure, mean_figures
from scalegen.train.stopping import Interrupted, StopSignals, StoppedBySignal, ignore_stop_signals
from scalegen.train.task import TrainingTask, parameter_count

# A sample grid drawn from an EMA that holds more than this share of its starting weights gets a hint.
EMA_HINT_SHARE = 0.5


def schedule_summary(config: TrainConfig) -> str:
    """The optimizer settings a run trains with, in words: lr, its warm-up and decay, the EMA decay and warm-up."""
    decay = f"linear decay to {config.lr_decay_to:g}× lr at the end" if config.lr_decay_to != 1 else "then constant"
    ema = f"EMA {config.ema_decay:g}" if config.ema_decay else "no EMA"
    if config.ema_decay and config.ema_warmup:
        ema += f" warmed up as (1 + n) / ({EMA_WARMUP_OFFSET} + n) at step n"
    return f"lr {config.lr:.3g} (warm-up {config.warmup_steps} steps, {decay}), {ema}"


def resolved_config(config: TrainConfig, task: TrainingTask) -> TrainConfig:
    """`config` with every setting left at None taken from the task's recipe for this run."""
    batch_size = config.batch_size if config.batch_size is not None else task.recipe.batch_size
    recipe = task.training_defaults(config.steps, batch_size)
    return replace(config, **{name: getattr(recipe, name) for name in RECIPE_FIELDS if getattr(config, name) is None})


class Trainer:
    """Runs `task` on `dataset` for `config.steps` optimizer steps, resuming from `config.out` when possible.

    Args:
        parallelism: makes the run's `Parallelism` from (context, run folder, checkpoints to keep); None: FSDP's
            `Shard` for `config.fsdp` under torchrun, DDP's `Replicate` otherwise.
    """

    def __init__(self, task: TrainingTask, dataset: DataSource, config: TrainConfig, context: DistributedContext,
                 parallelism: ParallelismFactory | None = None):
        config = resolved_config(config, task)
        if config.data_on_device:
            dataset = OnDevice(dataset, context.device)
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
        self.precision = resolve_precision(config.precision, context.device)
        make_parallel = parallelism or default_parallelism(config.fsdp, context)
        self.parallel = make_parallel(context, self.folder, config.keep_checkpoints)
        self.checkpoints = self.parallel.checkpoints  # writes the strategy's format, reads any format on disk
        # Without EMA (decay 0, as the VAR and tokenizer recipes) there is no copy to keep, update or save.
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval() if config.ema_decay > 0 else None
        self.network = self.parallel.wrap(self.model, self.ema, self.precision)  # what the loss is computed through
        self.optimizer = build_optimizer(task.parameter_groups(config.weight_decay), config.lr, config.betas,
                                         context.device)
        self.parallel.check_optimizer(self.model, self.optimizer)
        self.gradient_step = GradientStep(self.model, self.ema, self.optimizer, self.precision, config.grad_clip,
                                          config.ema_decay, context, config.ema_warmup, task.extra_optimizers())
        self.scaler = self.gradient_step.scaler
        # The host must know each step's outcome where it acts on it: a host-side skip, or a task's `after_step`.
        self.host_outcome = not self.gradient_step.skip_on_device or task.acts_after_step
        self.step = 0
        self.figures: dict[str, float] = {}  # the last logged figures
        self.log: RunLog | None = None
        self.sampler = epoch_sampler(dataset, self.micro_batch, context.rank, context.world_size, config.seed,
                                     config.flip)
        self.evaluator: Evaluator | None = None
        if config.eval_every:
            self.parallel.check_evaluation()
            self.evaluator = Evaluator(task, config.eval_samples, self.folder.root, context, config.eval_inception,
                                       config.eval_reference)

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint (the one `last.json` names unless it is broken), of whichever
        format: weights, EMA, optimizer, step, data position, RNG. A checkpoint that cannot be read is skipped,
        saying why (`CheckpointManager.resume`); one of another model is refused."""
        current = self.task.config()

        def same_model(stored: dict) -> None:
            if stored.get("model") != current.get("model"):
                changed = changed_settings(stored.get("model") or {}, current.get("model") or {})
                raise UserError(f"{self.folder.root} holds a different model: {changed}; use another --out or the "
                                "same options")

        resumed = self.checkpoints.resume(same_model, self.load_state)
        if resumed is None:
            return False
        folder, stored, state = resumed
        if self.context.is_main:
            print(f"resuming {self.folder.root} from step {self.step} ({folder.name})")
            changed = changed_options(state.get("train_config", {}), asdict(self.config), stored, current)
            if changed:
                print(f"options changed since the run was checkpointed (the new values are used): {changed}")
        return True

    def load_state(self, folder: Path, state: dict) -> None:
        """Put a checkpoint's weights, EMA, optimizer, step, task and RNG state in place: the weights, EMA and optimizer
        state through the parallelism (`Parallelism.load`, with the format found in `folder`), the rest from
        `state`, the checkpoint's training state."""
        self.parallel.load(folder, state, self.model, self.ema, self.optimizer)
        if state["scaler"]:  # empty: saved without a scaler (not fp16, or fp16 on a CPU before it had one)
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
                f"{context.device}, {self.precision}, {context.world_size} process(es){self.parallel.summary_words}; "
                f"data {data} ({len(self.dataset):,} items); batch {config.batch_size} = {self.micro_batch} per micro-batch × "
                f"{config.grad_accumulation} accumulation × {context.world_size} rank(s); steps {self.step} → "
                f"{config.steps}; {schedule_summary(config)}; out {self.folder.root}")

    def save(self) -> None:
        """Checkpoint if the weights are finite; every rank contributes its RNG state so each resumes its own stream.
        The parallelism gives its state to the checkpoint manager, which writes it in the parallelism's format
        (`Parallelism.save`)."""
        # Every tensor written must be finite: the model's and EMA's (this rank's shards under FSDP), the task's
        # weight files and state (REPA-E's tokenizer and its optimizer; identical on every rank, checked by rank 0).
        task_weights = self.task.checkpoint_weights() if self.context.is_main else {}
        task_state = self.task.extra_state() if self.context.is_main else {}
        finite = (parameters_are_finite([self.model, self.ema])
                  and tensors_are_finite([task_weights, task_state]))
        states = [(rng_state(), finite)]
        if self.context.enabled:
            states = [None] * self.context.world_size
            torch.distributed.all_gather_object(states, (rng_state(), finite))
        if not all(finite for _, finite in states):
            if self.context.is_main:
                tqdm.write(f"not writing checkpoint step {self.step}: the weights are not finite")
            return
        training_state = {
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "rng": [state for state, _ in states],
            "train_config": asdict(self.config),
            "task": task_state,
        }
        self.parallel.save(self.step, self.task.config(), self.model, self.ema, self.optimizer, training_state,
                           task_weights)

    def samples(self) -> None:
        """Sample grid from the EMA weights (the weights themselves without EMA) into RUN/samples/ (rank 0 only)."""
        # Every rank takes part in gathering the weights (FSDP); rank 0 draws with them, then frees them.
        model = self.parallel.gathered(self.ema if self.ema is not None else self.model)
        if self.context.is_main:
            path = self.folder.sample_grid(self.step)
            path.parent.mkdir(parents=True, exist_ok=True)
            was_training = model.training
            self.task.write_samples(model.eval(), path)
            model.train(was_training)
            if self.log is not None:
                self.log.add_image(self.step, path)
            tqdm.write(f"samples: {path}")
            start_share = ema_start_share(self.config.ema_decay, self.step, self.config.ema_warmup)
            if self.ema is not None and start_share > EMA_HINT_SHARE:
                tqdm.write(f"samples: the EMA still holds {start_share:.0%} of the initial weights at step "
                           f"{self.step}; sample the raw weights with --weights raw or train longer")
        barrier(self.context)

    def run(self) -> dict[str, float]:
        """Train to `config.steps`; returns the last logged figures.

        Raises:
            StoppedBySignal: SIGTERM, SIGINT or SIGUSR1 stopped training at a step boundary, with a checkpoint written
                (see stopping.py); a second Ctrl-C raises `Interrupted`, a KeyboardInterrupt that says what is on disk.
        """
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
            self.dataset, batch_size=self.micro_batch, sampler=self.sampler,
            collate_fn=partial(collate, form=self.dataset.form),
            num_workers=0 if config.data_on_device else config.num_workers, drop_last=True,
            pin_memory=context.device.type == "cuda" and not config.data_on_device,
            # Its own generator: creating the iterator must not consume the global RNG restored on resume.
            generator=torch.Generator().manual_seed(config.seed),
            worker_init_fn=ignore_stop_signals,  # a signal to every process is this one's to act on
        )
        if config.compile:
            compile_regions(self.model)
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
        stop = StopSignals(context)
        try:
            try:
                with stop:  # SIGTERM, SIGINT and SIGUSR1 stop the loop at a step boundary that every rank agrees on
                    self.train_steps(batches, log, progress, interactive, stop)
                if self.step > start_step or not resumed:  # a finished run re-run has nothing new to save
                    self.save()
                if stop.signal_number is None:  # a stopped run has no time to spare for a sample grid
                    self.samples()  # while an FSDP run's last checkpoint is written
            finally:
                progress.close()  # an error's message starts on a line of its own
                self.parallel.close()  # a checkpoint being written is finished, even if training stopped
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the loop: say what is on disk
            raise Interrupted(self.step, self.folder) from None
        log.close()
        if stop.signal_number is not None:
            barrier(context)  # an FSDP run's rank 0 has moved its last checkpoint into place
            raise StoppedBySignal(stop.signal_number, self.step, self.folder)
        if context.is_main:
            loss = self.figures.get("loss")
            print(f"done: steps {start_step} → {self.step} in {time.perf_counter() - started:.1f} s; last loss "
                  f"{loss if loss is None else f'{loss:.4f}'}; checkpoint {self.folder.pointed_checkpoint()}")
        return self.figures

    def train_steps(self, batches, log: RunLog, progress: tqdm, interactive: bool, stop: StopSignals) -> None:
        """The loop: optimizer steps up to `config.steps`, with logging, sample grids and checkpoints on the way; it
        returns early, before the step's checkpoint (the caller writes it), where `stop` says to."""
        config, context = self.config, self.context
        window_start, window_images, skipped = time.perf_counter(), 0, 0
        nonfinite = NonFiniteSteps(config, context.device)
        while self.step < config.steps:
            for group in self.optimizer.param_groups:
                group["lr"] = config.lr * learning_rate_factor(self.step, config)
            logging = (self.step + 1) % config.log_every == 0 or self.step + 1 == config.steps
            step_figures: dict[str, torch.Tensor | float] = {}  # 0-dim float64 tensors on the device
            for micro_step in range(config.grad_accumulation):
                batch = next(batches)
                skipped += batch.skipped
                batch = batch.to(context.device, non_blocking=True)
                with self.parallel.gradient_sync(self.network, micro_step == config.grad_accumulation - 1), \
                        autocast(self.precision, context.device):
                    loss, extra = self.task.loss(self.network, batch)
                self.scaler.scale(loss / config.grad_accumulation).backward()
                for name, value in {"loss": loss, **(extra if logging else {})}.items():  # the loss: for the guard
                    share = device_figure(value, context.device) / config.grad_accumulation  # ()
                    step_figures[name] = step_figures[name] + share if name in step_figures else share
                window_images += len(batch) * context.world_size
            applied = self.gradient_step(step_figures, logging, self.step)
            self.step += 1
            nonfinite.record(applied, self.step)
            checkpointing = self.step % config.checkpoint_every == 0 and self.step != config.steps
            if logging or checkpointing or self.host_outcome:
                nonfinite.read(self.step, self.folder)  # the host's only look at the guard: stops a diverged run
            if self.host_outcome and not nonfinite.in_a_row:
                step_figures.update(self.task.after_step(self.step, context))
            progress.update(1)
            if logging:
                elapsed = time.perf_counter() - window_start
                self.figures = figures = mean_figures(step_figures, context)
                figures.update(lr=self.optimizer.param_groups[0]["lr"], images_per_second=window_images / elapsed)
                figures.update(skipped_images=skipped, nonfinite_steps=nonfinite.total)
                log.write(self.step, figures)
                progress.set_postfix(loss=f"{figures['loss']:.4f}", img_s=f"{figures['images_per_second']:.0f}",
                                     **({"nonfinite": nonfinite.total} if nonfinite.total else {}))
                if context.is_main and not interactive:
                    # The time left at this window's speed, as H:MM:SS.
                    eta = round((config.steps - self.step) * config.batch_size / figures["images_per_second"])
                    with open(self.folder.progress, "a") as stream:
                        stream.write(f"step {self.step}/{config.steps} loss {figures['loss']:.4f} "
                                     f"{figures['images_per_second']:.0f} img/s nonfinite {nonfinite.total} "
                                     f"eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}\n")
                window_start, window_images = time.perf_counter(), 0
            if stop.stopping(self.step, last=self.step == config.steps):
                return
            if config.sample_every and self.step % config.sample_every == 0 and self.step != config.steps:
                self.samples()
            if config.eval_every and self.step % config.eval_every == 0:
                window_start += self.evaluate(log)  # the evaluation's time is no training time
            if checkpointing and not nonfinite.in_a_row:
                self.save()  # not in the middle of skipped steps: the last checkpoint stays the last good one
            self.parallel.poll()  # a checkpoint written in the background moves into place once done

    def evaluate(self, log: RunLog) -> float:
        """Score samples of the evaluated weights (`--eval-every`; every rank draws its share), logged by rank 0 to
        RUN/eval.csv (and TensorBoard or W&B); returns the seconds it took."""
        started = time.perf_counter()
        model = self.ema if self.config.eval_weights == "ema" and self.ema is not None else self.model
        figures = self.evaluator(model, self.step)
        seconds = time.perf_counter() - started
        if self.context.is_main:
            log.write_evaluation(self.step, {**figures, "seconds": seconds})
            tqdm.write(f"evaluation at step {self.step}: "
                       + ", ".join(f"{name} {value:.4g}" for name, value in figures.items()))
        return seconds


def train(task: TrainingTask, dataset: DataSource, config: TrainConfig,
          parallelism: ParallelismFactory | None = None) -> dict[str, float]:
    """Set up (torchrun-aware) distribution, train, and tear down. Returns the last logged figures.

    The run folder is locked while training (rank 0 of a launch holds it); a full disk or an unwritable folder is a
    one-line error that names the intact checkpoint. `parallelism`: as `Trainer`'s.
    """
    with process_group(config.device) as context, guarded_run(config.out):
        return Trainer(task, dataset, config, context, parallelism).run()

