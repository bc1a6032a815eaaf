"""Training tokenizers: what they all share (`AutoencoderTask`), VAR's multi-scale VQVAE tokenizer (its task and
`train_vqvae`, which builds a run from `VQVAEOptions`). The KL tokenizer's task builds on the same base (kl_task.py).

Every tokenizer: L1/L2 reconstruction, optionally LPIPS and a hinge patch-GAN with VQGAN's adaptive weight. The VQ
one adds the multi-scale quantizer loss (straight-through); per-scale codebook usage is logged and dead codes are
re-initialised from encoder features. The recipe: AdamW lr 2e-4, no EMA (the official tokenizer trains without one).
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from scalegen.data.batch import Batch
from scalegen.data.registry import open_source
from scalegen.data.source import limited, run_description
from scalegen.distributed import DistributedContext
from scalegen.errors import UserError
from scalegen.images import save_grid
from scalegen.pixels import to_unit_range
from scalegen.runs.folder import guarded_run
from scalegen.tokenizers.quantizer import phi_indices
from scalegen.tokenizers.vqvae import VQVAE, VQVAEConfig
from scalegen.train.gan_losses import (
    PatchDiscriminator, adaptive_weight, hinge_discriminator_loss, hinge_generator_loss, smallest_image_size,
)
from scalegen.train.init_from import fine_tuning_origin
from scalegen.train.lpips import LPIPS, load_lpips
from scalegen.train.optimization import average_gradients
from scalegen.train.settings import RECIPES
from scalegen.train.task import TrainingTask, scale_names
from scalegen.train.task_options import ReconstructionLosses, TokenizerLosses, VQVAEOptions
from scalegen.train.trainer import TrainConfig, train

# Official usage margin: a code counts as used at a scale when its EMA hits reach 8% of the hits it would get if
# all finest-scale positions of a step were spread evenly over the vocabulary.
USAGE_MARGIN = 0.08
GRID_IMAGES = 8  # inputs shown (over their reconstructions) in the tokenizer's sample grid
# VQGAN's discriminator betas: a short momentum memory suits the moving fake distribution.
DISCRIMINATOR_BETAS = (0.5, 0.9)


@torch.no_grad()
def reinitialize_dead_codes(codebook: torch.Tensor, features: torch.Tensor, dead: torch.Tensor) -> int:
    """Replace the dead rows of `codebook` by encoder feature vectors drawn at random (global torch RNG).

    Args:
        codebook: (V, C) codebook weight, changed in place.
        features: (N, C) candidate vectors (encoder features of the current batch).
        dead: (V,) bool, True for rows to replace.

    Returns:
        The number of rows replaced.
    """
    count = int(dead.sum())
    if count:
        picks = torch.randint(0, features.shape[0], (count,), device=features.device)  # (n,)
        codebook[dead] = features[picks].to(codebook.dtype)
    return count


class AutoencoderTask(TrainingTask):
    """What every tokenizer's training shares: L1/L2 (+ LPIPS) reconstruction, the hinge patch GAN with VQGAN's
    adaptive weight and its discriminator step, and a grid of fixed inputs (top) over their reconstructions (bottom).
    Subclasses implement `loss`, `reconstruct` and, for more per-step work, extend `after_step`."""

    def __init__(self, model: nn.Module, losses: ReconstructionLosses, grid_images: torch.Tensor,
                 lpips: LPIPS | None = None, extra_config: dict | None = None):
        super().__init__(model, extra_config)
        self.losses, self.lpips = losses, lpips
        self.grid_images = grid_images  # (N, C, H, W) in [-1, 1]
        self.discriminator = None
        self.discriminator_optimizer = None
        if losses.gan > 0:
            image_size = grid_images.shape[-1]
            if image_size < smallest_image_size(losses.discriminator_layers):
                raise UserError(f"{image_size}px images are too small for a {losses.discriminator_layers}-layer "
                                f"discriminator (it needs {smallest_image_size(losses.discriminator_layers)}px); "
                                "lower --disc-layers")
            self.discriminator = PatchDiscriminator(grid_images.shape[1], losses.discriminator_width,
                                                    losses.discriminator_layers).requires_grad_(False)
        self.completed_steps = 0
        self.pending_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (real, reconstruction) for D

    def helpers(self) -> list[nn.Module]:
        return [module for module in (self.lpips, self.discriminator) if module is not None]

    def prepare(self, lr: float) -> None:
        """The discriminator's optimizer, at the tokenizer's lr unless the losses name one."""
        if self.losses.discriminator_lr is None:
            self.losses = replace(self.losses, discriminator_lr=lr)
        if self.discriminator is not None:
            self.discriminator_optimizer = torch.optim.Adam(
                self.discriminator.parameters(), lr=self.losses.discriminator_lr, betas=DISCRIMINATOR_BETAS)

    def config(self) -> dict:
        return {**super().config(), "losses": asdict(self.losses)}

    @property
    def gan_active(self) -> bool:
        return self.discriminator is not None and self.completed_steps >= self.losses.gan_start_step

    def reconstruction_loss(self, images: torch.Tensor,
                            reconstruction: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted L1 + L2 (+ LPIPS) of a reconstruction (B, C, H, W) of `images`, and its figures."""
        l1 = (reconstruction - images).abs().mean()
        l2 = (reconstruction - images).square().mean()
        loss = self.losses.l1 * l1 + self.losses.l2 * l2
        figures = {"l1": l1.detach(), "l2": l2.detach()}  # () each
        if self.lpips is not None:
            perceptual = self.lpips(reconstruction, images).mean()
            loss = loss + self.losses.lpips * perceptual
            figures["lpips"] = perceptual.detach()
        return loss, figures

    def gan_loss(self, images: torch.Tensor, reconstruction: torch.Tensor,
                 reconstruction_loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The adaptively weighted generator loss (zero before the GAN starts), its figures; keeps the pair for D."""
        generator_loss, weight = torch.zeros((), device=images.device), torch.zeros((), device=images.device)
        if self.gan_active:
            generator_loss = hinge_generator_loss(self.discriminator(reconstruction))
            last_layer = self.model.decoder.conv_out.weight
            weight = self.losses.gan * adaptive_weight(reconstruction_loss, generator_loss, last_layer)
            self.pending_pairs.append((images.detach(), reconstruction.detach()))
        return weight * generator_loss, {"gan_generator": generator_loss.detach(), "gan_weight": weight.detach()}

    def after_step(self, step: int, context: DistributedContext) -> dict[str, float]:
        """The discriminator's step."""
        self.completed_steps = step
        figures = {}
        if self.discriminator is not None:
            figures["discriminator"] = self._discriminator_step(context)
        self.pending_pairs = []
        return figures

    def _discriminator_step(self, context: DistributedContext) -> float:
        """One hinge-loss step of the discriminator on this step's (real, reconstruction) pairs; returns its loss."""
        if not self.pending_pairs:
            return 0.0
        self.discriminator.requires_grad_(True)
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for real, fake in self.pending_pairs:
            loss = hinge_discriminator_loss(self.discriminator(real), self.discriminator(fake)) / len(self.pending_pairs)
            loss.backward()
            total += loss.item()
        average_gradients(self.discriminator.parameters(), context)
        gradients = [parameter.grad for parameter in self.discriminator.parameters() if parameter.grad is not None]
        if bool(torch.isfinite(nn.utils.get_total_norm(gradients))):  # averaged: every rank skips a bad step alike
            self.discriminator_optimizer.step()
        self.discriminator.requires_grad_(False)
        return total

    def extra_state(self) -> dict:
        state = {"completed_steps": self.completed_steps}
        if self.discriminator is not None:
            state.update(discriminator=self.discriminator.state_dict(),
                         discriminator_optimizer=self.discriminator_optimizer.state_dict())
        return state

    def load_extra_state(self, state: dict) -> None:
        self.completed_steps = state["completed_steps"]
        if self.discriminator is not None and "discriminator" in state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])

    def reconstruct(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The model's deterministic reconstruction (B, C, H, W) of images in [-1, 1]."""
        raise NotImplementedError

    @torch.no_grad()
    def write_samples(self, model: nn.Module, path: Path) -> None:
        images = self.grid_images.to(self.device)  # (N, C, H, W)
        save_grid(to_unit_range(torch.cat([images, self.reconstruct(model, images)])), 2, path)


class VQVAETask(AutoencoderTask):
    """Multi-scale VQVAE tokenizer training; the sample grid shows fixed inputs (top) over reconstructions (bottom)."""

    kind = "vqvae"
    recipe = RECIPES[kind]

    def __init__(self, model_config: VQVAEConfig, losses: TokenizerLosses, grid_images: torch.Tensor,
                 lpips: LPIPS | None = None, extra_config: dict | None = None):
        super().__init__(VQVAE(model_config), losses, grid_images, lpips, extra_config)
        self._reset_pending()

    def _reset_pending(self) -> None:
        # What this optimizer step's micro-batches leave for `after_step`.
        self.pending_hits: torch.Tensor | None = None  # (scales, vocab)
        self.last_images: torch.Tensor | None = None  # (B, C, H, W), source of dead-code replacements

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch.image  # (B, C, H, W)
        reconstruction, quantizer_loss, vocab_hits = model(images)  # (B, C, H, W), (), (S, V)
        reconstruction = reconstruction.float()  # (B, C, H, W)
        reconstruction_loss, figures = self.reconstruction_loss(images, reconstruction)
        figures["quantizer"] = quantizer_loss.detach()  # ()
        loss = reconstruction_loss + self.losses.quantizer * quantizer_loss
        if self.discriminator is not None:
            generator_loss, gan_figures = self.gan_loss(images, reconstruction, reconstruction_loss)
            loss = loss + generator_loss
            figures.update(gan_figures)
        hits = vocab_hits.detach()  # (S, V)
        self.pending_hits = hits if self.pending_hits is None else self.pending_hits + hits
        self.last_images = images.detach()
        return loss, figures

    def after_step(self, step: int, context: DistributedContext) -> dict[str, float]:
        """Per-scale usage statistics, dead-code re-initialisation and the discriminator's step."""
        quantizer = self.model.quantize
        hits = self.pending_hits  # (S, V) this rank's hits over the step's micro-batches
        if context.enabled:
            dist.all_reduce(hits)  # every rank keeps the same usage EMA
        quantizer.record_usage(hits)
        margin = float(hits[-1].sum()) / quantizer.vocab_size * USAGE_MARGIN
        usage = quantizer.codebook_usage(margin)  # (S,)
        figures = {f"usage_{name}": value for name, value in zip(scale_names(quantizer.patch_nums), usage.tolist())}
        dead = quantizer.dead_codes(margin)  # (V,)
        figures["dead_codes"] = float(dead.sum())
        if self.losses.dead_code_every and step % self.losses.dead_code_every == 0 and bool(dead.any()):
            with torch.no_grad():
                features = self.model.img_to_features(self.last_images)  # (B, C, h, w)
            reinitialize_dead_codes(quantizer.embedding.weight, features.permute(0, 2, 3, 1).flatten(0, 2), dead)
            if context.enabled:
                dist.broadcast(quantizer.embedding.weight.data, src=0)  # ranks drew different replacements
        figures.update(super().after_step(step, context))
        self._reset_pending()
        return figures

    def extra_state(self) -> dict:
        return {**super().extra_state(), "usage_updates": self.model.quantize.usage_updates}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.model.quantize.usage_updates = state["usage_updates"]

    def reconstruct(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.tokens_to_img(model.img_to_tokens(images))  # (N, C, H, W)


def tokenizer_config(options: VQVAEOptions, in_channels: int) -> VQVAEConfig:
    """The tokenizer's architecture for a run, checked against the image size and the φ sharing."""
    config = VQVAEConfig(
        vocab_size=options.vocab_size, z_channels=options.z_channels, ch=options.ch, ch_mult=options.ch_mult,
        num_res_blocks=options.num_res_blocks, patch_nums=options.patch_nums, share_quant_resi=options.share_quant_resi,
        in_channels=in_channels, norm_groups=options.norm_groups, use_attention=options.use_attention,
        use_mid_attention=options.use_attention,
    )
    if config.image_size != options.image_size:
        raise UserError(
            f"last --patch-nums {config.patch_nums[-1]} × downsample {config.downsample_ratio} (from --ch-mult) = "
            f"{config.image_size}, not --image-size {options.image_size}; end --patch-nums with "
            f"{options.image_size // config.downsample_ratio}"
        )
    phi_count, scale_count = config.share_quant_resi, len(config.patch_nums)
    if phi_count > 1 and len(set(phi_indices(scale_count, phi_count))) < phi_count:
        # An unused φ conv never gets a gradient, which data-parallel training refuses.
        raise UserError(f"--share-quant-resi {phi_count} leaves a φ conv unused with {scale_count} scales; "
                        f"use fewer (e.g. {min(3, scale_count)}) or more --patch-nums")
    return config


def first_images(dataset, count: int = GRID_IMAGES) -> torch.Tensor:
    """The first `count` readable images of a data set, unflipped: a tokenizer's grid inputs (N, C, H, W)."""
    items = (dataset[(index, False)] for index in range(min(len(dataset), 4 * count)))
    return torch.stack([item["image"] for item in items if item is not None][:count])  # (N, C, H, W)


def train_vqvae(options: VQVAEOptions, config: TrainConfig) -> dict[str, float]:
    """Train (or resume) a multi-scale VQVAE tokenizer run in `config.out`; returns the last logged figures.

    Args:
        options: the tokenizer, its losses and its data.
        config: the loop settings; those left at None follow the tokenizer recipe (`VQVAETask.recipe`).
    """
    with guarded_run(config.out):
        dataset = limited(open_source(options.data, options.image_size), config.max_images)
        model_config = tokenizer_config(options, dataset.channels)
        lpips = load_lpips(options.lpips_weights) if options.lpips_weights else None
        losses = options.losses if lpips is not None else replace(options.losses, lpips=0.0)
        grid_images = first_images(dataset)  # (N, C, H, W)
        torch.manual_seed(config.seed)  # identical initial weights (the discriminator too) on every rank
        task = VQVAETask(model_config, losses, grid_images, lpips,
                         extra_config=run_description(options.data, options.image_size, dataset))
        if options.init_from:
            task.extra_config["init_from"] = fine_tuning_origin(task.model, options.init_from, config.out)
        return train(task, dataset, config)
