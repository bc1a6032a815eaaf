"""A flow head for VAR: continuous next-scale tokens by per-token flow matching (MAR's diffusion loss, with FlowAR's
and xAR's flow matching instead of DDPM).

Each position's token is a continuous vector (the latent channels of a `ContinuousScales` tokenizer). The transformer's
output at that position, after VAR's final AdaLN (`head_nm`), conditions a small MLP (`flow_head`: `FlowMLP`, a few
residual blocks with adaLN, width `VARConfig.head_width`) that predicts the velocity of the linear interpolant
x_t = (1 − t)·x + t·ε (`diffusion.flow.LinearFlow`: its time sampling, its loss, its Euler / Heun ODE steps). Training
draws one t and ε per token; sampling integrates each scale's tokens from noise in `VARSampling.flow_steps` steps,
guiding the velocity with VAR's classifier-free guidance ramp over scales ((1 + s)·v_cond − s·v_uncond; cfg 0: the
conditional velocity, exactly).

The head owns no codebook: its tokens are its features (`ScaleDraw.features` = tokens), a token cache stores them as
float32, and the categorical settings (top-k, top-p, more_smooth, inverse-CDF draws) and the speed-ups that assume
the categorical head (FastVAR pruning, a CoDe refiner) are refused in one line.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from scalegen.diffusion.flow import LinearFlow
from scalegen.errors import UserError
from scalegen.models.layers import TimestepEmbedder
from scalegen.models.sampling_settings import FLOW_METHODS, VARSampling
from scalegen.models.settings import FLOW_CONTEXT_NOISE, FLOW_HEAD
from scalegen.models.token_heads import (
    ADALN_INIT_GAIN, HeadLoss, ScaleDraw, ScaleGuidance, TokenHead, register_token_head,
)
from scalegen.models.var_blocks import AdaLNBeforeHead

NORM_EPS = 1e-6  # the MLP's LayerNorms (MAR's SimpleMLPAdaLN)
FLOW_BLOCK_CHUNKS, FLOW_FINAL_CHUNKS = 3, 2  # shift, scale, gate of a block; shift, scale of the final norm
# What the head cannot sample with: the categorical head's settings, at their defaults here.
CATEGORICAL_SETTINGS = {"top_k": 0, "top_p": 0.0, "more_smooth": False, "draws": "multinomial"}


class FlowBlock(nn.Module):
    """A residual MLP block under adaLN: x + gate · MLP(LN(x)·(1 + scale) + shift), the modulation given."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=NORM_EPS, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = modulation.chunk(3, dim=-1)  # (N, w) each
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)  # (N, w)


