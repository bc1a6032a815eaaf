"""scalegen: class-conditional image generation with scalable transformers (DiT and VAR).

    import scalegen
    var = scalegen.load_var("runs/fmnist-var")            # a run, checkpoint, export or official .pth
    images = var.generate([0, 7], cfg=1.5, seed=0)         # (2, C, H, W) floats in [0, 1]
    scalegen.to_pil(images)[0].save("sample.png")

Every sampling call (`DiT.generate`, `VAR.generate`, `VAR.edit`) returns images (B, C, H, W) in [0, 1].
"""
from scalegen.diffusion.respace import create_diffusion
from scalegen.errors import UserError
from scalegen.images import image_grid, to_pil
from scalegen.models.dit import DiT, DiTConfig, build_dit
from scalegen.models.var import VAR, VARConfig, build_var
from scalegen.pretrained import SHIPPED_DIT, SHIPPED_VAR, load_dit, load_tokenizer, load_var
from scalegen.tokenizers.vqvae import VQVAE, VQVAEConfig, build_vqvae

__all__ = [
    "DiT", "DiTConfig", "build_dit", "create_diffusion", "VQVAE", "VQVAEConfig", "build_vqvae", "VAR", "VARConfig",
    "build_var", "load_dit", "load_var", "load_tokenizer", "to_pil", "image_grid", "UserError", "SHIPPED_DIT",
    "SHIPPED_VAR",
]
