"""Latent spaces: VAR's multi-scale VQVAE tokenizer, the Stable-Diffusion VAE, and our tokenizer as a DiT latent space."""
