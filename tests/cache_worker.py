"""Launched by tests/test_cache_store.py under torchrun: every rank extracts its shards of a latent cache of an image
folder through a tiny SD-VAE. Arguments: the VAE folder, the image folder, the cache folder, the shard size."""
import sys

import torch

from scalegen.data import ImageFolder
from scalegen.distributed import cleanup, setup_distributed
from scalegen.tokenizers.sd_vae import load_sd_vae
from scalegen.train.caches import extract_latents

torch.set_num_threads(1)
vae, images, cache, shard_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
context = setup_distributed("cpu")
extract_latents(load_sd_vae(vae), ImageFolder(images, 16), cache, batch_size=2, context=context, shard_size=shard_size)
cleanup(context)
