"""DiT: the diffusion transformer of Peebles & Xie, with the official state-dict layout and the 12 presets."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from scalegen.classes import label_ids
from scalegen.diffusion.names import GuidanceInterval, check_guidance_interval
from scalegen.diffusion.objective import Objective
from scalegen.diffusion.objectives import objective_class, sampling_objective
from scalegen.diffusion.sampling import Decoder, SamplingPlan, decode, guided_steps, sample_with_guidance
from scalegen.models.sampling_settings import (
    DIT_SETTINGS, FROM_CONFIG, FROM_DEFAULT, FROM_FLAG, Chosen, DiTSampling, chosen_settings, values,
)
from scalegen.errors import UserError
from scalegen.mixed_precision import autocast
from scalegen.models.dit_blocks import FinalLayer, make_block
from scalegen.models.layers import (
    LabelEmbedder, PatchEmbed, ReferencedModule, ReferencingModule, TimestepEmbedder, sincos_2d,
)
from scalegen.models.settings import BLOCK_KINDS, BlockOptions, preset_dimensions

EMBEDDING_INIT_STD = 0.02
# The official forward_with_cfg guides only the first three ε channels (a GLIDE leftover kept for parity).
OFFICIAL_GUIDED_CHANNELS = 3


@dataclass
class DiTConfig:
    """Everything needed to rebuild a DiT; stored beside every checkpoint."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    objective: str = "ddpm"
    cfg_interval: GuidanceInterval | None = None
    learn_sigma: bool = True
    block: str = "adaln_zero"
    norm: str = BlockOptions.norm  # LightningDiT's block options (BlockOptions); the defaults are DiT's block
    mlp: str = BlockOptions.mlp
    rope: bool = BlockOptions.rope
    qk_norm: bool = BlockOptions.qk_norm

    def __post_init__(self) -> None:
        self.cfg_interval = check_guidance_interval(self.cfg_interval)  # a stored config holds a list

    @property
    def block_options(self) -> BlockOptions:
        """LightningDiT's block options of this config (the official block by default)."""
        return BlockOptions(self.norm, self.mlp, self.rope, self.qk_norm)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels


def preset_config(preset: str, **overrides) -> DiTConfig:
    """The DiTConfig of a named preset such as "DiT-XL/2", with keyword overrides (input_size, num_classes, …)."""
    return DiTConfig(**preset_dimensions(preset), **overrides)


