"""Training a KL tokenizer of ours (tokenizers/kl_vae.py: SD's VAE architecture, diffusers' AutoencoderKL layout):
the task and `train_kl`, which builds a run from `KLVAEOptions`.

The loss: L1/L2 reconstruction (+ LPIPS, + the patch GAN from a given step) as the VQ tokenizer's
(`AutoencoderTask`), the KL divergence of the posterior from N(0, 1) per latent element (weight `kl`), and optionally
VA-VAE's alignment with a frozen encoder (train/alignment.py; weight `alignment`, adaptive). The recipe: AdamW
lr 2e-4, no EMA, as the VQ tokenizer's.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from scalegen.data.batch import Batch
from scalegen.data.registry import open_source
from scalegen.data.source import limited, run_description
from scalegen.errors import UserError
from scalegen.runs.folder import guarded_run
from scalegen.tokenizers.kl_vae import KLVAE, KLVAEConfig, kl_divergence
from scalegen.train.alignment import FoundationAlignment
from scalegen.train.gan_losses import adaptive_weight
from scalegen.train.init_from import fine_tuning_origin
from scalegen.train.lpips import LPIPS, load_lpips
from scalegen.train.repa import load_patch_encoder
from scalegen.train.settings import RECIPES
from scalegen.train.task_options import KLLosses, KLVAEOptions
from scalegen.train.tokenizer_task import AutoencoderTask, first_images
from scalegen.train.trainer import TrainConfig, train


class KLVAETask(AutoencoderTask):
    """KL tokenizer training; the sample grid shows fixed inputs (top) over reconstructions from the posterior mean."""

    kind = "klvae"
    recipe = RECIPES[kind]

    def __init__(self, model_config: KLVAEConfig, losses: KLLosses, grid_images: torch.Tensor,
                 lpips: LPIPS | None = None, alignment: FoundationAlignment | None = None,
                 extra_config: dict | None = None, model: KLVAE | None = None):
        super().__init__(model if model is not None else KLVAE(model_config), losses, grid_images, lpips, extra_config)
        if (alignment is None) != (losses.alignment == 0):
            raise UserError("VA-VAE's alignment needs both an encoder (--align-encoder FILE) and a weight "
                            "(--align-weight > 0); give both or neither")
        self.alignment = alignment

    def helpers(self) -> list[nn.Module]:
        return super().helpers() + ([self.alignment] if self.alignment is not None else [])

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        groups = super().parameter_groups(weight_decay)
        if self.alignment is not None:
            groups.append({"params": list(self.alignment.projection.parameters()), "weight_decay": weight_decay})
        return groups

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch.image  # (B, C, H, W)
        reconstruction, mean, logvar, latents = model(images)  # (B, C, H, W), (B, c, h, w) ×3
        return self.tokenizer_loss(images, reconstruction.float(), mean.float(), logvar.float(), latents)

    def tokenizer_loss(self, images: torch.Tensor, reconstruction: torch.Tensor, mean: torch.Tensor,
                       logvar: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The whole tokenizer loss of one forward pass (REPA-E adds it to the DiT's) and its figures."""
        reconstruction_loss, figures = self.reconstruction_loss(images, reconstruction)
        divergence = kl_divergence(mean, logvar)
        loss = reconstruction_loss + self.losses.kl * divergence
        figures["kl"] = divergence.detach()  # ()
        if self.alignment is not None:
            cosine, distance = self.alignment(latents, images)
            aligned = cosine + distance
            weight = torch.tensor(self.losses.alignment, device=images.device)
            if self.losses.adaptive_alignment:
                weight = weight * adaptive_weight(reconstruction_loss, aligned, self.model.encoder.conv_out.weight)
            loss = loss + weight * aligned
            figures.update(margin_cosine=cosine.detach(), margin_distance=distance.detach(),
                           alignment_weight=weight.detach())
        if self.discriminator is not None:
            generator_loss, gan_figures = self.gan_loss(images, reconstruction, reconstruction_loss)
            loss = loss + generator_loss
            figures.update(gan_figures)
        return loss, figures

    def extra_state(self) -> dict:
        state = super().extra_state()
        if self.alignment is not None:
            state["projection"] = self.alignment.projection.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if self.alignment is not None and "projection" in state:
            self.alignment.projection.load_state_dict(state["projection"])

    def reconstruct(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.decode(model.encode_moments(images)[0])  # (N, C, H, W)


def kl_model_config(options: KLVAEOptions, in_channels: int) -> KLVAEConfig:
    """The tokenizer's architecture of a run for images of `in_channels` channels."""
    return KLVAEConfig(in_channels=in_channels, latent_channels=options.latent_channels, ch=options.ch,
                       ch_mult=options.ch_mult, num_res_blocks=options.num_res_blocks, norm_groups=options.norm_groups,
                       use_attention=options.use_attention, image_size=options.image_size)


def alignment_for(encoder_path: str | None, latent_channels: int, losses: KLLosses,
                  image_channels: int) -> FoundationAlignment | None:
    """VA-VAE's alignment with the encoder at `encoder_path` (None without one), checked against the data."""
    if not encoder_path:
        return None
    encoder = load_patch_encoder(encoder_path)
    if encoder.stages[0][0].in_channels != image_channels:
        raise UserError(f"the alignment encoder sees images of {encoder.stages[0][0].in_channels} channel(s), the "
                        f"data have {image_channels}; train an encoder on this data")
    return FoundationAlignment(latent_channels, encoder, losses.cosine_margin, losses.distance_margin)


def train_kl(options: KLVAEOptions, config: TrainConfig) -> dict[str, float]:
    """Train (or resume) a KL tokenizer run in `config.out`; returns the last logged figures.

    Args:
        options: the tokenizer, its losses, its alignment encoder and its data.
        config: the loop settings; those left at None follow the tokenizer recipe (`KLVAETask.recipe`).
    """
    with guarded_run(config.out):
        dataset = limited(open_source(options.data, options.image_size), config.max_images)
        model_config = kl_model_config(options, dataset.channels)
        lpips = load_lpips(options.lpips_weights) if options.lpips_weights else None
        losses = options.losses if lpips is not None else replace(options.losses, lpips=0.0)
        alignment = alignment_for(options.align_encoder, options.latent_channels, losses, dataset.channels)
        torch.manual_seed(config.seed)  # identical initial weights (the discriminator too) on every rank
        task = KLVAETask(model_config, losses, first_images(dataset), lpips, alignment,
                         extra_config=run_description(options.data, options.image_size, dataset))
        if options.align_encoder:
            task.extra_config["align_encoder"] = options.align_encoder
        if options.init_from:
            task.extra_config["init_from"] = fine_tuning_origin(task.model, options.init_from, config.out)
        return train(task, dataset, config)
