"""Loading trained models: a run folder, a checkpoint folder, an exported folder or an official `.pt/.pth` becomes a
ready model in eval mode, with the tokenizer or decoder it samples through attached.

    model = load_var("shipped:var")                  # the shipped Fashion-MNIST VAR (SHIPPED_VAR), tokenizer inside
    images = model.generate([0, 7], seed=0)          # (2, 1, 32, 32) in [0, 1], at its recommended settings
    run = load_run("shipped:dit")                    # kind, config, model, tokenizer and sampling settings at once

Official files store no config: it is read off the weight shapes. Every bad file is a one-line `UserError`.
A loaded DiT or VAR carries `class_names`: its run's folder names, Fashion-MNIST's, or ImageNet-1k's; and
`sampling`: its recommended sampling settings (`scalegen.models.sampling_settings`), which `generate` uses for what it is
not given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scalegen.classes import class_names
from scalegen.errors import UserError
from scalegen.files import read_json, read_weights_file
from scalegen.fingerprint import module_fingerprint, weights_fingerprint
from scalegen.models.dit import DiT, DiTConfig
from scalegen.models.dit_diffusers import DIFFUSERS_CLASS, from_diffusers
from scalegen.models.settings import MODEL_SIZES
from scalegen.models.var import VAR, VARConfig
from scalegen.runs.folder import CONFIG_FILE, TOKENIZER_FILE, find_tokenizer_copy
from scalegen.runs.names import PIXEL_SPACE, WeightChoice, checkpoint_path
from scalegen.runs.weights import load_chosen_weights, load_weights, stored_config
from scalegen.models.sampling_settings import OFFICIAL_DIT_SAMPLING, OFFICIAL_VAR_SAMPLING, stored_sampling
from scalegen.tokenizers.codec import (
    DEFAULT_KIND, TOKENIZER_KINDS, TokenizerLatents, kind_of, registered_kind, tokenizer_codec,
)
from scalegen.tokenizers.sd_vae import LATENT_CHANNELS, LatentCodec, load_sd_vae
from scalegen.tokenizers.vqvae import PATCH_NUMS_256, PATCH_NUMS_512, VQVAE, VQVAEConfig

# The models that are not tokenizers (a tokenizer's kind, title and advice are registered with it: tokenizers/codec.py).
MODEL_NAMES = {"dit": "DiT", "var": "VAR", "classifier": "classifier"}
# What to do with a file of each kind when it is given to a loader of another kind (real commands and functions only).
KIND_ADVICE = {
    "dit": "sample it with `scalegen sample dit --ckpt {path}` (scalegen.load_dit in Python)",
    "var": "sample it with `scalegen sample var --ckpt {path}` (scalegen.load_var in Python)",
    "classifier": "it scores samples, it draws none: export it with `scalegen train classifier --export "
                  "FILE.safetensors` (scalegen.eval.fmnist.load_classifier loads that file in Python)",
}
# A diffusers DiTPipeline folder.
DIFFUSERS_TRANSFORMER, DIFFUSERS_SCHEDULER, DIFFUSERS_VAE = "transformer", "scheduler", "vae"
DIFFUSERS_WEIGHTS, DIFFUSERS_SCHEDULER_FILE, DIFFUSERS_INDEX = (
    "diffusion_pytorch_model.safetensors", "scheduler_config.json", "model_index.json")


def model_name(kind: str) -> str:
    """How messages name a stored kind of model (a registered tokenizer's title; an unknown kind as it is)."""
    if kind in TOKENIZER_KINDS:
        return TOKENIZER_KINDS[kind].title
    return MODEL_NAMES.get(kind, kind)


def kind_advice(kind: str) -> str | None:
    """What to do with a file of `kind` given to a loader of another kind (`{path}` to fill in); None when unknown."""
    if kind in TOKENIZER_KINDS:
        return TOKENIZER_KINDS[kind].advice
    return KIND_ADVICE.get(kind)


def check_kind(stored: dict | None, kind: str, path: str | Path) -> None:
    """A one-line error when a stored config describes another kind of model than the loader's."""
    if stored is not None and stored.get("kind") != kind:
        found = stored.get("kind")
        advice = kind_advice(found) or f"give a run, checkpoint or export of a {model_name(kind)}"
        raise UserError(f"{path} holds a {model_name(found)} model, not a {model_name(kind)}; "
                        + advice.format(path=path))


def stored_model_config(config_class: type, stored: dict, path: str | Path):
    """The model config dataclass of a stored config; a one-line error when its "model" entry does not fit."""
    try:
        return config_class(**stored["model"])
    except (KeyError, TypeError) as error:
        raise UserError(f"the config of {path} does not describe a {config_class.__name__} ({error}); "
                        "restore its config.json") from None


def load_strictly(model: nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
    """Load `weights` strictly into `model`, turning a mismatch into a one-line error; returns it in eval mode."""
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise UserError(f"{path} does not match the model it describes: {str(error).splitlines()[0]}") from None
    return model.eval()


# ----- tokenizer -----

def load_tokenizer(path: str | Path, official_patch_nums: tuple[int, ...] = PATCH_NUMS_256) -> nn.Module:
    """A tokenizer in eval mode, of any registered kind (tokenizers/codec.py) — a multi-scale VQVAE (`train vqvae` run,
    checkpoint, export or official vae .pth), a KL autoencoder (`train kl`) — or the tokenizer a DiT or VAR run or
    export was trained on (to train another model in the same latent space).

    Args:
        path: the run folder, checkpoint or file.
        official_patch_nums: scales to use with an official file, which stores none (the same weights serve the
            256px and the 512px VARs).
    """
    path = checkpoint_path(path)
    if not path.exists():
        raise UserError(f"tokenizer {path} not found; pass --tokenizer RUN (from `scalegen train vqvae` or "
                        "`train kl`) or a local vae_ch160v4096z32.pth")
    stored, weights = load_weights(path)
    if stored is not None and stored.get("kind") in ("dit", "var") and "tokenizer" in stored:
        return stored_tokenizer(path, stored).eval()
    if stored is None:
        return load_strictly(VQVAE(VQVAEConfig(patch_nums=official_patch_nums)), weights, path)
    if stored.get("kind") not in TOKENIZER_KINDS:
        check_kind(stored, DEFAULT_KIND, path)
    kind = TOKENIZER_KINDS[stored["kind"]]
    return load_strictly(kind.model_class(stored_model_config(kind.config_class, stored, path)), weights, path)


def token_tokenizer(tokenizer: nn.Module, path: str | Path) -> VQVAE:
    """`tokenizer` when its kind has tokens (a VQVAE); a one-line error for another, which only a DiT can use."""
    kind = kind_of(tokenizer)
    if kind is None or not kind.serves_var:
        title = kind.title if kind is not None else type(tokenizer).__name__
        with_tokens = ", ".join(name for name, other in TOKENIZER_KINDS.items() if other.serves_var)
        for_dit = ", only latents for a DiT (`scalegen train dit --tokenizer`)" if kind and kind.codec_class else ""
        raise UserError(f"the tokenizer {path} is a {title}, which has no tokens for a VAR{for_dit}; give a tokenizer "
                        f"of a kind with tokens ({with_tokens}; `scalegen train vqvae` trains one)")
    return tokenizer


def stored_tokenizer(ckpt: str | Path, stored: dict) -> nn.Module:
    """The tokenizer copied into a VAR (or tokenizer-latent DiT) run, found by `find_tokenizer_copy`, else its source."""
    copy = find_tokenizer_copy(ckpt)
    description = stored["tokenizer"]
    if copy is not None:
        kind = registered_kind(description.get("kind", DEFAULT_KIND))
        config = stored_model_config(kind.config_class, description, copy)
        return load_strictly(kind.model_class(config), read_weights_file(copy), copy)
    source = description.get("source")
    if source and Path(source).exists():
        return load_tokenizer(source)
    raise UserError(f"no {TOKENIZER_FILE} beside {ckpt} and the original tokenizer {source} is gone; "
                    "pass --tokenizer (tokenizer= in Python)")


# ----- DiT -----

def dit_config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> DiTConfig:
    """Infer the config of an official DiT checkpoint from its weight shapes (heads from the size table)."""
    try:
        tokens, hidden_size = state_dict["pos_embed"].shape[1:]
        patch_weight = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        depth = 1 + max(int(name.split(".")[1]) for name in state_dict if name.startswith("blocks."))
        num_heads = next(heads for (_, width, heads) in MODEL_SIZES.values() if width == hidden_size)
        out_features = state_dict["final_layer.linear.weight"].shape[0]
    except (KeyError, StopIteration, ValueError):
        raise UserError("the checkpoint is not a DiT state dict (pos_embed / x_embedder / blocks missing)") from None
    in_channels, patch_size = patch_weight.shape[1], patch_weight.shape[2]
    return DiTConfig(
        input_size=int(math.isqrt(tokens)) * patch_size, patch_size=patch_size, in_channels=in_channels,
        hidden_size=hidden_size, depth=depth, num_heads=num_heads,
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_features == patch_size * patch_size * in_channels * 2,
    )


def dit_decoder(ckpt: str | Path, stored: dict | None, config: DiTConfig,
                vae: str | None = None) -> LatentCodec | TokenizerLatents | None:
    """The decoder of a DiT's latents: its run's tokenizer, an SD VAE (`vae` overrides the stored path), or None
    (pixels; `vae="none"` forces it)."""
    stored = stored or {}
    if "tokenizer" in stored:
        return tokenizer_codec(stored_tokenizer(ckpt, stored), stored["tokenizer"])
    vae = vae or stored.get("vae")
    if config.in_channels == LATENT_CHANNELS and not vae:
        raise UserError("this DiT works in SD-VAE latent space; pass --vae PATH to a local sd-vae-ft-ema/mse folder "
                        f"(vae=PATH in Python; vae={PIXEL_SPACE!r} loads the bare network)")
    return load_sd_vae(vae) if vae and vae.lower() != PIXEL_SPACE else None


def load_dit(path: str | Path, vae: str | None = None, weights: WeightChoice | None = None) -> DiT:
    """A DiT in eval mode, its decoder and recommended sampling settings attached, from a run folder, checkpoint,
    export, official .pt or `shipped:` name (`load_run(path, "dit", ...).model`).

    Args:
        path: where the weights are.
        vae: a local SD-VAE folder or file for a model in SD-VAE latents (overrides the one stored with a run);
            "none" loads the bare network without a decoder.
        weights: "ema" or "raw" (a run's model.safetensors); None: the EMA weights when there are some.
    """
    return load_run(path, "dit", vae=vae, weights=weights).model


def stored_dit(path: Path, vae: str | None, weights: WeightChoice | None) -> tuple[dict | None, DiT]:
    """The stored config (None: an official file) and the ready DiT of `path`, as `load_dit` describes."""
    transformer = diffusers_transformer_folder(path)
    if transformer is not None:
        state_dict, fields = from_diffusers(read_weights_file(transformer / DIFFUSERS_WEIGHTS),
                                            read_json(transformer / CONFIG_FILE))
        config = DiTConfig(**fields)
        state_dict["pos_embed"] = DiT(config).state_dict()["pos_embed"]  # diffusers computes the fixed table itself
        stored = diffusers_stored_config(transformer)
    else:
        stored, state_dict = load_chosen_weights(path, weights)
        check_kind(stored, "dit", path)
        config = stored_dit_config(stored, path) if stored else dit_config_from_state_dict(state_dict)
    model = load_strictly(DiT(config), state_dict, path)
    model.attach_decoder(dit_decoder(path, stored, config, vae))
    model.class_names = class_names(config.num_classes, stored)
    model.sampling, model.sampling_origin = stored_sampling(stored, OFFICIAL_DIT_SAMPLING)
    return stored, model


def stored_objective(stored: dict) -> str:
    """The objective of a stored DiT config: its model's; one written before the objective was part of the model's
    config names it in its training "objective" entry; an official file is the paper's ddpm."""
    model = stored.get("model")
    if isinstance(model, dict) and "objective" in model:
        return model["objective"]
    return stored.get("objective", {}).get("name", DiTConfig.objective)


def stored_dit_config(stored: dict, path: str | Path) -> DiTConfig:
    """The DiTConfig of a stored config (of any age: see `stored_objective`)."""
    model = stored.get("model")
    if isinstance(model, dict):
        stored = {**stored, "model": {**model, "objective": stored_objective(stored)}}
    return stored_model_config(DiTConfig, stored, path)


def diffusers_transformer_folder(path: str | Path) -> Path | None:
    """The `DiTTransformer2DModel` folder of a diffusers pipeline folder (its transformer/) or the folder itself."""
    for folder in (Path(path) / DIFFUSERS_TRANSFORMER, Path(path)):
        config = folder / CONFIG_FILE
        if folder.is_dir() and (folder / DIFFUSERS_WEIGHTS).exists() and config.exists():
            return folder if read_json(config).get("_class_name") == DIFFUSERS_CLASS else None
    return None


def diffusers_stored_config(transformer: Path) -> dict:
    """What the pipeline folder around a `DiTTransformer2DModel` folder says, as a run's stored config would say it:
    "vae", its vae/ folder, and "classes", the first name of each label in model_index.json's `id2label` (a name two
    labels share carries its id, as ImageNet's do in `class_names`)."""
    pipeline, stored = transformer.parent, {}
    if (pipeline / DIFFUSERS_VAE).is_dir():
        stored["vae"] = str(pipeline / DIFFUSERS_VAE)
    index = pipeline / DIFFUSERS_INDEX
    labels = (read_json(index).get("id2label") or {}) if index.exists() else {}
    if labels and set(labels) == {str(label) for label in range(len(labels))}:
        names = [str(labels[str(label)]).split(",")[0].strip() for label in range(len(labels))]
        stored["classes"] = [f"{name} ({label})" if names.count(name) > 1 else name for label, name in enumerate(names)]
    return stored


# ----- VAR -----

def var_config_from_state_dict(weights: dict[str, torch.Tensor], tokenizer: VQVAE) -> VARConfig:
    """Config of an official VAR checkpoint from its weight shapes (heads = depth, as every official model)."""
    try:
        width = weights["class_emb.weight"].shape[1]
        num_classes = weights["class_emb.weight"].shape[0] - 1
        depth = 1 + max(int(name.split(".")[1]) for name in weights if name.startswith("blocks."))
    except (KeyError, ValueError):
        raise UserError("the checkpoint is not a VAR state dict (class_emb / blocks missing)") from None
    return VARConfig.for_depth(depth, width=width, num_classes=num_classes, patch_nums=tokenizer.patch_nums,
                               vocab_size=tokenizer.vocab_size, z_channels=tokenizer.z_channels,
                               shared_aln="shared_ada_lin.1.weight" in weights)


def official_patch_nums(weights: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The scales of an official VAR checkpoint, read off its number of positions (680: 256px, 2240: 512px)."""
    positions = weights["pos_1LC"].shape[1] if "pos_1LC" in weights else None
    for patch_nums in (PATCH_NUMS_256, PATCH_NUMS_512):
        if positions == sum(side * side for side in patch_nums):
            return patch_nums
    raise UserError(f"a VAR checkpoint with {positions} positions matches neither official scale set; "
                    "use a scalegen run folder, which stores its scales")


def load_var(path: str | Path, tokenizer: str | Path | nn.Module | None = None,
             weights: WeightChoice | None = None) -> VAR:
    """A VAR in eval mode, its tokenizer and recommended sampling settings attached, from a run folder, checkpoint,
    export, official var_d*.pth or `shipped:` name (`load_run(path, "var", ...).model`).

    Args:
        path: where the weights are.
        tokenizer: the tokenizer to use instead of the run's own copy (a path, or a VQVAE already loaded); needed
            for an official checkpoint, which holds the transformer alone.
        weights: "ema" or "raw" (a run's model.safetensors); None: the EMA weights when there are some.
    """
    return load_run(path, "var", tokenizer=tokenizer, weights=weights).model


def stored_var(path: Path, tokenizer: str | Path | nn.Module | None,
               weights: WeightChoice | None) -> tuple[dict | None, VAR]:
    """The stored config (None: an official file) and the ready VAR of `path`, as `load_var` describes."""
    stored, state_dict = load_chosen_weights(path, weights)
    check_kind(stored, "var", path)
    if isinstance(tokenizer, nn.Module):
        vqvae = tokenizer
    elif tokenizer:
        patch_nums = tuple(stored["model"]["patch_nums"]) if stored else official_patch_nums(state_dict)
        vqvae = load_tokenizer(tokenizer, patch_nums)
    elif stored is not None:
        vqvae = stored_tokenizer(path, stored)
    else:
        raise UserError(f"{path} is an official VAR checkpoint; pass --tokenizer with its vae_ch160v4096z32.pth "
                        "(tokenizer= in Python)")
    vqvae = token_tokenizer(vqvae, tokenizer or path)
    config = stored_model_config(VARConfig, stored, path) if stored else var_config_from_state_dict(state_dict, vqvae)
    model = load_strictly(VAR(config), state_dict, path)
    model.attach_tokenizer(vqvae)
    model.class_names = class_names(config.num_classes, stored)
    model.sampling, model.sampling_origin = stored_sampling(stored, OFFICIAL_VAR_SAMPLING)
    return stored, model


def load_refiner(path: str | Path, drafter: VAR, any_tokenizer: bool = False,
                 weights: WeightChoice | None = None) -> VAR:
    """A VAR that generates `drafter`'s finest scales (CoDe), on the drafter's tokenizer and device.

    Args:
        path: the refiner's run folder, checkpoint, export or `shipped:` name.
        drafter: the loaded VAR it refines.
        any_tokenizer: use it even when its run's own tokenizer has other weights than the drafter's (its tokens
            then mean other images: a test or an experiment, not a sample).
        weights: as `load_var`'s.
    Raises:
        UserError: the refiner was trained on another tokenizer (compared by `weights_fingerprint`), unless
            `any_tokenizer`.
    """
    path = checkpoint_path(path)
    own = None if any_tokenizer else own_tokenizer_weights(path)
    if own is not None and weights_fingerprint(own) != module_fingerprint(drafter.tokenizer):
        raise UserError(f"the refiner {path} was trained on another tokenizer than the VAR's (other weights), so its "
                        "tokens would mean other images; give a refiner trained on the VAR's tokenizer, or pass "
                        "--refiner-any-tokenizer (any_tokenizer=True in Python) to use it anyway")
    return load_var(path, drafter.tokenizer, weights).to(drafter.pos_1LC.device)


def own_tokenizer_weights(path: Path) -> dict[str, torch.Tensor] | None:
    """The weights of the tokenizer a VAR run, checkpoint or export was trained on (its copy, else its source); None
    for a file without a config (an official checkpoint holds no tokenizer) or a model of another kind."""
    stored = source_config(path)
    if stored.get("kind") != "var":
        return None
    copy = find_tokenizer_copy(path)
    return read_weights_file(copy) if copy is not None else stored_tokenizer(path, stored).state_dict()


# ----- any run -----

def source_config(path: str | Path) -> dict:
    """The stored config of a run, checkpoint, export or weights file (a diffusers folder's as `diffusers_stored_config`
    says it); {} for an official file, which stores none."""
    transformer = diffusers_transformer_folder(path)
    if transformer is not None:
        return diffusers_stored_config(transformer)
    return (stored_config(path) if Path(path).is_dir() else load_weights(path)[0]) or {}


@dataclass
class LoadedRun:
    """What a run, checkpoint, export, official file or `shipped:` name holds, ready to sample.

    Fields:
        kind: "dit" or "var".
        config: the stored JSON config; None for an official file (its config is read off the weight shapes).
        model: the model in eval mode, with its tokenizer or decoder, class names and sampling settings attached.
        tokenizer: what the model samples through: a VAR's tokenizer, a DiT's decoder (None: pixels).
        sampling: the model's recommended sampling settings (`scalegen.models.sampling_settings`), by name.
        sampling_origin: where they come from (its config, the paper's for an official file, or the defaults).
    """

    kind: str
    config: dict | None
    model: DiT | VAR
    tokenizer: nn.Module | None
    sampling: dict
    sampling_origin: str


def load_run(path: str | Path, kind: str | None = None, *, vae: str | None = None,
             tokenizer: str | Path | nn.Module | None = None, weights: WeightChoice | None = None) -> LoadedRun:
    """Everything needed to sample from a DiT or VAR: its config, weights, tokenizer and sampling settings, in one
    call (`load_dit` and `load_var` are this call's model).

    Args:
        path: a run folder, checkpoint, export, diffusers folder, official file or `shipped:` name.
        kind: "dit" or "var"; None: the kind its stored config names (an official file stores none: give it).
        vae: a DiT's decoder, as `load_dit`'s.
        tokenizer: a VAR's tokenizer, as `load_var`'s.
        weights: "ema" or "raw"; None: the EMA weights when there are some.
    Raises:
        UserError: `path` holds another kind of model, or nothing that says its kind.
    """
    path = checkpoint_path(path)
    if kind is None:
        kind = "dit" if diffusers_transformer_folder(path) is not None else source_config(path).get("kind")
    if kind == "dit":
        stored, model = stored_dit(path, vae, weights)
        attached = model.decoder
    elif kind == "var":
        stored, model = stored_var(path, tokenizer, weights)
        attached = model.tokenizer
    elif kind is None:
        raise UserError(f"{path} stores no config that names its kind of model (an official checkpoint); give the "
                        "kind: load_run(path, 'dit') or load_run(path, 'var')")
    else:
        raise UserError(f"{path} holds a {model_name(kind)} model, which has no sampling to load; "
                        + (kind_advice(kind) or "give a run, checkpoint or export of a DiT or VAR").format(path=path))
    return LoadedRun(kind, stored, model, attached, model.sampling, model.sampling_origin)
