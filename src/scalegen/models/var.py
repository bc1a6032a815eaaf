"""VAR: visual autoregressive modelling by next-scale prediction (Tian et al., NeurIPS 2024).

A class-conditional transformer predicts the tokens of a multi-scale VQ tokenizer one whole scale at a time:
the positions of scale k+1 are the (area-downsampled) image features accumulated from scales <= k, and every
position attends to all positions of its own and earlier scales. With the flow head (`flow_head`) the tokens are
continuous instead, a KL tokenizer's latents on the same scale plan (`tokenizers/continuous_scales.py`).
Parameter and buffer names match the official FoundationVision/VAR checkpoints (var_d16.pth ... var_d36.pth) so they
load with `strict=True`.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from scalegen.classes import label_ids
from scalegen.errors import UserError
from scalegen.mixed_precision import autocast
from scalegen.models import flow_head  # noqa: F401  (registers the "flow" token head)
from scalegen.models.layers import ReferencedModule, ReferencingModule
from scalegen.models.token_heads import ADALN_INIT_GAIN, ScaleGuidance, build_token_head
from scalegen.models.var_blocks import (
    ADALN_CHUNKS, AdaLNSelfAttn, BlockMask, SharedAdaLin, block_causal_block_mask, block_causal_mask,
    flex_unavailable_reason,
)
from scalegen.models.var_edit import check_edit_inputs
from scalegen.models.var_generation import Editing, SampledTokens, ScaleByScaleGeneration, ScaleGraphs, scale_networks
from scalegen.models.settings import ATTENTION_BACKENDS, CATEGORICAL_HEAD, AttentionBackend
from scalegen.models.sampling_settings import FROM_DEFAULT, VARSampling
from scalegen.tokenizers.vqvae import OFFICIAL_VOCAB_SIZE, OFFICIAL_Z_CHANNELS, PATCH_NUMS_256

# Official width rule: width = 64·depth, one head per 64 channels, drop-path growing to 0.1 at depth 24.
WIDTH_PER_DEPTH = 64
DROP_PATH_PER_DEPTH = 0.1 / 24
# Official init (models/var.py init_weights): std = sqrt(1 / (3·width)), the head's own scaling (`token_heads`), the
# AdaLN scale/shift rows at half, and the residual gains γ tiny so every block starts close to identity.
# Official γ multipliers from the README training commands, as (largest depth, multiplier); deeper models
# get smaller γ. Depths between the released ones use the next larger released depth's value.
ADALN_GAMMA_BY_DEPTH = ((20, 1e-3), (24, 1e-4), (30, 1e-5))
ADALN_GAMMA_DEEPEST = 5e-6


@dataclass
class VARConfig:
    """Everything needed to rebuild a VAR transformer (stored in checkpoints as `var.config`)."""

    depth: int = 16
    width: int = 1024
    num_heads: int = 16
    num_classes: int = 1000
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    vocab_size: int = OFFICIAL_VOCAB_SIZE
    z_channels: int = OFFICIAL_Z_CHANNELS
    shared_aln: bool = False
    attn_l2_norm: bool = True
    drop_path_rate: float = 16 * DROP_PATH_PER_DEPTH
    label_dropout: float = 0.1
    norm_eps: float = 1e-6
    mlp_ratio: float = 4.0
    token_head: str = CATEGORICAL_HEAD  # what the positions predict (`token_heads`); a config without it: VAR's head
    head_width: int | None = None  # a head with an MLP of its own (the flow head's): its width; None: the model's
    head_blocks: int = 3  # and its residual blocks
    head_draws: int = 1  # noise draws per token of the flow head's training loss (MAR's diffusion batch multiplier)

    def __post_init__(self) -> None:
        self.patch_nums = tuple(self.patch_nums)  # a list from a saved config compares unequal to a tuple

    @classmethod
    def for_depth(cls, depth: int, **overrides: Any) -> VARConfig:
        """Config of the official depth-`depth` model (width 64·depth, depth heads, drop-path 0.1·depth/24)."""
        rule = dict(
            depth=depth, width=WIDTH_PER_DEPTH * depth, num_heads=depth, drop_path_rate=DROP_PATH_PER_DEPTH * depth
        )
        return cls(**{**rule, **overrides})


def default_adaln_gamma(depth: int) -> float:
    """Initial multiplier of the AdaLN γ rows for a model of this depth (official values for d16–d36)."""
    for largest_depth, gamma in ADALN_GAMMA_BY_DEPTH:
        if depth <= largest_depth:
            return gamma
    return ADALN_GAMMA_DEEPEST


class VAR(ReferencingModule):
    """Class-conditional next-scale-prediction transformer.

    Args:
        config: the architecture.
        tokenizer: the multi-scale VQVAE used by generation and editing. It is referenced, not owned: it is not
            a submodule and its weights are not in this module's state dict (official checkpoints hold the
            transformer alone). It can also be given later with `attach_tokenizer`.
        adaln_gamma: init multiplier of the AdaLN γ rows; None picks the official value for this depth.
        attention: how teacher forcing (`forward`) attends: "sdpa" (default, the official computation: SDPA with
            a dense additive block-causal mask) or "flex" (FlexAttention with a block-sparse mask, built once per
            device; compiled on CUDA). Where FlexAttention cannot run (torch < 2.5, or a backward pass on CPU/MPS)
            the forward warns with the reason and uses SDPA. Generation is unaffected (it needs no mask). The
            `attention` attribute may be changed at any time; it is not part of the config or the checkpoint.
    """

    def __init__(
        self,
        config: VARConfig,
        tokenizer: nn.Module | None = None,
        adaln_gamma: float | None = None,
        attention: AttentionBackend = "sdpa",
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        self.attention = attention
        self._block_masks: dict[torch.device, BlockMask] = {}  # FlexAttention masks by device, built on first use
        self.config = config
        width = config.width
        self.patch_nums = config.patch_nums
        self.num_scales = len(config.patch_nums)
        self.first_length = config.patch_nums[0] ** 2
        self.sequence_length = sum(patch * patch for patch in config.patch_nums)

        self.pos_start = nn.Parameter(torch.zeros(1, self.first_length, width))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.sequence_length, width))
        scale_lengths = torch.tensor([patch * patch for patch in config.patch_nums])
        scale_of_position = torch.repeat_interleave(
            torch.arange(self.num_scales), scale_lengths, output_size=self.sequence_length
        )  # (L,)
        self.register_buffer("lvl_1L", scale_of_position.view(1, -1))
        self.register_buffer("attn_bias_for_masking", block_causal_mask(scale_of_position))

        self.word_embed = nn.Linear(config.z_channels, width)
        self.class_emb = nn.Embedding(config.num_classes + 1, width)  # the last row is the null class
        self.lvl_embed = nn.Embedding(self.num_scales, width)
        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(), SharedAdaLin(width, ADALN_CHUNKS * width)) if config.shared_aln else None
        )
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        drop_path_rates = [config.drop_path_rate * index / max(config.depth - 1, 1) for index in range(config.depth)]
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(
                width, config.num_heads, config.mlp_ratio, rate, config.norm_eps, config.shared_aln, config.attn_l2_norm
            )
            for rate in drop_path_rates
        )
        self.token_head = build_token_head(config)
        for name, layer in self.token_head.layers().items():  # VAR's: head_nm and head, the official keys
            self.add_module(name, layer)

        self.initialize_weights(adaln_gamma)
        self._tokenizer = ReferencedModule()
        self.class_names: list[str] | None = None  # set by the loaders; sampling calls accept these names
        # The recommended sampling settings (`scalegen.models.sampling_settings`), set by the loaders: generation starts
        # from them (`sampling_settings`), over the official code's defaults.
        self.sampling: dict = {}
        self.sampling_origin = FROM_DEFAULT
        self.scale_graphs: ScaleGraphs | None = None  # generation's CUDA graphs, captured on first use
        if tokenizer is not None:
            self.attach_tokenizer(tokenizer)

    @torch.no_grad()
    def initialize_weights(self, adaln_gamma: float | None = None) -> None:
        """Official VAR init: truncated normals, the head's own scaling (a small head for VAR's), near-identity blocks.

        Args:
            adaln_gamma: multiplier of the AdaLN γ rows; None picks the official value for this depth.
        """
        config = self.config
        gamma = default_adaln_gamma(config.depth) if adaln_gamma is None else adaln_gamma
        std = math.sqrt(1 / (3 * config.width))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_1LC, std=std)
        self.token_head.initialize(self)
        residual_gain = 1 / math.sqrt(2 * config.depth)  # keeps the residual stream's variance depth-independent
        gamma_rows = 2 * config.width  # γ1 and γ2 come first in the AdaLN chunk order
        for block in self.blocks:
            block.attn.proj.weight.mul_(residual_gain)
            block.ffn.fc2.weight.mul_(residual_gain)
            if config.shared_aln:
                block.ada_gss.copy_(torch.randn_like(block.ada_gss) / math.sqrt(config.width))
                block.ada_gss[:, :, 2:].mul_(ADALN_INIT_GAIN)
                block.ada_gss[:, :, :2].mul_(gamma)
            else:
                block.ada_lin[-1].weight[gamma_rows:].mul_(ADALN_INIT_GAIN)
                block.ada_lin[-1].weight[:gamma_rows].mul_(gamma)

    def attach_tokenizer(self, tokenizer: nn.Module) -> None:
        """Use this multi-scale VQVAE for generation and editing (kept out of the state dict)."""
        config = self.config
        found = (tuple(tokenizer.patch_nums), tokenizer.vocab_size, tokenizer.z_channels)
        expected = (config.patch_nums, config.vocab_size, config.z_channels)
        if found != expected:
            raise UserError(
                f"tokenizer has (patch_nums, vocab_size, z_channels) = {found} but this VAR needs {expected}: "
                "use the tokenizer the VAR was trained with"
            )
        self._tokenizer = ReferencedModule(tokenizer)

    @property
    def tokenizer(self) -> nn.Module:
        """The multi-scale VQVAE that generation decodes with (referenced, shared by copies, moved by `.to()`)."""
        if self._tokenizer.module is None:
            raise ValueError("this VAR has no tokenizer: build it with build_var(vqvae, ...) or call attach_tokenizer")
        return self._tokenizer.module

    def labels_tensor(self, labels: torch.Tensor | Sequence[int], check_on_host: bool = True) -> torch.Tensor:
        """Class ids (or class names of a loaded model) as a (B,) long tensor on the model's device; a one-line error
        for none, or (when `check_on_host`) for ids out of range."""
        device = self.class_emb.weight.device
        labels = torch.as_tensor(label_ids(labels, self.class_names), dtype=torch.long, device=device).reshape(-1)  # (B,)
        if labels.numel() == 0 or (check_on_host and bool(((labels < 0) | (labels > self.config.num_classes)).any())):
            raise ValueError(self.labels_error(labels))
        return labels

    def labels_error(self, labels: torch.Tensor) -> str:
        """The message for class ids out of range."""
        num_classes = self.config.num_classes
        return f"class ids must be in 0..{num_classes - 1} (or {num_classes} for unconditional); got {labels.tolist()}"

    def checked_labels(self, labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """`labels_tensor` for the training step: the range check runs on the device, so the host never waits for it
        (and torch.compile traces it). A bad id raises at once on CPU, as a device-side assert on a GPU."""
        labels = self.labels_tensor(labels, check_on_host=False)  # (B,)
        try:
            torch._assert_async(((labels >= 0) & (labels <= self.config.num_classes)).all(), "class ids out of range")
        except RuntimeError:
            raise ValueError(self.labels_error(labels)) from None
        return labels

    def block_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """What the blocks' AdaLN reads: the class embedding (B, C), or its shared projection (B, 1, 6, C)."""
        return cond if self.shared_ada_lin is None else self.shared_ada_lin(cond)  # (B, C) or (B, 1, 6, C)

    def forward(self, labels: torch.Tensor, var_input: torch.Tensor, targets: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Teacher-forced head output for all scales (logits for VAR's head).

        Args:
            labels: (B,) class ids (num_classes = unconditional). In training mode each is replaced by the null
                class with probability `config.label_dropout`; never in eval mode.
            var_input: (B, L - p_0², z_channels) tokenizer features of scales 2..K (`tokens_to_var_input`).
            targets: all scales' training targets (B, L, ...), for a head that needs them (`TokenHead.output`).

        Returns:
            (B, L, ...) float32 head output ((B, L, vocab_size) logits for VAR's head); the positions of scale k
            predict the tokens of scale k.
        """
        labels = self.checked_labels(labels)  # (B,)
        batch = var_input.shape[0]
        expected_shape = (batch, self.sequence_length - self.first_length, self.config.z_channels)
        if tuple(var_input.shape) != expected_shape or labels.shape[0] != batch:
            raise ValueError(f"var_input must be {expected_shape} with {batch} labels, got {tuple(var_input.shape)}")
        if self.training and self.config.label_dropout > 0:
            dropped = torch.rand(batch, device=labels.device) < self.config.label_dropout  # (B,)
            labels = torch.where(dropped, self.config.num_classes, labels)  # (B,)
        cond = self.class_emb(labels)  # (B, C)
        start = cond.unsqueeze(1) + self.pos_start  # (B, p_0², C)
        x = torch.cat((start, self.word_embed(var_input.float())), dim=1)  # (B, L, C)
        x = x + (self.lvl_embed(self.lvl_1L) + self.pos_1LC)  # (B, L, C)
        block_cond = self.block_condition(cond)
        attn_mask = self.teacher_forcing_mask(x)
        for block in self.blocks:
            x = block(x, block_cond, attn_mask=attn_mask)  # (B, L, C)
        return self.token_head.output(self, x, cond, targets)  # (B, L, V) for VAR's head

    def teacher_forcing_mask(self, x: torch.Tensor) -> torch.Tensor | BlockMask:
        """The block-causal mask `forward` attends with: the dense (1, 1, L, L) buffer for "sdpa", the cached
        BlockMask for "flex" (or the dense one, with a warning saying why, where FlexAttention cannot run).

        Args:
            x: (B, L, C) activations entering the blocks.
        """
        if self.attention == "sdpa":
            return self.attn_bias_for_masking
        reason = flex_unavailable_reason(x)
        if reason is not None:
            warnings.warn(f"attention='flex' falls back to SDPA: {reason}", stacklevel=2)
            return self.attn_bias_for_masking
        if x.device not in self._block_masks:
            self._block_masks[x.device] = block_causal_block_mask(self.lvl_1L[0])
        return self._block_masks[x.device]

    def sampling_settings(self, settings: VARSampling | None = None, **given: Any) -> VARSampling:
        """What a generation samples with: `settings` (None: the model's recommended ones, `sampling`, set by the
        loaders, over the official code's defaults) with each given setting that is not None.

        Args:
            settings: the settings to start from.
            **given: any `VARSampling` field (cfg, top_k, top_p, draws, more_smooth, precision, cuda_graphs, pruning,
                refiner, refined_scales); None leaves it as it is.

        Returns:
            The settings (`settings` itself when nothing is given).
        """
        return (VARSampling.recommended(self.sampling) if settings is None else settings).with_given(**given)

    @torch.no_grad()
    def generate_tokens(
        self,
        labels: torch.Tensor | Sequence[int],
        *,
        settings: VARSampling | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        source_tokens: Sequence[torch.Tensor] | None = None,
        keep_mask: torch.Tensor | None = None,
        **given: Any,
    ) -> SampledTokens:
        """Sample tokens scale by scale with a KV cache and classifier-free guidance (`var_generation`).

        Args:
            labels: (B,) class ids (num_classes = unconditional).
            settings: what to sample with (`VARSampling`: guidance, top-k, top-p, draws, precision, speed-ups);
                None: the model's recommended settings (`sampling_settings`).
            seed: seed of a fresh generator on the model's device (ignored when `generator` is given).
            generator: random generator to draw from (overrides `seed`).
            source_tokens: for zero-shot editing, the source image's tokens per scale, each (B, p*p) (a flow head's:
                (B, p*p, Cvae)).
            keep_mask: for editing, (H, W) or (B, H, W) finest-grid mask, 1 = keep the source token.
            **given: single settings over `settings` (`VARSampling`'s fields, e.g. cfg=1.5, top_k=900; None: not
                given).

        Returns:
            SampledTokens(tokens, logits, features); when editing, the tokens at kept positions are the source's.
        """
        settings = self.sampling_settings(settings, **given)
        with autocast(settings.precision, self.pos_1LC.device):  # the whole generation, as the graphs capture it
            labels = self.labels_tensor(labels)
            editing = None
            if check_edit_inputs(source_tokens, keep_mask, self.patch_nums, labels.shape[0]):
                editing = Editing(source_tokens, keep_mask, labels.device)
            if generator is None and seed is not None:
                generator = torch.Generator(device=labels.device).manual_seed(seed)
            sampler = self.token_head.sampler(self, settings, generator)
            networks = scale_networks(self, labels, settings)
            guidance = ScaleGuidance(settings.cfg, self.num_scales, self.token_head)
            return ScaleByScaleGeneration(self.tokenizer.quantize, networks, sampler, guidance, editing).run()

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor | Sequence[int],
        *,
        settings: VARSampling | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        **given: Any,
    ) -> torch.Tensor:
        """Generate images, e.g. `generate(labels, cfg=1.5, top_k=900, top_p=0.96, seed=0)`; the arguments as in
        `generate_tokens`.

        Returns:
            (B, C, H, W) images (C: the tokenizer's image channels) in [0, 1].
        """
        sampled = self.generate_tokens(labels, settings=settings, seed=seed, generator=generator, **given)
        return self._decode(sampled.features)

    @torch.no_grad()
    def generate_frames(
        self,
        labels: torch.Tensor | Sequence[int],
        *,
        settings: VARSampling | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        **given: Any,
    ) -> list[torch.Tensor]:
        """Watch a sample form: the image decoded from the tokens of scales 1..k, for every k (arguments as
        `generate_tokens`; the last frame is `generate`'s image for the same seed).

        Returns:
            One (B, C, H, W) tensor in [0, 1] per scale, coarse (1×1) to fine.
        """
        sampled = self.generate_tokens(labels, settings=settings, seed=seed, generator=generator, **given)
        frames = self.token_head.features_per_scale(self.tokenizer, sampled.tokens)
        return [self._decode(features) for features in frames]

    @torch.no_grad()
    def edit(
        self,
        labels: torch.Tensor | Sequence[int],
        source_tokens: Sequence[torch.Tensor],
        keep_mask: torch.Tensor,
        *,
        settings: VARSampling | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        **given: Any,
    ) -> torch.Tensor:
        """Zero-shot editing: regenerate the masked-out region of a tokenized image.

        Args:
            labels: (B,) class ids; num_classes (the null class) for unconditional in/out-painting, a real class
                for class-conditional editing.
            source_tokens: the source image's tokens per scale, each (B, p*p) (`vqvae.img_to_tokens`; a flow head's
                continuous ones (B, p*p, Cvae)).
            keep_mask: (H, W) or (B, H, W) finest-grid mask, 1 = keep the source token (see `box_mask`).
            settings, seed, generator, **given: as in `generate_tokens`.

        Returns:
            (B, C, H, W) edited images in [0, 1].
        """
        sampled = self.generate_tokens(labels, settings=settings, seed=seed, generator=generator,
                                       source_tokens=source_tokens, keep_mask=keep_mask, **given)
        return self._decode(sampled.features)

    def _decode(self, features: torch.Tensor) -> torch.Tensor:
        images = self.tokenizer.features_to_img(features).float()  # (B, C, H, W) in [-1, 1]
        return (images + 1) / 2  # (B, C, H, W) in [0, 1]


def build_var(
    vqvae: nn.Module,
    depth: int = 16,
    num_classes: int = 1000,
    shared_aln: bool = False,
    attn_l2_norm: bool = True,
    patch_nums: Sequence[int] | None = None,
    adaln_gamma: float | None = None,
    attention: AttentionBackend = "sdpa",
    **overrides: Any,
) -> VAR:
    """Build an official-architecture VAR on top of a multi-scale tokenizer.

    Args:
        vqvae: the tokenizer (gives vocab_size, z_channels and the default patch_nums).
        depth: number of blocks; width 64·depth, depth heads, drop-path 0.1·depth/24.
        num_classes: number of real classes (one more embedding row is the null class).
        shared_aln: one AdaLN projection shared by all blocks (VAR-d36-s layout).
        attn_l2_norm: cosine attention with learned per-head temperature (official default).
        patch_nums: token grid sides per scale; None = the tokenizer's.
        adaln_gamma: init multiplier of the AdaLN γ rows; None = the official value for this depth.
        attention: teacher-forcing attention, "sdpa" or "flex" (see `VAR`).
        **overrides: any other VARConfig field (width, num_heads, label_dropout, norm_eps, ...).

    Returns:
        The VAR, in training mode, referencing (not owning) `vqvae`.
    """
    config = VARConfig.for_depth(
        depth,
        num_classes=num_classes,
        patch_nums=tuple(vqvae.patch_nums if patch_nums is None else patch_nums),
        vocab_size=vqvae.vocab_size,
        z_channels=vqvae.z_channels,
        shared_aln=shared_aln,
        attn_l2_norm=attn_l2_norm,
        **overrides,
    )
    return VAR(config, tokenizer=vqvae, adaln_gamma=adaln_gamma, attention=attention)
