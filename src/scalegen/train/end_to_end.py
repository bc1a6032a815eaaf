"""REPA-E (Leng et al. 2025): tuning a KL tokenizer and a DiT together, end to end through REPA's alignment loss.

In one step of `train dit --tokenizer KL_RUN --end-to-end`:
- the tokenizer encodes the images (a latent sample, with gradients) and pays its own losses (reconstruction, KL,
  the patch GAN when asked: `KLVAETask.tokenizer_loss`), which keep it a decoder;
- the latents pass through a batch norm without affine parameters (REPA-E's latent normalisation: batch statistics
  while training, running statistics — the DiT's `LatentNormalization` — at sampling);
- the diffusion loss and REPA's loss train the DiT on the normalised latents *detached*: the diffusion loss stops at
  the latents (left free, it would collapse them);
- REPA's loss flows into the tokenizer through a second DiT pass with the DiT's and projector's weights detached,
  weighted by REPA-E's 1.5, so it moves the latents towards what makes the DiT's block align with the encoder.

The tokenizer has its own AdamW, stepped with the DiT's by the trainer's one step guard (`GradientStep`: a
non-finite step moves neither, and fp16's scaler unscales both); each checkpoint holds the tokenizer of
its step (tokenizer.safetensors) and the batch norm's statistics in the DiT's config, so a run or export samples as
any tokenizer-latent DiT does.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from scalegen.distributed import DistributedContext
from scalegen.tokenizers.codec import KLCodec
from scalegen.tokenizers.kl_vae import LatentNormalization
from scalegen.train.kl_task import KLVAETask
from scalegen.train.optimization import build_optimizer, load_optimizer_state
from scalegen.train.task_options import ALIGNMENT_WEIGHT, KLLosses

BATCH_NORM_EPS = 1e-4  # REPA-E's latent batch norm
BATCH_NORM_MOMENTUM = 0.1
TOKENIZER_BETAS = (0.9, 0.999)


class EndToEnd:
    """The tokenizer side of a REPA-E run: the trainable tokenizer, its losses (a `KLVAETask` without alignment:
    REPA-E's REPA loss takes that place), the latent batch norm and the tokenizer's optimizer.

    Args:
        codec: the DiT's codec; its tokenizer is tuned and its normalisation follows the batch norm.
        losses: the tokenizer's own loss terms.
        grid_images: (N, C, H, W) images (the tokenizer task's grid; REPA-E's run draws DiT samples instead).
        alignment_weight: the weight of the REPA loss that reaches the tokenizer.
        lr: the tokenizer's learning rate (None: the DiT's).
    """

    def __init__(self, codec: KLCodec, losses: KLLosses, grid_images: torch.Tensor,
                 alignment_weight: float = ALIGNMENT_WEIGHT, lr: float | None = None):
        self.codec, self.tokenizer = codec, codec.tokenizer.train().requires_grad_(True)
        self.task = KLVAETask(self.tokenizer.config, replace(losses, alignment=0.0), grid_images, model=self.tokenizer)
        channels = self.tokenizer.config.latent_channels
        self.norm = nn.BatchNorm2d(channels, eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM, affine=False)
        with torch.no_grad():  # start from the measured statistics rather than (0, 1)
            self.norm.running_mean.copy_(codec.normalization.shift.flatten())
            self.norm.running_var.copy_(codec.normalization.scale.flatten().pow(-2) - BATCH_NORM_EPS)
        self.alignment_weight, self.lr = alignment_weight, lr
        self.optimizer: torch.optim.Optimizer | None = None

    def modules(self) -> list[nn.Module]:
        """The networks to move with the DiT (the tokenizer inside the codec, the norm, the GAN's discriminator)."""
        return [self.norm, *self.task.helpers()]

    def prepare(self, lr: float) -> None:
        """The tokenizer's optimizer (at `lr` unless the run names the tokenizer's own) and its discriminator's."""
        self.lr = self.lr or lr
        device = next(self.tokenizer.parameters()).device
        self.optimizer = build_optimizer([{"params": list(self.tokenizer.parameters()), "weight_decay": 0.0}],
                                         self.lr, TOKENIZER_BETAS, device)
        self.task.prepare(self.lr)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Images (B, C, H, W) -> batch-normalised latents (B, c, h, w) with gradients to the tokenizer, the
        tokenizer's own loss () and its figures."""
        reconstruction, mean, logvar, latents = self.tokenizer(images)  # (B, C, H, W), (B, c, h, w) ×3
        loss, figures = self.task.tokenizer_loss(images, reconstruction.float(), mean.float(), logvar.float(), latents)
        normalized = self.norm(latents.float())  # (B, c, h, w)
        return normalized, loss, {f"tokenizer_{name}": value for name, value in figures.items()}

    def normalization(self) -> LatentNormalization:
        """What a DiT of this run diffuses: the batch norm's running statistics."""
        return LatentNormalization.from_batch_norm(self.norm)

    def sync_codec(self) -> None:
        """Let the codec (sample grids, the stored config) normalise with the batch norm's current statistics."""
        current = self.normalization().to(self.codec.normalization.shift.device)
        self.codec.normalization.shift.copy_(current.shift)
        self.codec.normalization.scale.copy_(current.scale)

    def step(self, step: int, context: DistributedContext) -> dict[str, float]:
        """After an applied step (the tokenizer's own optimizer went through the trainer's step guard with the DiT's):
        one running estimate of the latent statistics over the ranks, then the discriminator's step."""
        if context.enabled:  # the ranks' batch statistics differ: keep one running estimate
            for buffer in (self.norm.running_mean, self.norm.running_var):
                torch.distributed.all_reduce(buffer)
                buffer /= context.world_size
        return {f"tokenizer_{name}": value for name, value in self.task.after_step(step, context).items()}

    def state(self) -> dict:
        """The tokenizer's weights and optimizer, the batch norm, its task's state (discriminator)."""
        return {"tokenizer": self.tokenizer.state_dict(), "optimizer": self.optimizer.state_dict(),
                "norm": self.norm.state_dict(), "task": self.task.extra_state()}

    def load_state(self, state: dict) -> None:
        """Restore what `state` saved."""
        self.tokenizer.load_state_dict(state["tokenizer"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.norm.load_state_dict(state["norm"])
        self.task.load_extra_state(state["task"])
        self.sync_codec()

