"""A DiT as a folder diffusers' `DiTPipeline` runs: transformer/, scheduler/, vae/, model_index.json, README.md.

    export_diffusers("runs/dit", "exports/dit-diffusers")
    pipe = diffusers.DiTPipeline.from_pretrained("exports/dit-diffusers")
    images = pipe(pipe.get_label_ids(["Sneaker"]), guidance_scale=2.0, num_inference_steps=50).images

Only what the pipeline can run exports: a DDPM-trained (ε-prediction) adaLN-Zero DiT in the latent space of an SD-VAE
or of a KL tokenizer of ours (both diffusers AutoencoderKLs; ours with its latent normalisation folded in). Pixel-space
DiTs, DiTs on scalegen's VQ tokenizers, flow-trained DiTs and VARs are refused with a one-line `UserError` that points
to scalegen's own export format. A `train kl` tokenizer alone exports as a diffusers AutoencoderKL folder
(`export_autoencoder`), which `--vae` takes.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from torch import nn

from scalegen.diffusion.objectives import sampling_objective
from scalegen.errors import UserError
from scalegen.files import first_line, replace_atomically, save_weights_atomic, write_json_atomic
from scalegen.models.dit import DiT
from scalegen.models.dit_diffusers import DIFFUSERS_CLASS, PIPELINE_NULL_CLASS, diffusers_config, to_diffusers
from scalegen.models.settings import OFFICIAL_BLOCK
from scalegen.runs.folder import CONFIG_FILE
from scalegen.runs.loading import (
    DIFFUSERS_INDEX, DIFFUSERS_SCHEDULER, DIFFUSERS_SCHEDULER_FILE, DIFFUSERS_TRANSFORMER, DIFFUSERS_VAE,
    DIFFUSERS_WEIGHTS, dit_decoder, load_dit, load_tokenizer, model_name, source_config, stored_objective,
)
from scalegen.runs.names import PIXEL_SPACE, checkpoint_path
from scalegen.models.sampling_settings import SAMPLING_KEY
from scalegen.tokenizers.kl_vae import to_autoencoder_kl
from scalegen.tokenizers.sd_vae import LATENT_CHANNELS, LATENT_SCALE, load_sd_vae

PIPELINE_CLASS, VAE_CLASS = "DiTPipeline", "AutoencoderKL"
README_FILE = "README.md"


class DiffusersExport(NamedTuple):
    """What `export_diffusers` wrote: the folder, and what it holds in words (a pipeline or an autoencoder)."""

    folder: Path
    summary: str


def native_export(path: str | Path) -> str:
    """The advice for what diffusers cannot run: scalegen's own export format, which every scalegen command loads."""
    return f"export it in scalegen's format instead: scalegen export --run {path} --out FOLDER"


def check_exportable(path: str | Path, stored: dict) -> None:
    """A one-line error, from its stored config, for a model that DiTPipeline cannot run: a VAR or tokenizer, a
    flow-trained DiT, a DiT on a VQ tokenizer or one with LightningDiT's block options."""
    if stored.get("kind", "dit") != "dit":
        raise UserError(f"{path} holds a {model_name(stored['kind'])} model; diffusers' "
                        f"DiTPipeline runs DiTs only; {native_export(path)}")
    objective = stored_objective(stored)
    try:
        sampling_objective(objective).diffusers_scheduler(learn_sigma=True)
    except UserError as error:
        raise UserError(f"{path} is trained with the {objective} objective: {error}; {native_export(path)}") from None
    if "tokenizer" in stored and stored["tokenizer"].get("kind", "vqvae") != "klvae":
        raise UserError(f"{path} diffuses the latents of a scalegen VQ tokenizer, which is no diffusers AutoencoderKL; "
                        f"only SD-VAE (--vae) and KL-tokenizer DiTs export to diffusers; {native_export(path)}")
    model = stored.get("model", {})
    options = [f"{name}={model[name]}" for name, official in asdict(OFFICIAL_BLOCK).items()
               if model.get(name, official) != official]
    if options:
        raise UserError(f"{path} uses LightningDiT block options ({', '.join(options)}) that diffusers' "
                        f"DiTTransformer2DModel lacks; {native_export(path)}")


