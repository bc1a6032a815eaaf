"""Training a VAR on a frozen tokenizer: the task (teacher forcing over all scales with its token head's loss, VAR's
head's cross-entropy or the flow head's flow matching; sample grid) and `train_var`, which builds a run from
`VAROptions` (a flow head's tokenizer: a KL tokenizer's latents on a scale plan, `head_tokenizer`).

The recipe is the official VAR one: AdamW (0.9, 0.95), weight decay 0.05 (not on norms, biases, embeddings and
positions), gradient clipping at 2, lr = base_lr · batch / 256 at the official batch sizes (768 to 1024) and
base_lr · 768 / 256 below them, warm-up over the first 1/50 of training, then a linear decay to 0.1 of the lr, no
EMA.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from scalegen.data.batch import Batch
from scalegen.data.caches import TokenCache, cache_path, extract_tokens
from scalegen.data.names import TOKENS
from scalegen.data.registry import open_source
from scalegen.data.source import DataSource, limited, run_description
from scalegen.distributed import setup_distributed
from scalegen.errors import UserError
from scalegen.files import json_config, read_weights_file
from scalegen.images import grid_labels, save_grid
from scalegen.models.sampling_settings import FLOW_DEFAULTS, SAMPLING_KEY, VAR_DEFAULTS
from scalegen.models.token_heads import TokenHead, build_token_head, token_head_class
from scalegen.models.var import VAR, VARConfig
from scalegen.runs.folder import RunFolder, guarded_run, keep_tokenizer_copy
from scalegen.runs.loading import load_tokenizer, token_tokenizer
from scalegen.tokenizers.codec import kind_of
from scalegen.tokenizers.continuous_scales import (
    NORMALIZATION_SCALE, NORMALIZATION_SHIFT, TOKEN_SCALE, ContinuousScales, default_patch_nums,
    measure_mean_normalization, measure_token_scales,
)
from scalegen.tokenizers.kl_vae import KLVAE, LatentNormalization
from scalegen.train.init_from import fine_tuning_origin
from scalegen.train.settings import (
    RECIPE_NOTES, RECIPES, VAR_BASE_LR, VAR_BATCH_REFERENCE, VAR_SMALLEST_OFFICIAL_BATCH, WARMUP_FRACTION, Recipe,
)
from scalegen.train.task import GRID_MAX_CLASSES, GRID_PER_CLASS, TrainingTask, scale_names
from scalegen.train.task_options import VAROptions
from scalegen.train.trainer import TrainConfig, train

# Official VAR recipe (utils/lr_control.py): no weight decay on these, besides every 1-D tensor and bias.
NO_DECAY_KEYS = ("pos_start", "pos_1LC", "lvl_embed", "gamma", "ada_gss", "scale_mul")
SAMPLE_TOP_K = 0  # the periodic training grid samples from the full (guided) distribution
CONTEXT_NOISE_KEY = "context_noise"  # a run's config records the noisy context it trained with, when it had one


class VARTask(TrainingTask):
    """VAR trained by teacher forcing on the tokens of a frozen tokenizer (computed on the fly or cached).

    Batches hold images (made into the token head's targets here) or tokens (B, L, ...) from a `TokenCache`, as their
    source's form says. `base_lr` sets the recipe's lr (base_lr · max(batch, 768) / 256); `context_noise` > 0 makes
    the teacher-forcing input of noisier tokens (`TokenHead.noisy_context`, xAR's noisy context).
    """

    kind = "var"
    recipe, recipe_notes = RECIPES[kind], RECIPE_NOTES[kind]

    def __init__(self, model_config: VARConfig, tokenizer: nn.Module, tokenizer_config: dict,
                 label_smoothing: float = 0.0, sample_cfg: float = 4.0, sample_top_p: float = 0.95,
                 extra_config: dict | None = None, base_lr: float = VAR_BASE_LR, context_noise: float = 0.0):
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        super().__init__(VAR(model_config, tokenizer=self.tokenizer), extra_config)
        self.context_noise = context_noise
        self.tokenizer_config = tokenizer_config
        self.label_smoothing, self.sample_cfg, self.sample_top_p = label_smoothing, sample_cfg, sample_top_p
        self.base_lr = base_lr
        self.scale_lengths = [side * side for side in model_config.patch_nums]

    def helpers(self) -> list[nn.Module]:
        return [self.tokenizer]

    def config(self) -> dict:
        noise = {CONTEXT_NOISE_KEY: self.context_noise} if self.context_noise else {}  # what it trained with
        return {**super().config(), "tokenizer": self.tokenizer_config, SAMPLING_KEY: self.sampling(), **noise}

    def training_defaults(self, steps: int, batch_size: int) -> Recipe:
        lr = self.base_lr * max(batch_size, VAR_SMALLEST_OFFICIAL_BATCH) / VAR_BATCH_REFERENCE
        return replace(self.recipe, batch_size=batch_size, lr=lr, warmup_steps=steps // WARMUP_FRACTION)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        head = self.model.token_head
        with torch.no_grad():
            if batch.form == TOKENS:
                scale_targets = list(batch.tokens.split(self.scale_lengths, dim=1))  # K × (B, p², ...)
            else:
                scale_targets = head.targets(self.tokenizer, batch.image)  # K × (B, p², ...)
            context = head.noisy_context(scale_targets, self.context_noise) if self.context_noise else scale_targets
            var_input = head.var_input(self.tokenizer, context)  # (B, L - 1, Cvae)
        targets = torch.cat(scale_targets, dim=1)  # (B, L, ...)
        output = model(batch.label, var_input, targets)  # (B, L, ...), logits (B, L, V) for VAR's head
        per_position, per_position_figures = head.loss(self.model, output, targets, self.label_smoothing)  # (B, L) each
        figures = {name: values.mean() for name, values in per_position_figures.items()}  # () each, left on the device
        names = scale_names(self.model.config.patch_nums)
        by_scale = {name: values.split(self.scale_lengths, dim=1) for name, values in per_position_figures.items()}
        for index, (name, scale_loss) in enumerate(zip(names, per_position.detach().split(self.scale_lengths, dim=1))):
            figures[f"loss_{name}"] = scale_loss.mean()
            for figure, scale_values in by_scale.items():
                figures[f"{figure}_{name}"] = scale_values[index].mean()
        return per_position.mean(), figures

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            exempt = parameter.ndim <= 1 or name.endswith("bias") or any(key in name for key in NO_DECAY_KEYS)
            (no_decay if exempt else decay).append(parameter)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    @torch.no_grad()
    def write_samples(self, model: nn.Module, path: Path) -> None:
        classes = list(range(min(model.config.num_classes, GRID_MAX_CLASSES)))
        images = self.generate(model, grid_labels(classes, GRID_PER_CLASS).to(self.device), seed=0)  # (N, C, H, W)
        save_grid(images, len(classes), path)

    def generate(self, model: nn.Module, labels: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """With the run's guidance and nucleus, from the full distribution (no top-k)."""
        return model.generate(labels, **self.sampling(), seed=seed)  # (B, C, H, W) in [0, 1]

    def sampling(self) -> dict:
        """The run's sampling settings, its recommended ones (the config's `sampling` section): its guidance and
        nucleus, the official draws, no refiner; a flow head's: its guidance and ODE, no nucleus."""
        if self.model.token_head.continuous_tokens:
            return {**VAR_DEFAULTS, "cfg": self.sample_cfg, **FLOW_DEFAULTS}
        return {**VAR_DEFAULTS, "cfg": self.sample_cfg, "top_k": SAMPLE_TOP_K, "top_p": self.sample_top_p}


def train_var(options: VAROptions, config: TrainConfig) -> dict[str, float]:
    """Train (or resume) a VAR run in `config.out` on a frozen tokenizer, copied into the run folder.

    Args:
        options: the transformer, its tokenizer and its data.
        config: the loop settings; those left at None follow the VAR recipe (`VARTask.recipe`).
    Returns:
        The last logged figures.
    """
    head_class = token_head_class(options.token_head)  # refuses an unknown head at once
    context_noise = head_class.context_noise if options.context_noise is None else options.context_noise
    if context_noise:
        head_class.noisy_context([], context_noise)  # a head that takes no noise refuses before tokenizing
    with guarded_run(config.out):
        loaded = load_tokenizer(options.tokenizer)
        image_size = options.image_size or loaded.image_size
        if image_size != loaded.image_size:
            raise UserError(f"this tokenizer encodes {loaded.image_size}px images; drop --image-size or pass "
                            f"--image-size {loaded.image_size}")
        dataset = limited(open_source(options.data, image_size), config.max_images)
        description = run_description(options.data, image_size, dataset)
        context = setup_distributed(config.device)
        run = RunFolder(config.out)
        kept = run.tokenizer_copy if run.tokenizer_copy.exists() else None  # a resumed run's
        tokenizer = head_tokenizer(head_class, loaded, options, dataset, context.device, kept)
        if dataset.channels != tokenizer.config.in_channels:
            raise UserError(f"the data have {dataset.channels} channel(s) but the tokenizer encodes "
                            f"{tokenizer.config.in_channels}; train a tokenizer on this data first")
        overrides = {name: getattr(options, name) for name in ("width", "num_heads") if getattr(options, name) is not None}
        model_config = VARConfig.for_depth(
            options.depth, num_classes=dataset.num_classes, patch_nums=tokenizer.patch_nums,
            vocab_size=tokenizer.vocab_size, z_channels=tokenizer.z_channels, label_dropout=options.label_dropout,
            token_head=options.token_head, head_width=options.head_width, head_blocks=options.head_blocks,
            head_draws=options.head_draws,
            **overrides,
        )
        head = build_token_head(model_config)  # what a token is, for the cache
        if model_config.width % model_config.num_heads:
            raise UserError(f"width {model_config.width} is not divisible by {model_config.num_heads} heads; "
                            "change --width or --num-heads")
        if context.is_main:
            keep_tokenizer_copy(tokenizer.state_dict(), run.root)
        if options.token_cache:
            cache = cache_path(run.token_cache, run.earlier_token_cache)
            if cache == run.token_cache:  # every rank tokenizes its shards of it (a complete cache is kept as it is)
                extract_tokens(tokenizer, dataset, cache, device=context.device, context=context,
                               num_workers=config.num_workers, head=head)
            dataset = TokenCache(cache)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        tokenizer_info = {"kind": kind_of(tokenizer).name, "model": json_config(tokenizer.config),
                          "source": str(Path(options.tokenizer).resolve())}
        task = VARTask(model_config, tokenizer, tokenizer_info, options.label_smoothing, options.sample_cfg,
                       options.sample_top_p, extra_config=description,
                       base_lr=options.base_lr, context_noise=context_noise)
        task.model.attention = options.attention  # how it attends, not what it is: no part of the config
        if options.init_from:
            task.extra_config["init_from"] = fine_tuning_origin(task.model, options.init_from, config.out)
        return train(task, dataset, config)


def head_tokenizer(head: type[TokenHead], tokenizer: nn.Module, options: VAROptions, dataset: DataSource,
                   device: torch.device, kept: Path | None = None) -> nn.Module:
    """The tokenizer whose tokens `head` learns: a VQ tokenizer's ids for a head of integer tokens; for one of
    continuous tokens, a KL tokenizer's latents on a scale plan (`ContinuousScales`, its latents and each scale's
    tokens normalised over the data), or the continuous tokenizer of a run trained so. A one-line error for a
    tokenizer the head cannot learn from.

    Args:
        head: the registered head.
        tokenizer: the tokenizer --tokenizer loaded.
        options: the run's options (the tokenizer's path, a KL tokenizer's scales).
        dataset: the data (a KL tokenizer's latents are normalised over its first images).
        device: where to measure that.
        kept: the tokenizer copy of the run being resumed, whose normalisations a KL tokenizer keeps (measured again
            elsewhere, on another device, it could round otherwise, and the run's token cache would be refused).
    """
    kind = kind_of(tokenizer)
    title = kind.title if kind is not None else type(tokenizer).__name__
    continuous = isinstance(tokenizer, KLVAE) or (kind is not None and kind.continuous)
    if head.continuous_tokens and not continuous:
        raise UserError(f"the {head.name} head learns continuous tokens but {options.tokenizer} is a {title} of "
                        "codebook ids: give a KL tokenizer (`scalegen train kl`) as --tokenizer, or train with "
                        "--token-head categorical")
    if continuous and not head.continuous_tokens:
        raise UserError(f"{options.tokenizer} is a {title}, with continuous latents and no codebook ids for the "
                        f"{head.name} head: train with --token-head flow, or give a VQ tokenizer (`scalegen train "
                        "vqvae`)")
    if isinstance(tokenizer, KLVAE):
        patch_nums = options.patch_nums or default_patch_nums(tokenizer.config.latent_size)
        stored = read_weights_file(kept) if kept is not None else {}
        if NORMALIZATION_SHIFT in stored:
            normalization = LatentNormalization(stored[NORMALIZATION_SHIFT], stored[NORMALIZATION_SCALE]).to(device)
        else:
            normalization = measure_mean_normalization(tokenizer, dataset, device)
        scales = ContinuousScales.from_kl(tokenizer, normalization, patch_nums)
        token_scale = stored[TOKEN_SCALE] if TOKEN_SCALE in stored else measure_token_scales(scales, dataset, device)
        scales.quantize.token_scale.copy_(token_scale)
        return scales
    if options.patch_nums is not None and tuple(options.patch_nums) != tuple(tokenizer.patch_nums):
        raise UserError(f"--patch-nums sets a KL tokenizer's scales; {options.tokenizer} has its own "
                        f"({','.join(map(str, tokenizer.patch_nums))}): drop --patch-nums")
    return token_tokenizer(tokenizer, options.tokenizer)
