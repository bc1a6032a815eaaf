"""`scalegen data pack`: an ImageNet-style class folder as WebDataset-style tar shards that `--data` reads."""
from __future__ import annotations

import argparse

from scalegen.cli.parsing import POSITIVE
from scalegen.data.names import DEFAULT_IMAGES_PER_SHARD


def run_pack(args: argparse.Namespace) -> None:
    """Handler of `scalegen data pack`."""
    from scalegen.data.shards import pack_folder  # torch: only once the command runs

    index = pack_folder(args.folder, args.out, args.images_per_shard, args.seed)
    print(f"wrote the shards and their index {index}; train on them with --data {index}")


def register(commands) -> None:
    """Add `scalegen data pack` to the command line."""
    actions = commands.add_parser("data", help="prepare training data").add_subparsers(dest="action", required=True)
    parser = actions.add_parser("pack", help="pack a class folder into WebDataset-style tar shards (KEY.jpg + KEY.cls)")
    parser.add_argument("folder", help="ImageNet-style folder: one sub-folder of JPEG, PNG or WebP images per class")
    parser.add_argument("--out", required=True, metavar="PREFIX",
                        help="writes PREFIX-000000.tar, PREFIX-000001.tar, … and their index PREFIX.json (pass it to "
                             "--data)")
    parser.add_argument("--images-per-shard", type=POSITIVE, default=DEFAULT_IMAGES_PER_SHARD,
                        help="images in each shard; give at least as many shards as training ranks")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle that mixes the classes over shards")
    parser.set_defaults(handler=run_pack)