def pipeline_vae(path: str | Path, vae: str | None, model: DiT) -> nn.Module:
    """The DiT's SD-VAE (diffusers' AutoencoderKL), its scaling factor set to the latent scale the DiT was trained
    with; a one-line error for a pixel-space DiT or a VAE that is missing or does not fit."""
    pixel_space = f"{path} is a pixel-space DiT; diffusers' DiTPipeline decodes latents through an SD-VAE, so only " \
                  f"DiTs trained with --vae export to diffusers; {native_export(path)}"
    if not vae or vae.lower() == PIXEL_SPACE:
        if model.config.in_channels != LATENT_CHANNELS:
            raise UserError(pixel_space)
        raise UserError(f"{path} names no SD-VAE; pass --vae PATH to the local sd-vae-ft-ema/mse it was trained on "
                        "(vae= in Python), which the export ships as vae/")
    try:
        autoencoder = load_sd_vae(vae).autoencoder
    except (OSError, ValueError) as error:  # a path that holds no AutoencoderKL
        raise UserError(f"{vae} holds no diffusers AutoencoderKL ({first_line(error)}); pass --vae PATH to the local "
                        "sd-vae-ft-ema/mse folder or file the DiT was trained on") from None
    if autoencoder.config.latent_channels != model.config.in_channels:
        raise UserError(pixel_space if model.config.in_channels != LATENT_CHANNELS else
                        f"the VAE {vae} has {autoencoder.config.latent_channels} latent channels, the DiT "
                        f"{model.config.in_channels}; pass the --vae it was trained on")
    autoencoder.register_to_config(scaling_factor=LATENT_SCALE)  # DiTPipeline divides the latents by this
    return autoencoder


def guides(model: DiT) -> bool:
    """Whether DiTPipeline's guidance, whose null label is always 1000, meets this DiT's null class there."""
    return model.config.class_dropout_prob > 0 and model.config.num_classes <= PIPELINE_NULL_CLASS


def guidance_note(model: DiT) -> str:
    """What the README says about classifier-free guidance in DiTPipeline."""
    num_classes = model.config.num_classes
    if guides(model):
        return (f"Guidance works (`guidance_scale` > 1): label {PIPELINE_NULL_CLASS}, DiTPipeline's unconditional "
                "class, holds this DiT's null class. DiTPipeline guides every latent channel, the official DiT the "
                "first three only, so guided samples differ slightly from `scalegen sample dit`'s.")
    if model.config.class_dropout_prob <= 0:
        return ("This DiT was trained without label dropout, so it has no unconditional class: pass "
                "`guidance_scale=1` (DiTPipeline's default, 4.0, would guide towards a blank class).")
    return (f"DiTPipeline takes label {PIPELINE_NULL_CLASS} as the unconditional class, but it is a real class of "
            f"this {num_classes}-class DiT: pass `guidance_scale=1` (no guidance).")


def scheduler(model: DiT) -> dict:
    """The diffusers scheduler config of the model's objective (`Objective.diffusers_scheduler`)."""
    return model.objective.diffusers_scheduler(model.config.learn_sigma)


def pipeline_arguments(model: DiT) -> str:
    """DiTPipeline's arguments for the model's recommended sampling settings (`model.sampling`; guidance 1 for a
    DiT whose null class the pipeline cannot reach; without settings, the objective's defaults)."""
    settings = model.sampling_settings()
    cfg = settings.cfg if guides(model) else 1.0
    return f"guidance_scale={float(cfg)}, num_inference_steps={int(settings.steps)}"


def readme(model: DiT, name: str) -> str:
    """The model card of an export: how to run it, its classes and what differs from scalegen's sampling."""
    names = model.class_names
    shown = ", ".join(f"{label}: {label_name}" for label, label_name in enumerate(names[:20]))
    more = f", … ({len(names)} in all)" if len(names) > 20 else ""
    notes = [guidance_note(model),
             f"The scheduler is DiT's 1000-step linear DDPM schedule ({scheduler(model)['_class_name']}); a diffusers "
             "scheduler built "
             "with `from_config(pipe.scheduler.config)` works too."]
    if model.config.learn_sigma:
        notes.append("DiTPipeline drops the learned-variance channels: it samples with the fixed posterior variance.")
    notes.append("diffusers embeds timesteps with slightly other frequencies than the official DiT, so its samples "
                 f"differ slightly from `scalegen sample dit --ckpt {name}`'s (scalegen loads this folder exactly).")
    bullets = "\n".join(f"- {note}" for note in notes)
    return f"""# {name}: a scalegen DiT for diffusers' DiTPipeline

```python
from diffusers import DiTPipeline
pipe = DiTPipeline.from_pretrained("{name}")
images = pipe(pipe.get_label_ids({[names[0]]!r}), {pipeline_arguments(model)}).images
```

These are the model's recommended settings (`{SAMPLING_KEY}` in its scalegen config), not DiTPipeline's defaults
(guidance 4.0, 250 steps).

Classes (`pipe.labels`, also model_index.json's `id2label`): {shown}{more}.

{bullets}
"""


