"""scalegen: class-conditional image generation with scalable transformers (DiT and VAR)."""
from scalegen.dit import DiT, DiTConfig, build_dit
from scalegen.respace import create_diffusion
from scalegen.var import VAR, VARConfig, build_var
from scalegen.vqvae import VQVAE, VQVAEConfig, build_vqvae

__all__ = ["DiT", "DiTConfig", "build_dit", "create_diffusion", "VQVAE", "VQVAEConfig", "build_vqvae", "VAR", "VARConfig", "build_var"]
