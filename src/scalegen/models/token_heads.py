"""VAR's token heads: what the transformer's positions predict, and how (the seam a new kind of token comes through,
e.g. a continuous flow head as FlowAR's or xAR's: one file with its registered head, plus its test).

A `TokenHead` owns, for one VAR (`VARConfig.token_head` names it; `register_token_head` adds one):
- its output layers (`layers`: built from the VAR config, registered on the VAR under the head's names, so the
  categorical head keeps the official keys `head_nm.*` and `head.*` and official checkpoints load `strict=True`),
  their init (`initialize`) and its output per position (`output`: what `VAR.forward` returns, logits for VAR's head);
- its training loss and figures, per position, given that output and the scales' targets (`loss`);
- what a token is for it: the training targets per scale of images (`targets`: integer ids for VAR's head), the
  teacher-forcing input they make (`var_input`) and how a token cache stores them (`cache_dtype`);
- generation: how the conditional and unconditional halves combine (`guide`: on logits for VAR's head; a flow head
  would guide its velocities), asked by `ScaleGuidance`, which keeps the ramp over scales, and its sampling step
  (`sampler`: a `TokenSampler` turning one scale's output into tokens and their tokenizer features).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from scalegen.errors import UserError
from scalegen.models.sampling_settings import VARSampling
from scalegen.models.settings import CATEGORICAL_HEAD, DRAWS, Draws
from scalegen.models.var_blocks import AdaLNBeforeHead
from scalegen.models.var_sampling import filter_logits, inverse_cdf_tokens, sample_tokens, smooth_embedding
from scalegen.registry import Registry

# Official init (models/var.py init_weights): the head starts 50× smaller, the AdaLN scale/shift rows at half.
HEAD_INIT_GAIN = 0.02
ADALN_INIT_GAIN = 0.5


class HeadLoss(NamedTuple):
    """A head's training loss of a batch, per position (the task averages them, over all and per scale)."""

    loss: torch.Tensor  # (B, L) the loss of each position, with its graph
    figures: dict[str, torch.Tensor]  # name -> (B, L) a figure of each position (e.g. "accuracy"), no graph


class ScaleDraw(NamedTuple):
    """One scale drawn by a `TokenSampler`."""

    tokens: torch.Tensor  # (B, l, ...) the scale's tokens (integer ids (B, l) for VAR's head)
    features: torch.Tensor  # (B, l, Cvae) their tokenizer features, what the next scale builds on
    guided: torch.Tensor  # (B, l, ...) the guided head output they were drawn from (logits for VAR's head)


class TokenSampler(Protocol):
    """One generation's sampling step of a head (with its settings and random generator)."""

    def sample(self, both: torch.Tensor, guidance: ScaleGuidance, scale_index: int) -> ScaleDraw:
        """Draw one scale from the head output of both guidance halves (2B, l, ...): conditional rows first."""

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features (B, l, Cvae) of given tokens (B, l, ...), as editing's kept source tokens."""


