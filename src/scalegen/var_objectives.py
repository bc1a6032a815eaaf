"""Training tasks of the VAR system: the multi-scale VQVAE tokenizer and the VAR transformer (see train.py).

Tokenizer: L1/L2 reconstruction + the multi-scale quantizer loss (straight-through), optionally LPIPS and a hinge
patch-GAN with VQGAN's adaptive weight; per-scale codebook usage is logged and dead codes are re-initialised
from encoder features. VAR: cross-entropy over all L tokens of the frozen tokenizer, teacher forced.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from scalegen.data import cache_with_mirrors
from scalegen.distributed import DistributedContext
from scalegen.errors import UserError
from scalegen.gan_losses import (
    PatchDiscriminator, adaptive_weight, hinge_discriminator_loss, hinge_generator_loss, smallest_image_size,
)
from scalegen.lpips import LPIPS
from scalegen.objectives import GRID_MAX_CLASSES, GRID_PER_CLASS
from scalegen.sample import grid_labels, save_grid
from scalegen.var import VAR, VARConfig
from scalegen.vqvae import VQVAE, VQVAEConfig

# Official usage margin: a code counts as used at a scale when its EMA hits reach 8% of the hits it would get if
# all finest-scale positions of a step were spread evenly over the vocabulary.
USAGE_MARGIN = 0.08
# Official VAR recipe (utils/lr_control.py): no weight decay on these, besides every 1-D tensor and bias.
NO_DECAY_KEYS = ("pos_start", "pos_1LC", "lvl_embed", "gamma", "ada_gss", "scale_mul")
SAMPLE_TOP_K = 0  # the periodic training grid samples from the full (guided) distribution


def json_config(config) -> dict:
    """`asdict(config)` as it reads back from JSON (tuples become lists), so stored and fresh configs compare equal."""
    return json.loads(json.dumps(asdict(config)))


def scale_names(patch_nums: tuple[int, ...]) -> list[str]:
    """Column suffix of each scale in the log, e.g. "4x4"."""
    return [f"{side}x{side}" for side in patch_nums]


def average_gradients(module: nn.Module, context: DistributedContext) -> None:
    """Mean of `module`'s gradients over ranks (for a second model that DDP does not wrap)."""
    if not context.enabled:
        return
    for parameter in module.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= context.world_size


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


@dataclass
class TokenizerLosses:
    """Weights and schedule of the tokenizer's loss terms."""

    l1: float = 1.0
    l2: float = 1.0
    quantizer: float = 1.0
    lpips: float = 0.0
    gan: float = 0.0
    gan_start_step: int = 0
    discriminator_width: int = 64
    discriminator_layers: int = 3
    discriminator_lr: float = 1e-4
    dead_code_every: int = 0  # re-initialise dead codes every N steps (0: never)


class VQVAETask:
    """Multi-scale VQVAE tokenizer training; the sample grid shows fixed inputs (top) over reconstructions (bottom)."""

    kind = "vqvae"

    def __init__(self, model_config: VQVAEConfig, losses: TokenizerLosses, grid_images: torch.Tensor,
                 lpips: LPIPS | None = None, extra_config: dict | None = None):
        self.model = VQVAE(model_config)
        self.losses, self.lpips = losses, lpips
        self.grid_images = grid_images  # (N, C, H, W)
        self.extra_config = extra_config or {}
        self.discriminator = None
        if losses.gan > 0:
            image_size = grid_images.shape[-1]
            if image_size < smallest_image_size(losses.discriminator_layers):
                raise UserError(f"{image_size}px images are too small for a {losses.discriminator_layers}-layer "
                                f"discriminator (it needs {smallest_image_size(losses.discriminator_layers)}px); "
                                "lower --disc-layers")
            self.discriminator = PatchDiscriminator(model_config.in_channels, losses.discriminator_width,
                                                    losses.discriminator_layers).requires_grad_(False)
            # VQGAN's discriminator betas: a short momentum memory suits the moving fake distribution.
            self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=losses.discriminator_lr,
                                                            betas=(0.5, 0.9))
        self.completed_steps = 0
        self.device = torch.device("cpu")
        self._reset_pending()

    def _reset_pending(self) -> None:
        # What this optimizer step's micro-batches leave for `after_step`.
        self.pending_hits: torch.Tensor | None = None  # (scales, vocab)
        self.pending_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (real, reconstruction) for D
        self.last_images: torch.Tensor | None = None  # (B, C, H, W), source of dead-code replacements

    def to(self, device: torch.device) -> None:
        self.device = device
        for module in (self.model, self.lpips, self.discriminator):
            if module is not None:
                module.to(device)

    def config(self) -> dict:
        return {"kind": self.kind, "model": json_config(self.model.config), "losses": asdict(self.losses),
                **self.extra_config}

    @property
    def gan_active(self) -> bool:
        return self.discriminator is not None and self.completed_steps >= self.losses.gan_start_step

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["image"]  # (B, C, H, W)
        reconstruction, quantizer_loss, vocab_hits = model(images)  # (B, C, H, W), (), (S, V)
        reconstruction = reconstruction.float()  # (B, C, H, W)
        l1 = (reconstruction - images).abs().mean()
        l2 = (reconstruction - images).square().mean()
        reconstruction_loss = self.losses.l1 * l1 + self.losses.l2 * l2
        figures = {"l1": l1.item(), "l2": l2.item(), "quantizer": quantizer_loss.item()}
        if self.lpips is not None:
            perceptual = self.lpips(reconstruction, images).mean()
            reconstruction_loss = reconstruction_loss + self.losses.lpips * perceptual
            figures["lpips"] = perceptual.item()
        loss = reconstruction_loss + self.losses.quantizer * quantizer_loss
        if self.discriminator is not None:
            generator_loss, weight = torch.zeros((), device=images.device), torch.zeros((), device=images.device)
            if self.gan_active:
                generator_loss = hinge_generator_loss(self.discriminator(reconstruction))
                last_layer = self.model.decoder.conv_out.weight
                weight = self.losses.gan * adaptive_weight(reconstruction_loss, generator_loss, last_layer)
                loss = loss + weight * generator_loss
                self.pending_pairs.append((images.detach(), reconstruction.detach()))
            figures.update(gan_generator=generator_loss.item(), gan_weight=weight.item())
        hits = vocab_hits.detach()  # (S, V)
        self.pending_hits = hits if self.pending_hits is None else self.pending_hits + hits
        self.last_images = images.detach()
        return loss, figures

    def after_step(self, step: int, context: DistributedContext) -> dict[str, float]:
        """Per-scale usage statistics, dead-code re-initialisation and the discriminator's step."""
        self.completed_steps = step
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
        if self.discriminator is not None:
            figures["discriminator"] = self._discriminator_step(context)
        self._reset_pending()
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
        average_gradients(self.discriminator, context)
        self.discriminator_optimizer.step()
        self.discriminator.requires_grad_(False)
        return total

    def extra_state(self) -> dict:
        state = {"usage_updates": self.model.quantize.usage_updates, "completed_steps": self.completed_steps}
        if self.discriminator is not None:
            state.update(discriminator=self.discriminator.state_dict(),
                         discriminator_optimizer=self.discriminator_optimizer.state_dict())
        return state

    def load_extra_state(self, state: dict) -> None:
        self.model.quantize.usage_updates = state["usage_updates"]
        self.completed_steps = state["completed_steps"]
        if self.discriminator is not None and "discriminator" in state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": list(self.model.parameters()), "weight_decay": weight_decay}]

    @torch.no_grad()
    def write_samples(self, model: nn.Module, path: Path) -> None:
        images = self.grid_images.to(self.device)  # (N, C, H, W)
        reconstruction = model.tokens_to_img(model.img_to_tokens(images))  # (N, C, H, W)
        save_grid(torch.cat([images, reconstruction]), 2, path)