class DiT(ReferencingModule):
    """Diffusion transformer: patchify, condition on timestep + class, transformer blocks, unpatchify.

    `forward(x, t, y)` returns (B, out_channels, H, W): what the config's objective predicts (ε and, with learn_sigma,
    the variance interpolation v, for the paper's ddpm). A MeanFlow DiT also embeds the interval t − r
    (`interval_embedder`, added to the conditioning and to the context's time token). `generate(labels, …)` samples
    images; a latent-space model decodes them with its decoder (`attach_decoder`), which it references but does not
    own (it is not in the state dict, as in the official checkpoints).
    """

    # Tensors an objective adds to the network: a model fine-tuned from another objective's weights starts them at
    # their initialisation (the interval embedding's output layer is zero, so the model starts as its source).
    OBJECTIVE_ADDITIONS = ("interval_embedder.",)

    def __init__(self, config: DiTConfig, decoder: nn.Module | None = None):
        super().__init__()
        if config.block not in BLOCK_KINDS:
            raise UserError(f"unknown block kind {config.block!r}; choose one of {', '.join(BLOCK_KINDS)}")
        objective = objective_class(config.objective)
        if config.learn_sigma and not objective.learns_sigma:
            raise UserError(f"a {config.objective} model predicts no variance: build it with learn_sigma=False "
                            "(--no-learn-sigma)")
        if config.hidden_size % config.num_heads:
            raise UserError(f"hidden size {config.hidden_size} is not divisible by {config.num_heads} heads; "
                            "change --hidden-size or --num-heads")
        if config.input_size % config.patch_size:
            raise UserError(f"input size {config.input_size} is not divisible by patch size {config.patch_size}; "
                            "change --model, --patch-size or --image-size")
        block_options = config.block_options
        block_options.check(config.block, config.hidden_size // config.num_heads)
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.gradient_checkpointing = False
        dim = config.hidden_size
        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(config.num_classes, dim, config.class_dropout_prob)
        self.interval_embedder = TimestepEmbedder(dim) if objective.time_inputs == 2 else None
        # A fixed sin-cos table, kept as a frozen Parameter (not a buffer) so the official key layout holds.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            make_block(config.block, dim, config.num_heads, config.mlp_ratio, block_options,
                       config.input_size // config.patch_size)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(dim, config.patch_size, self.out_channels)
        self.initialize_weights()
        self._decoder = ReferencedModule(decoder)
        self.class_names: list[str] | None = None  # set by the loaders; sampling calls accept these names
        # The recommended sampling settings (`scalegen.models.sampling_settings`), set by the loaders: `generate` takes
        # each setting left None from here, else from the objective (`chosen_sampling`).
        self.sampling: dict = {}
        self.sampling_origin = FROM_DEFAULT

    @property
    def objective(self) -> Objective:
        """What the network's output means, and how it samples (the config's objective, with default settings)."""
        return sampling_objective(self.config.objective)

    def initialize_weights(self) -> None:
        """The official initialisation: Xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid_size = int(self.x_embedder.num_patches**0.5)
        self.pos_embed.data.copy_(sincos_2d(self.config.hidden_size, grid_size).unsqueeze(0))
        # The patch convolution is initialised like a Linear on its flattened weight.
        patch_weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=EMBEDDING_INIT_STD)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=EMBEDDING_INIT_STD)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=EMBEDDING_INIT_STD)
        if self.interval_embedder is not None:
            nn.init.normal_(self.interval_embedder.mlp[0].weight, std=EMBEDDING_INIT_STD)
            nn.init.zeros_(self.interval_embedder.mlp[2].weight)  # starts as an instantaneous-velocity model
            nn.init.zeros_(self.interval_embedder.mlp[2].bias)
        zeroed = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.config.block == "adaln_zero":
            zeroed += [block.adaLN_modulation[-1] for block in self.blocks]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, p*p*C) back to an image (B, C, H, W)."""
        patch, channels = self.patch_size, self.out_channels
        side = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], side, side, patch, patch, channels)  # (B, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
        return x.reshape(x.shape[0], channels, side * patch, side * patch)  # (B, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, interval: torch.Tensor | None = None,
                drop_labels: bool = True) -> torch.Tensor:
        """Predict ε (and v) for latents x (B, C, H, W) at timesteps t (B,) for classes y (B,).

        interval: a MeanFlow model's t − r (B,), unscaled; drop_labels=False keeps the labels as given in training (an
        objective that drops them itself passes the null class).
        """
        tokens = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        t_embedding = self.t_embedder(t)  # (B, D)
        y_embedding = self.y_embedder(y, drop_labels)  # (B, D)
        condition = t_embedding + y_embedding  # (B, D)
        time_token = t_embedding  # (B, D)
        if self.interval_embedder is not None:
            if interval is None:
                raise ValueError("a MeanFlow DiT needs the interval t − r (interval=)")
            interval_embedding = self.interval_embedder(interval)  # (B, D)
            condition = condition + interval_embedding  # (B, D)
            # The in-context and cross-attention blocks read the context, not the condition: the time token carries
            # the interval too (its zero-initialised embedding leaves a model fine-tuned from a flow DiT as it was).
            time_token = t_embedding + interval_embedding  # (B, D)
        context = torch.stack([time_token, y_embedding], dim=1)  # (B, 2, D)
        in_context = self.config.block == "in_context"
        if in_context:
            tokens = torch.cat([context, tokens], dim=1)  # (B, 2 + T, D)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                tokens = checkpoint(block, tokens, condition, context, use_reentrant=False)  # (B, T, D)
            else:
                tokens = block(tokens, condition, context)  # (B, T, D)
        if in_context:
            tokens = tokens[:, context.shape[1] :]  # (B, T, D)
        tokens = self.final_layer(tokens, condition)  # (B, T, p*p*C_out)
        return self.unpatchify(tokens)  # (B, C_out, H, W)

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, guide_all_channels: bool = False,
        interval: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Classifier-free guidance on a batch laid out as [conditional half; null-class half].

        The first half's latents serve both halves. By default only ε channels 0..2 are guided (the official
        behaviour); `guide_all_channels=True` guides every ε channel, the standard formulation. With fewer than
        three input channels (pixel-space grayscale) every ε channel is guided and the variance channels never are:
        the official slice would reach into the variance channels there and wreck the sampler. `interval`: a
        MeanFlow model's t − r (as `forward`).
        """
        half = x[: len(x) // 2]  # (B/2, C, H, W)
        output = self.forward(torch.cat([half, half], dim=0), t, y, interval)  # (B, C_out, H, W)
        guided_channels = self.in_channels if guide_all_channels else min(OFFICIAL_GUIDED_CHANNELS, self.in_channels)
        eps, rest = output[:, :guided_channels], output[:, guided_channels:]  # (B, g, H, W), (B, C_out-g, H, W)
        conditional, unconditional = eps.chunk(2, dim=0)  # 2 × (B/2, g, H, W)
        guided = unconditional + cfg_scale * (conditional - unconditional)  # (B/2, g, H, W)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)  # (B, C_out, H, W)

    def attach_decoder(self, decoder: nn.Module | None) -> None:
        """Decode generated latents with `decoder` (an SD VAE or tokenizer codec); None for a pixel-space model."""
        self._decoder = ReferencedModule(decoder)

    @property
    def decoder(self) -> Decoder | None:
        """The latent space's decoder, or None for a pixel-space model."""
        return self._decoder.module

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor | Sequence[int],
        *,
        settings: DiTSampling | None = None,
        seed: int | None = None,
        noise: torch.Tensor | None = None,
        progress: bool = False,
        **given: Any,
    ) -> torch.Tensor:
        """Sample images of the given classes, as the official sample.py does, e.g.
        `generate(labels, cfg=2.5, steps=50, seed=0)`.

        Args:
            labels: (B,) class ids, or class names ("Trouser", ["golden retriever", 7]) of a loaded model.
            settings: what to sample with (`DiTSampling`); None: the model's own choice of each setting
                (`sampling_settings`).
            seed: seed the global torch RNG with this first, restoring it afterwards; None draws from it as it is
                (the official sampler's habit: noise at every step comes from the global RNG).
            noise: starting noise (B, C, h, w); drawn when None.
            progress: show a progress bar.
            **given: any `DiTSampling` field over `settings` (None leaves it as it is): cfg (1.0: no guidance and no
                doubled batch), steps, sampler (ddpm models "ddpm", "ddim", "dpm-solver++"; flow models "euler",
                "heun", "euler-maruyama"; meanflow models "meanflow", "euler"), cfg_interval, guide_all_channels,
                precision. Each left None is the model's recommended one (`sampling`, set by the loaders), else the
                objective's default (ddpm: cfg 4.0 and 250 steps of "ddpm", as the official sample.py; flow: 50 steps;
                meanflow: one jump at cfg 1.0, its guidance trained in), and the interval the config's.
        Returns:
            (B, C, H, W) images in [0, 1] (C: the decoder's image channels, or the model's in pixel space).
        """
        labels, plan, settings = self.sampling_setup(labels, self.sampling_settings(settings, **given))
        with seeded(seed, labels.device), autocast(settings.precision, labels.device):
            return sample_with_guidance(self, plan, labels, settings.cfg, self.decoder, noise,
                                        settings.guide_all_channels, progress)

    @torch.no_grad()
    def generate_frames(
        self,
        labels: torch.Tensor | Sequence[int],
        *,
        settings: DiTSampling | None = None,
        seed: int | None = None,
        frames: int = 8,
        **given: Any,
    ) -> list[torch.Tensor]:
        """Watch a sample form: the predicted clean image x̂₀ at `frames` evenly spaced steps, the last being the
        sample itself (arguments as `generate`; the same seed gives the same final images).

        Returns:
            `frames` tensors (B, C, H, W) in [0, 1], from the first step's prediction to the final sample.
        """
        labels, plan, settings = self.sampling_setup(labels, self.sampling_settings(settings, **given))
        steps = plan.steps
        shown = {round(index * (steps - 1) / max(frames - 1, 1)) for index in range(frames)}
        images = []
        with seeded(seed, labels.device), autocast(settings.precision, labels.device):
            for index, output in enumerate(guided_steps(self, plan, labels, settings.cfg, self.decoder,
                                                        guide_all_channels=settings.guide_all_channels)):
                if index in shown:
                    latents = output["sample"] if index == steps - 1 else output["pred_xstart"]
                    images.append(decode(latents, self.decoder))  # (B, C, H, W)
        return images

    def sampling_setup(self, labels: torch.Tensor | Sequence[int],
                       settings: DiTSampling) -> tuple[torch.Tensor, SamplingPlan, DiTSampling]:
        """Checked class ids (B,) on the model's device, the sampling plan of chosen settings (`sampling_settings`)
        and the settings, their steps, sampler and interval checked."""
        labels = label_ids(labels, self.class_names)
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.pos_embed.device).reshape(-1)  # (B,)
        if labels.numel() == 0 or bool(((labels < 0) | (labels >= self.config.num_classes)).any()):
            raise ValueError(f"class ids must be in 0..{self.config.num_classes - 1}; got {labels.tolist()}")
        objective = self.objective
        settings = replace(settings, steps=objective.check_steps(settings.steps),
                           sampler=objective.check_sampler(settings.sampler),
                           cfg_interval=check_guidance_interval(settings.cfg_interval))
        plan = SamplingPlan(objective, settings.sampler, settings.steps, settings.cfg_interval)
        return labels, plan, settings

    def sampling_settings(self, settings: DiTSampling | None = None, **given: Any) -> DiTSampling:
        """What a generation samples with: `settings` (None: `DiTSampling()`, all left to the model) with each given
        setting that is not None, every setting still None chosen by `chosen_sampling`.

        Args:
            settings: the settings to start from.
            **given: any `DiTSampling` field (cfg, steps, sampler, cfg_interval, guide_all_channels, precision); None
                leaves it as it is.
        Returns:
            The settings, none of cfg, steps and sampler None.
        """
        settings = (DiTSampling() if settings is None else settings).with_given(**given)
        return replace(settings, **values(self.chosen_sampling(settings)))

    def chosen_sampling(self, settings: DiTSampling | None = None) -> Chosen:
        """The one rule of a DiT's sampling settings: each value `settings` gives (not None), else the model's
        recommended one (`sampling`), else its objective's default, and the guidance interval given, else the
        config's (none: every step); `generate`, `scalegen sample dit` (which prints where each came from) and the
        diffusers export's model card all take theirs from here.

        Returns:
            "cfg", "steps", "sampler", "cfg_interval" -> (value, where it came from: a value given is FROM_FLAG).
        """
        settings = DiTSampling() if settings is None else settings
        objective = self.objective
        chosen = chosen_settings({name: getattr(settings, name) for name in DIT_SETTINGS}, self.sampling,
                                 self.sampling_origin, {"cfg": objective.default_cfg, "steps": objective.default_steps,
                                                        "sampler": objective.default_sampler})
        interval = self.config.cfg_interval
        if settings.cfg_interval is not None:
            chosen["cfg_interval"] = (settings.cfg_interval, FROM_FLAG)
        else:
            chosen["cfg_interval"] = (interval, FROM_DEFAULT if interval is None else FROM_CONFIG)
        return chosen


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Inside, the global torch RNG is seeded with `seed` and restored afterwards; None leaves it as it is (the
    official sampler draws its noise from the global RNG at every step)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield

