"""scalegen: class-conditional image generation with scalable transformers (DiT and VAR).

    import scalegen
    var = scalegen.load_var("runs/fmnist-var")            # a run, checkpoint, export, official .pth or "shipped:var"
    images = var.generate([0, 7], seed=0)                  # (2, C, H, W) floats in [0, 1], at its recommended settings
    scalegen.to_pil(images)[0].save("sample.png")

Every sampling call (`DiT.generate`, `VAR.generate`, `VAR.edit`) returns images (B, C, H, W) in [0, 1].
"""
from importlib import import_module

# Where each public name lives. They are imported on first use (PEP 562), so `import scalegen` — and `scalegen --help`,
# whose package this is — costs no torch import until a name is asked for.
HOMES = {
    "DiT": "scalegen.models.dit", "DiTConfig": "scalegen.models.dit", "build_dit": "scalegen.models.dit",
    "create_diffusion": "scalegen.diffusion.respace",
    "VQVAE": "scalegen.tokenizers.vqvae", "VQVAEConfig": "scalegen.tokenizers.vqvae",
    "build_vqvae": "scalegen.tokenizers.vqvae",
    "VAR": "scalegen.models.var", "VARConfig": "scalegen.models.var", "build_var": "scalegen.models.var",
    "load_dit": "scalegen.runs.loading", "load_var": "scalegen.runs.loading",
    "load_tokenizer": "scalegen.runs.loading", "load_refiner": "scalegen.runs.loading",
    "SHIPPED_DIT": "scalegen.runs.names", "SHIPPED_MEANFLOW_DIT": "scalegen.runs.names",
    "SHIPPED_VAR": "scalegen.runs.names", "SHIPPED_VAR_REFINER": "scalegen.runs.names",
    "to_pil": "scalegen.images", "image_grid": "scalegen.images", "UserError": "scalegen.errors",
}
__all__ = list(HOMES)


def __getattr__(name: str):
    """A public name, imported from its home on first use."""
    if name not in HOMES:
        raise AttributeError(f"module 'scalegen' has no attribute {name!r}")
    return getattr(import_module(HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *HOMES])
