"""Latent spaces: VAR's multi-scale VQVAE tokenizer, the Stable-Diffusion VAE, and our tokenizers as DiT latent spaces
(each tokenizer kind of ours registered once, in codec.py)."""
