"""Tokenizers of our own and their latent spaces, registered once by kind.

A tokenizer kind (`TokenizerKind`) is registered once, with `register_tokenizer`: the kind its checkpoints store, its
config and model classes, the codec that makes it a DiT's latent space (or none), whether it has tokens for a VAR,
and how a reconstruction goes through it. Loading (`scalegen.runs.loading`), training a DiT or VAR on it, caching its
latents and `scalegen reconstruct` ask the registry (`registered_kind`, `kind_of`) instead of naming classes.

A codec (`TokenizerLatents`) is the protocol a DiT trains and samples through: encode (images -> latents, or the
posterior's mean and std that the latent cache stores), decode, the normalisation that gives the diffusion
unit-variance latents, measured over the data (`measure`) and stored in the run's "tokenizer" description
(`from_description`). The built-in kinds:

- "vqvae", a multi-scale VQ tokenizer (`train vqvae`): tokens for a VAR; a DiT generates its quantized features f̂
  (B, z_channels, h, w) — the same multi-scale sum of codebook vectors that VAR builds token by token — divided by
  their spread over the data (as SD latents are multiplied by 0.18215).
- "klvae", a KL tokenizer (`train kl`): a DiT generates its latents normalised per channel, (latents − mean) / std
  over the data (or by REPA-E's batch-norm statistics when the tokenizer was tuned end to end).
- "klscales", a KL tokenizer's normalised latents on VAR's scale plan (`continuous_scales`): continuous tokens for a
  VAR with the flow head, made by `train var --token-head flow` from a KL tokenizer and kept in its run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from scalegen.data.source import unflipped_loader
from scalegen.errors import UserError
from scalegen.registry import Registry
from scalegen.tokenizers.continuous_scales import ContinuousScales, ContinuousScalesConfig, scales_round_trip
from scalegen.tokenizers.kl_vae import KLVAE, KLVAEConfig, LatentNormalization
from scalegen.tokenizers.vqvae import VQVAE, VQVAEConfig

SCALE_IMAGES = 2048  # images whose features set the latent scale
SCALE_BATCH_SIZE = 256


class TokenizerLatents(nn.Module):
    """The codec protocol: pixels <-> normalised latents of a frozen tokenizer of ours (an end-to-end run unfreezes
    its tokenizer). A kind's codec implements the abstract members; `encode` draws a sample of the posterior."""

    guide_all_channels = True  # every latent channel is ours: guidance applies to all of them

    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer.eval().requires_grad_(False)

    @property
    def latent_network(self) -> nn.Module:
        """The network whose weights decide the latents (a latent cache records their digest): the tokenizer; the
        normalisation is measured from the tokenizer and the data, so it follows from them (up to the rounding of the
        machine that measured it)."""
        return self.tokenizer

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    @property
    def latent_size(self) -> int:
        raise NotImplementedError

    @classmethod
    def from_description(cls, tokenizer: nn.Module, description: dict) -> TokenizerLatents:
        """The codec of `tokenizer` normalised as a DiT's stored "tokenizer" description says."""
        raise NotImplementedError

    @classmethod
    def measure(cls, tokenizer: nn.Module, dataset: Dataset, device: torch.device | str, count: int) -> dict:
        """The normalisation of the tokenizer's latents over the first `count` images of `dataset`, as the entries of
        the description `from_description` reads."""
        raise NotImplementedError

    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> normalised posterior mean and std, each (B, c, h, w)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, c, h, w) -> images (B, C, H, W) in [-1, 1]."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> one normalised latent sample (B, c, h, w)."""
        mean, std = self.encode_distribution(images)  # (B, c, h, w) each
        return mean + std * torch.randn_like(mean)