class TokenHead(ABC):
    """A VAR's output head: layers, loss, targets and sampling (see the module's docstring). Stateless beyond the
    config: the layers live on the VAR (`layers` builds them once), and each method is given the model.

    Args:
        config: the VAR's config (`VARConfig`).
    """

    name = ""  # set by `register_token_head`
    # Its tokens are continuous vectors (a `ContinuousScales` tokenizer's), not a VQ tokenizer's integer ids.
    continuous_tokens = False
    context_noise = 0.0  # the noisy context (`noisy_context`) it trains with unless told otherwise

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def layers(self) -> dict[str, nn.Module]:
        """The head's output layers, new, by the attribute names the VAR registers them under."""

    @abstractmethod
    def initialize(self, model: nn.Module) -> None:
        """Scale the layers' init (after the VAR's truncated-normal init of every layer)."""

    @abstractmethod
    def output(self, model: nn.Module, hidden: torch.Tensor, cond: torch.Tensor,
               targets: torch.Tensor | None = None) -> torch.Tensor:
        """The head's float32 output (B, l, ...) of hidden states (B, l, C) under the class embeddings (B, C); in
        training also given the targets (B, l, ...), for a head whose output needs them (a flow head's noised tokens:
        its layers then run inside `VAR.forward`, where DDP and FSDP expect them)."""

    @abstractmethod
    def loss(self, model: nn.Module, output: torch.Tensor, targets: torch.Tensor,
             label_smoothing: float = 0.0) -> HeadLoss:
        """The training loss of `output` (B, L, ...) against all scales' targets concatenated (B, L, ...);
        `label_smoothing` is the cross-entropy's (a head without classes refuses a nonzero one)."""

    @abstractmethod
    def targets(self, tokenizer: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        """What each scale's positions learn to predict of images in [-1, 1]: per scale (B, p², ...)."""

    @abstractmethod
    def var_input(self, tokenizer: nn.Module, targets: Sequence[torch.Tensor]) -> torch.Tensor:
        """The teacher-forcing input (B, L - p_0², Cvae) that per-scale targets make (`VAR.forward`'s)."""

    @abstractmethod
    def cache_dtype(self, tokenizer: nn.Module) -> torch.dtype:
        """How a token cache stores the targets."""

    @classmethod
    def noisy_context(cls, targets: Sequence[torch.Tensor], strength: float) -> list[torch.Tensor]:
        """xAR's noisy context: per-scale targets (B, p², ...) made into tokens of a noisier teacher-forcing input
        (`strength` in (0, 1]); a head of codebook ids refuses (given no targets too: a check before training)."""
        raise UserError(f"the {cls.name} head's tokens take no noise: drop --context-noise (it is for a head of "
                        "continuous tokens, e.g. --token-head flow)")

    def guide(self, both: torch.Tensor, strength: float) -> torch.Tensor:
        """Classifier-free guidance: (B, l, ...) of (2B, l, ...) both halves' outputs, conditional rows first; by
        default (1 + s)·conditional − s·unconditional (VAR's on logits, the flow head's on velocities)."""
        batch = both.shape[0] // 2
        return (1 + strength) * both[:batch] - strength * both[batch:]  # (B, l, ...)

    @abstractmethod
    def sampler(self, model: nn.Module, settings: VARSampling,
                generator: torch.Generator | None) -> TokenSampler:
        """One generation's sampling step (`settings`: the generation's; a head may ignore those it has no use for)."""

    @abstractmethod
    def features_per_scale(self, tokenizer: nn.Module, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The tokenizer features (B, Cvae, h, w) accumulated over scales 1..k of sampled tokens, for every k."""


TOKEN_HEADS: Registry[type[TokenHead]] = Registry("VAR token head")


def register_token_head(name: str) -> Callable[[type[TokenHead]], type[TokenHead]]:
    """Class decorator: make a `TokenHead` the one `VARConfig(token_head=name)` builds."""

    def register(head: type[TokenHead]) -> type[TokenHead]:
        TOKEN_HEADS.register(name, head)
        head.name = name
        return head

    return register


def token_head_class(name: str) -> type[TokenHead]:
    """The head registered as `name`; a one-line UserError for an unknown one."""
    return TOKEN_HEADS.chosen(name)


def build_token_head(config: Any) -> TokenHead:
    """The head a VAR config names (`config.token_head`); a one-line UserError for an unknown one."""
    return token_head_class(config.token_head)(config)


class ScaleGuidance:
    """Classifier-free guidance ramping with the scale: at scale index k of K the strength is t = cfg·k/(K-1), and the
    head combines the halves (VAR's: (1 + t)·conditional - t·unconditional logits)."""

    def __init__(self, cfg: float, num_scales: int, head: TokenHead) -> None:
        self.cfg = cfg
        self.num_scales = num_scales
        self.head = head

    def progress(self, scale_index: int) -> float:
        """How far generation is: scale index / (scales - 1), in [0, 1]."""
        return scale_index / max(self.num_scales - 1, 1)

    def combine(self, both: torch.Tensor, scale_index: int) -> torch.Tensor:
        """(B, l, ...) guided outputs of the (2B, l, ...) outputs of both halves."""
        return self.head.guide(both, self.cfg * self.progress(scale_index))


@register_token_head(CATEGORICAL_HEAD)
class CategoricalHead(TokenHead):
    """VAR's head: an AdaLN (`head_nm`) and a linear layer (`head`) give logits over the tokenizer's codebook; trained
    by cross-entropy on the integer token ids, sampled by top-k / top-p filtered draws (`CategoricalSampler`)."""

    def layers(self) -> dict[str, nn.Module]:
        return {"head_nm": AdaLNBeforeHead(self.config.width, self.config.norm_eps),
                "head": nn.Linear(self.config.width, self.config.vocab_size)}

    def initialize(self, model: nn.Module) -> None:
        model.head.weight.mul_(HEAD_INIT_GAIN)
        model.head_nm.ada_lin[-1].weight.mul_(ADALN_INIT_GAIN)

    def output(self, model: nn.Module, hidden: torch.Tensor, cond: torch.Tensor,
               targets: torch.Tensor | None = None) -> torch.Tensor:
        return model.head(model.head_nm(hidden.float(), cond).float()).float()  # (B, l, V)

    def loss(self, model: nn.Module, output: torch.Tensor, targets: torch.Tensor,
             label_smoothing: float = 0.0) -> HeadLoss:
        per_token = F.cross_entropy(output.transpose(1, 2), targets, label_smoothing=label_smoothing,
                                    reduction="none")  # (B, L)
        correct = (output.argmax(-1) == targets).float()  # (B, L)
        return HeadLoss(per_token, {"accuracy": correct})

    def targets(self, tokenizer: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        return tokenizer.img_to_tokens(images)  # K × (B, p²)

    def var_input(self, tokenizer: nn.Module, targets: Sequence[torch.Tensor]) -> torch.Tensor:
        return tokenizer.tokens_to_var_input(targets)  # (B, L - p_0², Cvae)

    def cache_dtype(self, tokenizer: nn.Module) -> torch.dtype:
        return torch.int16 if tokenizer.vocab_size <= torch.iinfo(torch.int16).max else torch.int32

    def sampler(self, model: nn.Module, settings: VARSampling,
                generator: torch.Generator | None) -> CategoricalSampler:
        return CategoricalSampler(model.tokenizer.quantize.embedding, settings.top_k, settings.top_p,
                                  settings.more_smooth, generator, settings.draws)

    def features_per_scale(self, tokenizer: nn.Module, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return tokenizer.quantize.tokens_to_features(tokens, all_scales=True)


class CategoricalSampler:
    """VAR's sampling step: top-k / top-p filtered draws from the guided logits (`draws`: the official multinomial
    ones, or inverse-CDF ones), embedded by the tokenizer's codebook (or, with `more_smooth`, a Gumbel-softmax mixture
    of codebook vectors: visualisation only, not for FID). Draw for draw the official `autoregressive_infer_cfg`'s."""

    def __init__(self, codebook: nn.Embedding, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
                 generator: torch.Generator | None = None, draws: Draws = "multinomial") -> None:
        if draws not in DRAWS:
            raise UserError(f"unknown token draws {draws!r}: use one of {', '.join(DRAWS)}")
        self.codebook = codebook
        self.draw = sample_tokens if draws == "multinomial" else inverse_cdf_tokens
        self.top_k = top_k
        self.top_p = top_p
        self.more_smooth = more_smooth
        self.generator = generator

    def sample(self, both: torch.Tensor, guidance: ScaleGuidance, scale_index: int) -> ScaleDraw:
        """See `TokenSampler.sample`."""
        logits = guidance.combine(both, scale_index)  # (B, l, V)
        filtered = filter_logits(logits, self.top_k, self.top_p)  # (B, l, V)
        tokens = self.draw(filtered, self.generator)  # (B, l)
        if self.more_smooth:
            progress = guidance.progress(scale_index)
            features = smooth_embedding(filtered, progress, self.codebook.weight, self.generator)  # (B, l, Cvae)
        else:
            features = self.codebook(tokens)  # (B, l, Cvae)
        return ScaleDraw(tokens, features, logits)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """See `TokenSampler.embed`."""
        return self.codebook(tokens)  # (B, l, Cvae)
