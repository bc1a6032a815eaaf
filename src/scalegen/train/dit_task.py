"""Training a DiT: the task (its objective's loss, sample grid) and `train_dit`, which builds a run from `DiTOptions`
in pixel space, in SD-VAE latents, or in the latents of one of our tokenizers (VQ or KL).

The objective (diffusion/objectives.py: "ddpm", the paper's; "flow", SiT's; "meanflow", one-step) owns the loss and
draws its own times; any of them can add REPA's alignment loss (train/repa.py). On a KL tokenizer, REPA-E tunes the
tokenizer with the DiT (`--end-to-end`, train/end_to_end.py).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from scalegen.data.batch import Batch
from scalegen.data.caches import LatentCache, cache_path, extract_latents
from scalegen.data.names import LATENTS
from scalegen.data.registry import open_source
from scalegen.data.source import limited, run_description
from scalegen.distributed import DistributedContext, setup_distributed
from scalegen.diffusion.objectives import objective_class
from scalegen.errors import UserError
from scalegen.files import json_config
from scalegen.images import grid_labels, save_grid
from scalegen.models.dit import DiT, DiTConfig, preset_config
from scalegen.runs.folder import TOKENIZER_FILE, RunFolder, guarded_run, keep_tokenizer_copy
from scalegen.runs.loading import load_tokenizer
from scalegen.models.sampling_settings import SAMPLING_KEY
from scalegen.tokenizers.codec import (
    TokenizerLatents, kind_of, latent_codec_class, measure_normalization, tokenizer_codec,
)
from scalegen.tokenizers.sd_vae import LatentCodec, load_sd_vae
from scalegen.train.init_from import fine_tuning_origin
from scalegen.train.end_to_end import EndToEnd
from scalegen.train.tokenizer_task import first_images
from scalegen.train.repa import BlockTap, alignment_loss, load_patch_encoder, projector, token_grid_features
from scalegen.train.settings import RECIPES
from scalegen.train.task import GRID_MAX_CLASSES, GRID_PER_CLASS, TrainingTask
from scalegen.train.task_options import DiTOptions, KLLosses, ObjectiveConfig
from scalegen.train.trainer import TrainConfig, train


class DiTTask(TrainingTask):
    """DiT trained with its objective's loss (ddpm: MSE on ε + VLB on the variance; flow: velocity MSE; meanflow:
    the adaptively weighted average-velocity loss), plus REPA's alignment loss when an encoder is given.

    The batch's form is its source's: images (encoded on the fly through the codec when one is given) or cached
    latents (with the images beside them for REPA's encoder). Recipe: the DiT paper's (AdamW lr 1e-4, no weight
    decay, EMA 0.9999, batch 64 here).
    """

    kind = "dit"
    recipe = RECIPES[kind]

    def __init__(
        self,
        model_config: DiTConfig,
        codec: LatentCodec | TokenizerLatents | None = None,
        vae: str | None = None,
        sample_steps: int = 50,
        sample_cfg_scale: float = 4.0,
        extra_config: dict | None = None,
        objective: ObjectiveConfig = ObjectiveConfig(),
        repa_encoder: nn.Module | None = None,
        end_to_end: EndToEnd | None = None,
    ):
        model_config = replace(model_config, objective=objective.name)  # the model's config records its objective
        super().__init__(DiT(model_config, decoder=codec), extra_config)
        self.codec, self.vae, self.objective = codec, vae, objective
        self.training_objective = objective.objective(model_config.learn_sigma, model_config.num_classes,
                                                      model_config.class_dropout_prob, model_config.cfg_interval)
        self.sample_steps, self.sample_cfg_scale = sample_steps, sample_cfg_scale
        self.repa_encoder, self.projector, self.tap = repa_encoder, None, None
        if repa_encoder is not None:
            if not 1 <= objective.repa_depth <= model_config.depth:
                raise UserError(f"--repa-depth {objective.repa_depth} must name a block in 1..{model_config.depth}")
            self.projector = projector(model_config.hidden_size, repa_encoder.feature_dim)
            self.tap = BlockTap(self.model.blocks[objective.repa_depth - 1])
        if end_to_end is not None and self.tap is None:
            raise UserError("--end-to-end tunes the tokenizer through REPA's loss: pass --repa-encoder FILE too")
        self.end_to_end = end_to_end

    def helpers(self) -> list[nn.Module]:
        modules = [module for module in (self.codec, self.repa_encoder, self.projector) if module is not None]
        return modules + (self.end_to_end.modules() if self.end_to_end is not None else [])

    def config(self) -> dict:
        config = {**super().config(), "vae": self.vae, "objective": self.objective.stored(),
                  SAMPLING_KEY: self.sampling()}
        if self.end_to_end is not None:  # the tokenizer's latents as the batch norm normalises them now
            config["tokenizer"] = {**config["tokenizer"], **self.end_to_end.normalization().description(),
                                   "end_to_end": True}
        return config

    def prepare(self, lr: float) -> None:
        if self.end_to_end is not None:
            self.end_to_end.prepare(lr)

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        """An end-to-end run's tokenizer optimizer, stepped or skipped with the DiT's."""
        return [self.end_to_end.optimizer] if self.end_to_end is not None else []

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        groups = super().parameter_groups(weight_decay)
        if self.projector is not None:
            groups.append({"params": list(self.projector.parameters()), "weight_decay": weight_decay})
        return groups

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        extra = {}
        if self.end_to_end is not None:
            normalized, tokenizer_loss, extra = self.end_to_end.encode(batch.image)  # (B, c, h, w), (), figures
            x_start = normalized.detach()  # the diffusion loss stops at the latents
        elif batch.form == LATENTS:
            x_start = batch.latent  # (B, C_latent, h, w)
        elif self.codec is not None:
            x_start = self.codec.encode(batch.image)  # (B, C_latent, h, w)
        else:
            x_start = batch.image  # (B, C, H, W)
        terms = self.training_objective.training_losses(model, x_start, model_kwargs={"y": batch.label})
        loss = terms["loss"].mean()
        extra.update({name: terms[name].detach().mean() for name in ("mse", "vb") if name in terms})  # () each
        if self.tap is not None:
            alignment = self.repa_loss(batch.image)
            loss = loss + self.objective.repa_weight * alignment
            extra["repa"] = alignment.detach()  # ()
        if self.end_to_end is not None:
            tokenizer_alignment = self.tokenizer_alignment_loss(normalized, batch)
            loss = loss + tokenizer_loss + self.end_to_end.alignment_weight * tokenizer_alignment
            extra["tokenizer_repa"] = tokenizer_alignment.detach()  # ()
        return loss, extra

    def repa_loss(self, images: torch.Tensor, project: nn.Module | None = None) -> torch.Tensor:
        """REPA's alignment of the tapped block's tokens (of the objective's last forward, which every objective runs on
        the whole batch) with the encoder's features of the clean images, projected by `project` (default: the
        projector)."""
        tokens = self.tap.take()  # (B, T', D)
        grid = self.model.config.input_size // self.model.config.patch_size
        tokens = tokens[:, -grid * grid :]  # (B, T, D): image tokens only (in-context blocks put theirs first)
        target = token_grid_features(self.repa_encoder(images).float(), grid)  # (B, T, C)
        return alignment_loss((project or self.projector)(tokens), target).mean()

    def tokenizer_alignment_loss(self, normalized: torch.Tensor, batch: Batch) -> torch.Tensor:
        """REPA-E: REPA's loss of a second pass on the latents with gradients (B, c, h, w), through the DiT and the
        projector with their weights detached, so that it trains the tokenizer only."""
        def detached(module: nn.Module):
            weights = {name: tensor.detach() for name, tensor in module.state_dict(keep_vars=True).items()}
            return lambda *args, **kwargs: functional_call(module, weights, args, kwargs)

        self.training_objective.training_losses(detached(self.model), normalized, model_kwargs={"y": batch.label})
        return self.repa_loss(batch.image, detached(self.projector))

    @property
    def acts_after_step(self) -> bool:
        return self.end_to_end is not None  # a plain DiT run keeps its hot loop free of host reads

    def after_step(self, step: int, context: DistributedContext) -> dict[str, float]:
        """The tokenizer's step in an end-to-end run."""
        return self.end_to_end.step(step, context) if self.end_to_end is not None else {}

    def checkpoint_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """An end-to-end run keeps the tokenizer of each step beside it."""
        if self.end_to_end is None:
            return {}
        return {TOKENIZER_FILE: self.end_to_end.tokenizer.state_dict()}  # the checkpoint writer copies it

    def extra_state(self) -> dict:
        state = {"projector": self.projector.state_dict()} if self.projector is not None else {}
        if self.end_to_end is not None:
            state["end_to_end"] = self.end_to_end.state()
        return state

    def load_extra_state(self, state: dict) -> None:
        if self.projector is not None and "projector" in state:
            self.projector.load_state_dict(state["projector"])
        if self.end_to_end is not None and "end_to_end" in state:
            self.end_to_end.load_state(state["end_to_end"])

    def write_samples(self, model: nn.Module, path: Path) -> None:
        classes = list(range(min(model.config.num_classes, GRID_MAX_CLASSES)))
        images = self.generate(model, grid_labels(classes, GRID_PER_CLASS), seed=0)  # (N, C, H, W) in [0, 1]
        save_grid(images, len(classes), path)

    def generate(self, model: nn.Module, labels: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """With the run's sampling settings (`sampling`)."""
        if self.end_to_end is not None:
            self.end_to_end.sync_codec()
        return model.generate(labels, **self.sampling(), seed=seed)  # (B, C, H, W)

    def sampling(self) -> dict:
        """The run's sampling settings, its recommended ones (the config's `sampling` section): its sample steps and
        guidance as its objective samples with it (`Objective.sampling_cfg`: a MeanFlow model with guidance trained in
        takes cfg 1) with the objective's default sampler."""
        cfg = self.training_objective.sampling_cfg(self.sample_cfg_scale)
        return {"cfg": cfg, "steps": self.sample_steps, "sampler": self.model.objective.default_sampler}


def dit_model_config(options: DiTOptions, input_size: int, in_channels: int, num_classes: int) -> DiTConfig:
    """The DiT config for a training run: the preset on inputs (in_channels, input_size²), with any overrides
    (checked when the DiT is built)."""
    config = preset_config(
        options.model, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
        class_dropout_prob=options.class_dropout, learn_sigma=options.learns_sigma, block=options.block,
        objective=options.objective.name, cfg_interval=options.cfg_interval,
        norm=options.norm, mlp=options.mlp, rope=options.rope, qk_norm=options.qk_norm,
    )
    for name in ("depth", "hidden_size", "num_heads", "patch_size"):
        if getattr(options, name) is not None:
            setattr(config, name, getattr(options, name))
    return config


def tokenizer_latents(options: DiTOptions, dataset, run: RunFolder,
                      device: str | None) -> tuple[TokenizerLatents, dict]:
    """The codec of `options.tokenizer` (as its registered kind makes it) and its stored description; its weights
    are copied into the run folder."""
    tokenizer = load_tokenizer(options.tokenizer)
    latent_codec_class(tokenizer, f"the tokenizer {options.tokenizer}")  # a one-line error for a kind without one
    kind = kind_of(tokenizer)
    if tokenizer.image_size != options.image_size or tokenizer.config.in_channels != dataset.channels:
        raise UserError(f"the tokenizer encodes {tokenizer.image_size}px images of {tokenizer.config.in_channels} "
                        f"channel(s), the data are {options.image_size}px with {dataset.channels}; match --image-size "
                        "or train a tokenizer on this data")
    if options.end_to_end and not kind.end_to_end:
        raise UserError("--end-to-end tunes a KL tokenizer (`scalegen train kl`); a VQ tokenizer's codes have no "
                        "gradient to tune through")
    context = setup_distributed(device)
    if context.is_main and not options.end_to_end:  # an end-to-end run keeps its tokenizer with each checkpoint
        keep_tokenizer_copy(tokenizer.state_dict(), run.root)
    description = {"kind": kind.name, "model": json_config(tokenizer.config),
                   "source": str(Path(options.tokenizer).resolve()),
                   **measure_normalization(tokenizer, dataset, context.device)}
    return tokenizer_codec(tokenizer, description), description


def train_dit(options: DiTOptions, config: TrainConfig) -> dict[str, float]:
    """Train (or resume) a DiT run in `config.out`; returns the last logged figures.

    Args:
        options: the model, latent space and data.
        config: the loop settings; those left at None follow the DiT recipe (`DiTTask.recipe`).
    """
    with guarded_run(config.out):
        if options.tokenizer and not options.pixel_space:
            raise UserError("pass --vae or --tokenizer, not both: each chooses the latent space")
        if options.end_to_end and (not options.tokenizer or options.latent_cache or config.fsdp):
            raise UserError("--end-to-end tunes the tokenizer of --tokenizer KL_RUN as it trains: it needs --tokenizer "
                            "and works without --latent-cache (the latents change) and without --fsdp")
        objective = options.objective_config()
        if config.fsdp and objective_class(objective.name).forward_mode:
            raise UserError(f"--objective {objective.name} differentiates the network in forward mode, which FSDP2's "
                            "sharded parameters do not support: train it with DDP (leave out --fsdp)")
        encoder = load_patch_encoder(options.repa_encoder) if options.repa_encoder else None
        run = RunFolder(config.out)
        dataset = limited(open_source(options.data, options.image_size), config.max_images)
        if encoder is not None and dataset.channels != encoder.stages[0][0].in_channels:
            raise UserError(f"the REPA encoder sees images of {encoder.stages[0][0].in_channels} channel(s), the data "
                            f"have {dataset.channels}; train an encoder on this data")
        extra_config = run_description(options.data, options.image_size, dataset)
        if options.tokenizer:
            codec, extra_config["tokenizer"] = tokenizer_latents(options, dataset, run, config.device)
            in_channels, input_size = codec.latent_channels, codec.latent_size
        elif not options.pixel_space:
            codec = load_sd_vae(options.vae)
            if options.image_size % codec.downsample_ratio:
                raise UserError(f"--image-size {options.image_size} must be a multiple of {codec.downsample_ratio} "
                                "with this VAE")
            in_channels, input_size = codec.latent_channels, options.image_size // codec.downsample_ratio
        else:
            codec, in_channels, input_size = None, dataset.channels, options.image_size
        model_config = dit_model_config(options, input_size, in_channels, dataset.num_classes)
        if codec is not None and options.latent_cache:
            context = setup_distributed(config.device)
            cache = cache_path(run.latent_cache, run.earlier_latent_cache)
            if cache == run.latent_cache:  # every rank encodes its shards of it (a complete cache is kept as it is)
                extract_latents(codec, dataset, cache, device=context.device, context=context,
                                num_workers=config.num_workers)
            # Its batches are latents (with the images for REPA's encoder); the codec only decodes sample grids.
            dataset = LatentCache(cache, images=dataset if encoder is not None else None)
        vae = None if options.pixel_space else options.vae
        torch.manual_seed(config.seed)  # the initial weights follow --seed (and are the same on every rank)
        end_to_end = None
        if options.end_to_end:
            end_to_end = EndToEnd(codec, KLLosses(), first_images(dataset), options.end_to_end_weight,
                                  options.tokenizer_lr)
        task = DiTTask(model_config, codec, vae, options.sample_steps, options.sample_cfg, extra_config, objective,
                       encoder, end_to_end)
        if encoder is not None:
            task.extra_config["repa_encoder"] = str(Path(options.repa_encoder).resolve())
        if options.init_from:
            task.extra_config["init_from"] = fine_tuning_origin(task.model, options.init_from, config.out)
        return train(task, dataset, config)