class TokenizerCodec(TokenizerLatents):
    """Pixels <-> scaled quantized features of a frozen VQ tokenizer; only ever used under no_grad."""

    def __init__(self, tokenizer: VQVAE, latent_scale: float):
        super().__init__(tokenizer)
        self.latent_scale = latent_scale

    @property
    def latent_channels(self) -> int:
        return self.tokenizer.z_channels

    @property
    def latent_size(self) -> int:
        return self.tokenizer.patch_nums[-1]

    @classmethod
    def from_description(cls, tokenizer: VQVAE, description: dict) -> TokenizerCodec:
        """The codec scaled by the description's "latent_scale"."""
        return cls(tokenizer, description["latent_scale"])

    @classmethod
    def measure(cls, tokenizer: VQVAE, dataset: Dataset, device: torch.device | str, count: int) -> dict:
        """{"latent_scale"}: 1 / the spread of f̂ over the data."""
        return {"latent_scale": measure_latent_scale(tokenizer, dataset, device, count)}

    @torch.no_grad()
    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> scaled f̂ and a zero std (the quantizer is deterministic), each (B, z, h, w)."""
        features = self.tokenizer.img_to_features(images)  # (B, z, h, w)
        f_hat = self.tokenizer.quantize(features).f_hat * self.latent_scale  # (B, z, h, w)
        return f_hat, torch.zeros_like(f_hat)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled f̂ (B, z, h, w) (no sample to draw)."""
        return self.encode_distribution(images)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled f̂ (B, z, h, w) -> images (B, C, H, W) in [-1, 1]."""
        return self.tokenizer.features_to_img(latents / self.latent_scale)


class KLCodec(TokenizerLatents):
    """Pixels <-> normalised latents of a KL tokenizer. Frozen (an end-to-end run unfreezes its tokenizer)."""

    def __init__(self, tokenizer: KLVAE, normalization: LatentNormalization):
        super().__init__(tokenizer)
        self.normalization = normalization

    @property
    def latent_channels(self) -> int:
        return self.tokenizer.config.latent_channels

    @property
    def latent_size(self) -> int:
        return self.tokenizer.config.latent_size

    @classmethod
    def from_description(cls, tokenizer: KLVAE, description: dict) -> KLCodec:
        """The codec normalised by the description's per-channel "latent_shift" and "latent_scale"."""
        return cls(tokenizer, LatentNormalization.from_description(description))

    @classmethod
    def measure(cls, tokenizer: KLVAE, dataset: Dataset, device: torch.device | str, count: int) -> dict:
        """Per-channel {"latent_shift", "latent_scale"}: the mean and 1 / std of the latent samples over the data."""
        latents = encoded(cls(tokenizer.to(device), LatentNormalization([0.0], [1.0])), dataset, device, count)
        channels = latents.transpose(0, 1).flatten(1)  # (c, N·h·w)
        return LatentNormalization(channels.mean(dim=1), 1.0 / channels.std(dim=1)).description()

    @torch.no_grad()
    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> normalised posterior mean and std, each (B, c, h, w)."""
        mean, logvar = self.tokenizer.encode_moments(images)  # (B, c, h, w) each
        return self.normalization(mean), torch.exp(0.5 * logvar) * self.normalization.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, c, h, w) -> images (B, C, H, W) in [-1, 1] (not clamped)."""
        return self.tokenizer.decode(self.normalization.inverse(latents))


@dataclass(frozen=True)
class TokenizerKind:
    """A kind of tokenizer of ours, registered once; everything else asks it.

    Fields:
        name: the "kind" its checkpoints store (and a DiT's or VAR's "tokenizer" description).
        title: how messages name it ("KL tokenizer").
        config_class: the dataclass its checkpoints store under "model" (with `in_channels`).
        model_class: the nn.Module built from a config, with `config` and `image_size`.
        round_trip: images (B, C, H, W) in [-1, 1] through its latent space and back, as `scalegen reconstruct`
            measures it.
        advice: what to do with a file of this kind given to a loader of another kind (`{path}` is filled in).
        codec_class: its latent space for a DiT (a DiT's latent cache stores its posterior mean and std); None: it
            serves no DiT.
        serves_var: it has tokens for a VAR (a VAR's token cache stores them): the model has VQVAE's token interface
            (`img_to_tokens`, `tokens_to_img`, `tokens_to_var_input`, `patch_nums`, `vocab_size`, `z_channels`).
        continuous: its VAR tokens are continuous vectors (a flow head's), not codebook ids (VAR's head's).
        end_to_end: its latents have gradients to its weights, so REPA-E can tune it with the DiT (`KLCodec` only).
    """

    name: str
    title: str
    config_class: type
    model_class: type[nn.Module]
    round_trip: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    advice: str
    codec_class: type[TokenizerLatents] | None = None
    serves_var: bool = False
    continuous: bool = False
    end_to_end: bool = False


TOKENIZER_KINDS: Registry[TokenizerKind] = Registry("tokenizer kind",
                                                   "load it with the scalegen version that trained it")
DEFAULT_KIND = "vqvae"  # an official tokenizer file's kind, and a stored description's that names none (older runs)


def register_tokenizer(kind: TokenizerKind) -> TokenizerKind:
    """Make a tokenizer kind known to every loader and trainer; returns it. A name is registered once (registering
    the same kind again changes nothing)."""
    return TOKENIZER_KINDS.register(kind.name, kind)


def registered_kind(name: str) -> TokenizerKind:
    """The kind registered as `name`; a one-line error for another."""
    return TOKENIZER_KINDS.chosen(name)