def export_diffusers(path: str | Path, destination: str | Path, vae: str | None = None) -> DiffusersExport:
    """Write a latent DiT as a folder diffusers' `DiTPipeline.from_pretrained` runs.

    transformer/ holds the `DiTTransformer2DModel` (class table padded so guidance's null label 1000 works for any
    class count up to 1000), scheduler/ the objective's scheduler (`Objective.diffusers_scheduler`: DDPM's), vae/ the SD-VAE, model_index.json the
    class names as `id2label` (for `pipe.get_label_ids`), README.md what works. The weights convert exactly both ways:
    `load_dit(destination)` gives back the same DiT.

    Args:
        path: a DiT run, checkpoint, export, official .pt or diffusers folder.
        destination: the folder to write.
        vae: the local SD-VAE (folder or file) to ship, instead of the one the run names.
    Returns:
        The folder written and what it holds: a DiTPipeline, or a `train kl` tokenizer's AutoencoderKL
        (`export_autoencoder`).
    Raises:
        UserError: for what DiTPipeline cannot run (see the module's docstring), or a missing VAE.
    """
    path = checkpoint_path(path)
    stored = source_config(path)
    if stored.get("kind") == "klvae":
        return DiffusersExport(export_autoencoder(path, destination),
                               f"a KL tokenizer as diffusers' {VAE_CLASS}, which --vae takes")
    check_exportable(path, stored)
    model = load_dit(path, vae=PIXEL_SPACE)
    transformer_config = diffusers_config(model.config)  # refuses blocks diffusers lacks
    if "tokenizer" in stored:  # a KL tokenizer of ours, its normalisation folded in (scaling_factor 1)
        codec = dit_decoder(path, stored, model.config)
        autoencoder = to_autoencoder_kl(codec.tokenizer, codec.normalization)
    else:
        autoencoder = pipeline_vae(path, vae or stored.get("vae"), model)
    destination = Path(destination)  # nothing is written before every check has passed
    destination.mkdir(parents=True, exist_ok=True)
    autoencoder.save_pretrained(destination / DIFFUSERS_VAE)
    (destination / DIFFUSERS_TRANSFORMER).mkdir(exist_ok=True)
    save_weights_atomic(to_diffusers(model.state_dict(), model.config),
                        destination / DIFFUSERS_TRANSFORMER / DIFFUSERS_WEIGHTS)
    write_json_atomic(destination / DIFFUSERS_TRANSFORMER / CONFIG_FILE, transformer_config)
    (destination / DIFFUSERS_SCHEDULER).mkdir(exist_ok=True)
    write_json_atomic(destination / DIFFUSERS_SCHEDULER / DIFFUSERS_SCHEDULER_FILE, scheduler(model))
    write_json_atomic(destination / DIFFUSERS_INDEX, {
        "_class_name": PIPELINE_CLASS, "transformer": ["diffusers", DIFFUSERS_CLASS],
        "scheduler": ["diffusers", scheduler(model)["_class_name"]], "vae": ["diffusers", VAE_CLASS],
        "id2label": {str(label): name for label, name in enumerate(model.class_names)},
    })
    replace_atomically(destination / README_FILE,
                       lambda temporary: temporary.write_text(readme(model, destination.name), encoding="utf-8"))
    return DiffusersExport(destination, f"a diffusers {PIPELINE_CLASS}; its {README_FILE} says how to run it")


def export_autoencoder(path: str | Path, destination: str | Path) -> Path:
    """A `train kl` tokenizer as a diffusers AutoencoderKL folder (config.json, diffusion_pytorch_model.safetensors;
    scaling_factor 1: its latents as they are) that `AutoencoderKL.from_pretrained` and scalegen's `--vae` load."""
    tokenizer = load_tokenizer(path)
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    to_autoencoder_kl(tokenizer).save_pretrained(destination)
    return destination