def build_dit(
    preset: str = "DiT-XL/2",
    input_size: int = 32,
    num_classes: int = 1000,
    in_channels: int = 4,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
    block: str = "adaln_zero",
    **overrides,
) -> DiT:
    """Build a DiT from a preset name ("DiT-S/2" … "DiT-XL/8").

    Args:
        preset: model size and patch size, e.g. "DiT-XL/2".
        input_size: latent (or pixel) side length; 32 for 256px images through the SD VAE.
        num_classes: number of classes; an extra null-class row is added when class_dropout_prob > 0.
        in_channels: 4 for SD-VAE latents, 1 or 3 for pixel space.
        learn_sigma: predict the variance interpolation too (out_channels = 2 * in_channels).
        class_dropout_prob: label dropout in training, enabling classifier-free guidance.
        block: "adaln_zero" (the paper's), "adaln", "in_context" or "cross_attention" (the ablation).
        overrides: any other DiTConfig field (depth, hidden_size, num_heads, mlp_ratio) for custom sizes.
    Returns:
        A freshly initialised DiT.
    """
    config = preset_config(
        preset,
        input_size=input_size,
        num_classes=num_classes,
        in_channels=in_channels,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
        block=block,
    )
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise UserError(f"unknown DiT option {name!r}; valid options: {', '.join(asdict(config))}")
        setattr(config, name, value)
    return DiT(config)