def kind_of(tokenizer: nn.Module) -> TokenizerKind | None:
    """The registered kind of a tokenizer module (by its class or nearest registered base), None for another module
    (an SD VAE)."""
    kinds = {kind.model_class: kind for kind in TOKENIZER_KINDS.values()}
    return next((kinds[cls] for cls in type(tokenizer).__mro__ if cls in kinds), None)


def latent_codec_class(tokenizer: nn.Module, named: str = "the tokenizer") -> type[TokenizerLatents]:
    """The codec class of the tokenizer's kind; a one-line error (naming it as `named`) for a module of no registered
    kind or a kind without a latent space for a DiT."""
    kind = kind_of(tokenizer)
    if kind is None:
        raise UserError(f"{named} is a {type(tokenizer).__name__}, of no registered tokenizer kind; register its kind "
                        "with scalegen.tokenizers.codec.register_tokenizer")
    if kind.codec_class is None:
        with_latents = ", ".join(name for name, other in TOKENIZER_KINDS.items() if other.codec_class is not None)
        raise UserError(f"{named} is a {kind.title}, which has no latent space for a DiT; give a tokenizer of a kind "
                        f"with one ({with_latents})")
    return kind.codec_class


def tokenizer_codec(tokenizer: nn.Module, description: dict) -> TokenizerLatents:
    """The codec of a DiT's tokenizer from its stored description (its kind's normalisation entries)."""
    return latent_codec_class(tokenizer).from_description(tokenizer, description)


@torch.no_grad()
def measure_normalization(tokenizer: nn.Module, dataset: Dataset, device: torch.device | str = "cpu",
                          count: int = SCALE_IMAGES) -> dict:
    """How a DiT should scale the tokenizer's latents, measured over the first `count` images of `dataset`: the
    description `tokenizer_codec` reads ({"latent_scale"} for a VQ tokenizer; per-channel {"latent_shift",
    "latent_scale"} of the latent samples for a KL one)."""
    return latent_codec_class(tokenizer).measure(tokenizer, dataset, device, count)


@torch.no_grad()
def measure_latent_scale(tokenizer: VQVAE, dataset: Dataset, device: torch.device | str = "cpu",
                         count: int = SCALE_IMAGES) -> float:
    """1 / standard deviation of the tokenizer's f̂ over the first `count` images of `dataset`."""
    return 1.0 / encoded(TokenizerCodec(tokenizer.to(device), 1.0), dataset, device, count).std().item()


def encoded(codec: TokenizerLatents, dataset: Dataset, device: torch.device | str, count: int) -> torch.Tensor:
    """The codec's latents of the first `count` images of `dataset`, unflipped: (N, c, h, w)."""
    loader = unflipped_loader(dataset, SCALE_BATCH_SIZE, count)
    return torch.cat([codec.encode(batch.image.to(device)) for batch in loader if len(batch)])  # (N, c, h, w)


def token_round_trip(tokenizer: VQVAE, images: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] -> their tokens -> images (B, C, H, W) in [-1, 1]."""
    return tokenizer.tokens_to_img(tokenizer.img_to_tokens(images))


def posterior_mean_round_trip(tokenizer: KLVAE, images: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] -> the posterior mean -> images (B, C, H, W) clamped to [-1, 1]."""
    return tokenizer.decode(tokenizer.encode_moments(images)[0]).clamp(-1, 1)


register_tokenizer(TokenizerKind(
    name=DEFAULT_KIND, title="tokenizer", config_class=VQVAEConfig, model_class=VQVAE, round_trip=token_round_trip,
    advice="train a VAR on it with `scalegen train var --tokenizer {path}` (or a DiT in its latent space with "
           "`scalegen train dit --tokenizer {path}`; scalegen.load_tokenizer loads it in Python)",
    codec_class=TokenizerCodec, serves_var=True))
register_tokenizer(TokenizerKind(
    name="klvae", title="KL tokenizer", config_class=KLVAEConfig, model_class=KLVAE,
    round_trip=posterior_mean_round_trip,
    advice="train a DiT in its latent space with `scalegen train dit --tokenizer {path}` "
           "(scalegen.load_tokenizer loads it in Python)",
    codec_class=KLCodec, end_to_end=True))
register_tokenizer(TokenizerKind(
    name="klscales", title="continuous multi-scale KL tokenizer", config_class=ContinuousScalesConfig,
    model_class=ContinuousScales, round_trip=scales_round_trip,
    advice="train a VAR with the flow head on it with `scalegen train var --token-head flow --tokenizer {path}`",
    serves_var=True, continuous=True))