class VARTask:
    """VAR trained by teacher forcing on the tokens of a frozen tokenizer (computed on the fly or cached).

    Batches hold "image" (tokenized here) or "tokens" (B, L) from a `TokenCache`.
    """

    kind = "var"

    def __init__(self, model_config: VARConfig, tokenizer: VQVAE, tokenizer_config: dict,
                 label_smoothing: float = 0.0, sample_cfg: float = 4.0, sample_top_p: float = 0.95,
                 extra_config: dict | None = None):
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.model = VAR(model_config, tokenizer=self.tokenizer)
        self.tokenizer_config = tokenizer_config
        self.label_smoothing, self.sample_cfg, self.sample_top_p = label_smoothing, sample_cfg, sample_top_p
        self.extra_config = extra_config or {}
        self.scale_lengths = [side * side for side in model_config.patch_nums]
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> None:
        self.device = device
        self.model.to(device)
        self.tokenizer.to(device)

    def config(self) -> dict:
        return {"kind": self.kind, "model": json_config(self.model.config), "tokenizer": self.tokenizer_config,
                **self.extra_config}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            if "tokens" in batch:
                tokens = list(batch["tokens"].split(self.scale_lengths, dim=1))  # K × (B, p²)
            else:
                tokens = self.tokenizer.img_to_tokens(batch["image"])  # K × (B, p²)
            var_input = self.tokenizer.tokens_to_var_input(tokens)  # (B, L - 1, Cvae)
        targets = torch.cat(tokens, dim=1)  # (B, L)
        logits = model(batch["label"], var_input)  # (B, L, V)
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, label_smoothing=self.label_smoothing,
                                    reduction="none")  # (B, L)
        correct = (logits.argmax(-1) == targets).float()  # (B, L)
        figures = {"accuracy": correct.mean().item()}
        names = scale_names(self.model.config.patch_nums)
        for name, scale_loss, scale_correct in zip(names, per_token.detach().split(self.scale_lengths, dim=1),
                                                   correct.split(self.scale_lengths, dim=1)):
            figures[f"loss_{name}"] = scale_loss.mean().item()
            figures[f"accuracy_{name}"] = scale_correct.mean().item()
        return per_token.mean(), figures

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
        labels = grid_labels(classes, GRID_PER_CLASS).to(self.device)
        images = model.generate(labels, cfg=self.sample_cfg, top_k=SAMPLE_TOP_K, top_p=self.sample_top_p, seed=0)
        save_grid(images * 2 - 1, len(classes), path)


class TokenCache(Dataset):
    """Pre-extracted tokens of every image and its mirror, addressed by (index, flip) like the image datasets."""

    def __init__(self, path: str | Path):
        tensors = load_file(Path(path))
        self.tokens, self.labels = tensors["tokens"], tensors["labels"]  # (N, 2, L), (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, bool]) -> dict:
        index, flip = item
        return {"tokens": self.tokens[index, int(flip)].long(), "label": self.labels[index]}


def extract_tokens(tokenizer: VQVAE, dataset: Dataset, path: str | Path, batch_size: int = 64,
                   device: torch.device | str = "cpu") -> Path:
    """Tokenize every image and its mirror once into a safetensors cache at `path` (int16 when the vocabulary fits)."""
    storage = torch.int16 if tokenizer.vocab_size <= torch.iinfo(torch.int16).max else torch.int32
    tokenizer = tokenizer.to(device).eval()

    def encode(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": torch.cat(tokenizer.img_to_tokens(images), dim=1).to(storage)}  # (2B, L)

    return cache_with_mirrors(dataset, encode, path, batch_size, device, "extracting tokens")
