"""Launched by tests/data/test_cache_store.py under torchrun: every rank extracts its shards of a latent cache of an
image folder through a tiny SD-VAE, and records which shards it encoded in ENCODED/rank-R.json. Arguments: the VAE
folder, the image folder, the cache folder, the shard size, the folder ENCODED."""
import json
import sys
from pathlib import Path

import torch

from scalegen.data import store
from scalegen.data.caches import extract_latents
from scalegen.data.folder import ImageFolder
from scalegen.distributed import cleanup, setup_distributed
from scalegen.tokenizers.sd_vae import load_sd_vae

torch.set_num_threads(1)
vae, images, cache, shard_size, encoded = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
context = setup_distributed("cpu")
written = []
encode_shard = store.encode_shard


def recorded(dataset, encode, items, path, *args):
    """`encode_shard`, noting the shard's name."""
    written.append(path.name)
    encode_shard(dataset, encode, items, path, *args)


store.encode_shard = recorded
extract_latents(load_sd_vae(vae), ImageFolder(images, 16), cache, batch_size=2, context=context, shard_size=shard_size)
encoded.mkdir(exist_ok=True)
(encoded / f"rank-{context.rank}.json").write_text(json.dumps({"shards": written}))
cleanup(context)