class FlowMLP(nn.Module):
    """The velocity v(x_t, t | z) of one token x_t (N, c) at time t·TIME_SCALE, given the transformer's output z
    (N, C) at its position: MAR's SimpleMLPAdaLN, with the adaLN modulation split into a part of the condition and a
    part of the time, each projected from its own embedding and summed (MAR projects their sum). A scale's tokens
    share their conditions through all ODE steps and, at sampling, one time per step, so the sampler projects each
    once (`conditioning` per scale, the time per step) and only the blocks' MLPs run per token and step.

    Args:
        channels: the token's dimension c.
        width: the MLP's width.
        condition_width: the transformer's width C.
        blocks: residual blocks.
    """

    def __init__(self, channels: int, width: int, condition_width: int, blocks: int) -> None:
        super().__init__()
        modulations = (FLOW_BLOCK_CHUNKS * blocks + FLOW_FINAL_CHUNKS) * width  # every block's, then the final's
        self.input_proj = nn.Linear(channels, width)
        self.time_embed = TimestepEmbedder(width)
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, modulations))
        self.condition_embed = nn.Linear(condition_width, width)
        self.condition_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, modulations))
        self.blocks = nn.ModuleList(FlowBlock(width) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(width, eps=NORM_EPS, elementwise_affine=False)
        self.output_proj = nn.Linear(width, channels)

    @torch.no_grad()
    def zero_modulations(self) -> None:
        """adaLN-zero: every block starts as the identity and the velocity at 0."""
        for layer in (self.time_modulation[-1], self.condition_modulation[-1], self.output_proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def conditioning(self, condition: torch.Tensor) -> torch.Tensor:
        """The condition's part (N, (3·blocks + 2)·w) of every modulation, of the transformer's outputs (N, C)."""
        return self.condition_modulation(self.condition_embed(condition))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """The velocity (N, c) of tokens x (N, c) at times t (N,) (or one time (1,) for all) under their
        `conditioning` (N, (3·blocks + 2)·w)."""
        modulations = (conditioning + self.time_modulation(self.time_embed(t))).split(
            [FLOW_BLOCK_CHUNKS * self.input_proj.out_features] * len(self.blocks)
            + [FLOW_FINAL_CHUNKS * self.input_proj.out_features], dim=-1)  # per block (N, 3w), final (N, 2w)
        h = self.input_proj(x)  # (N, w)
        for block, modulation in zip(self.blocks, modulations):
            h = block(h, modulation)  # (N, w)
        shift, scale = modulations[-1].chunk(2, dim=-1)  # (N, w) each
        return self.output_proj(self.final_norm(h) * (1 + scale) + shift)  # (N, c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The velocity (D·N, c) of tokens x (D·N, c) at times t (D·N,) given the transformer's outputs (N, C): D
        draws of each condition, draw after draw (its conditioning projected once and repeated)."""
        conditioning = self.conditioning(condition)  # (N, (3·blocks + 2)·w)
        return self.velocity(x, t, conditioning.repeat(len(x) // len(condition), 1))


@register_token_head(FLOW_HEAD)
class FlowHead(TokenHead):
    """Per-token flow matching on continuous tokens (see the module's docstring). Its `output` is the conditioning z
    (B, l, C) at generation and, given the targets in training, the per-position flow-matching loss (B, L) (the noise
    and times are drawn there, so the MLP runs inside `VAR.forward`, where DDP and FSDP see it)."""

    continuous_tokens = True
    context_noise = FLOW_CONTEXT_NOISE
    flow = LinearFlow()  # its default time sampling; sampling uses its ODE steps

    def layers(self) -> dict[str, nn.Module]:
        config = self.config
        return {"head_nm": AdaLNBeforeHead(config.width, config.norm_eps),
                "flow_head": FlowMLP(config.z_channels, config.head_width or config.width, config.width,
                                     config.head_blocks)}

    def initialize(self, model: nn.Module) -> None:
        model.head_nm.ada_lin[-1].weight.mul_(ADALN_INIT_GAIN)
        model.flow_head.zero_modulations()

    def output(self, model: nn.Module, hidden: torch.Tensor, cond: torch.Tensor,
               targets: torch.Tensor | None = None) -> torch.Tensor:
        condition = model.head_nm(hidden.float(), cond).float()  # (B, l, C)
        if targets is None:
            return condition
        batch, length, channels = targets.shape
        draws = self.config.head_draws  # each token's loss at this many noises and times (MAR's multiplier)
        per_draw = self.flow.training_losses(
            model.flow_head, targets.reshape(-1, channels).float().repeat(draws, 1),
            model_kwargs={"condition": condition.reshape(batch * length, -1)})["loss"]  # (D·B·L,)
        return per_draw.view(draws, batch, length).mean(dim=0)  # (B, L)

    def loss(self, model: nn.Module, output: torch.Tensor, targets: torch.Tensor,
             label_smoothing: float = 0.0) -> HeadLoss:
        if label_smoothing:
            raise UserError(f"label smoothing {label_smoothing} is the categorical head's; the flow head has no "
                            "classes to smooth: drop --label-smoothing")
        return HeadLoss(output, {})

    def targets(self, tokenizer: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        return tokenizer.img_to_tokens(images)  # K × (B, p², c)

    def var_input(self, tokenizer: nn.Module, targets: Sequence[torch.Tensor]) -> torch.Tensor:
        return tokenizer.tokens_to_var_input(targets)  # (B, L - p_0², c)

    def cache_dtype(self, tokenizer: nn.Module) -> torch.dtype:
        return torch.float32

    @classmethod
    def noisy_context(cls, targets: Sequence[torch.Tensor], strength: float) -> list[torch.Tensor]:
        """Each scale's tokens (B, p², c) as (1 − τ)·x + τ·ε, ε ~ N(0, 1), τ ~ U(0, strength) per image and scale: a
        point on the scale's own flow path, as imperfect as a sample the head has not finished."""
        noisy = []
        for tokens in targets:
            level = strength * torch.rand(tokens.shape[0], 1, 1, device=tokens.device)  # (B, 1, 1)
            noisy.append((1 - level) * tokens + level * torch.randn_like(tokens))  # (B, p², c)
        return noisy

    def sampler(self, model: nn.Module, settings: VARSampling, generator: torch.Generator | None) -> FlowSampler:
        refused = [name for name, default in CATEGORICAL_SETTINGS.items() if getattr(settings, name) != default]
        if refused:
            raise UserError(f"the flow head samples continuous tokens, so {', '.join(refused)} do not apply: leave "
                            f"{' and '.join(refused)} at their defaults")
        if settings.pruning is not None or settings.refiner is not None:
            raise UserError("FastVAR pruning and a CoDe refiner work with the categorical head only: leave --prune "
                            "and --refiner off with a flow head")
        if settings.flow_steps < 1 or settings.flow_sampler not in FLOW_METHODS:
            raise UserError(f"the flow head takes flow_steps >= 1 and a flow_sampler in {', '.join(FLOW_METHODS)}, "
                            f"got {settings.flow_steps} and {settings.flow_sampler!r}")
        return FlowSampler(model.flow_head, self.flow, self.config.z_channels, settings.flow_steps,
                           settings.flow_sampler, generator)

    def features_per_scale(self, tokenizer: nn.Module, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return tokenizer.quantize.tokens_to_features(tokens, all_scales=True)


class FlowSampler:
    """The flow head's sampling step: each token of a scale integrated from noise (t = 1) to a token (t = 0) by the
    guided velocity, in `steps` Euler or Heun steps of `LinearFlow`.

    Args:
        mlp: the head's `FlowMLP` (its conditioning projected once per scale, its time once per step).
        flow: the flow whose ODE steps are taken.
        channels: the token's dimension c.
        steps: ODE steps per scale.
        method: "euler" or "heun".
        generator: draws the starting noise.
    """

    def __init__(self, mlp: nn.Module, flow: LinearFlow, channels: int, steps: int, method: str,
                 generator: torch.Generator | None = None) -> None:
        self.mlp = mlp
        self.flow = flow
        self.channels = channels
        self.steps = steps
        self.method = method
        self.generator = generator

    def sample(self, both: torch.Tensor, guidance: ScaleGuidance, scale_index: int) -> ScaleDraw:
        """See `TokenSampler.sample` (`both`: the conditioning z (2B, l, C) of both halves)."""
        double, length, _ = both.shape
        batch = double // 2
        channels = self.channels
        conditioning = self.mlp.conditioning(both.reshape(double * length, -1))  # (2B·l, (3·blocks + 2)·w)
        guided: list[torch.Tensor] = []  # the last guided velocity (B, l, c)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            """The guided velocity (B·l, c) at tokens x (B·l, c) and the step's time t (B·l,) (all equal)."""
            both_velocities = self.mlp.velocity(x.repeat(2, 1), t[:1], conditioning).float()  # (2B·l, c)
            guided[:] = [guidance.combine(both_velocities.view(double, length, channels), scale_index)]  # (B, l, c)
            return guided[0].reshape(batch * length, channels)  # (B·l, c)

        noise = torch.randn(batch * length, channels, generator=self.generator, device=both.device)  # (B·l, c)
        for step in self.flow.sample_loop_progressive(velocity, noise, self.steps, self.method):
            tokens = step["sample"]  # (B·l, c)
        tokens = tokens.view(batch, length, channels)  # (B, l, c)
        return ScaleDraw(tokens, tokens, guided[0])

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """See `TokenSampler.embed`: continuous tokens are their own features (B, l, c)."""
        return tokens
