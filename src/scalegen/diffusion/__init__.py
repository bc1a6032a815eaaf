"""Gaussian diffusion (DDPM/DDIM, learned variance) and timestep respacing, as in the official DiT code."""
