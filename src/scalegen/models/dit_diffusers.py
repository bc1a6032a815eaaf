"""The official DiT state dict ⇄ diffusers' `DiTTransformer2DModel` (key names and config), both ways.

diffusers keeps one copy of the timestep and class embedders in every block (all equal after a conversion), splits
the attention's qkv into q, k and v, and computes the fixed position table itself (so it is not in its state dict).
Its `DiTPipeline` feeds label 1000 as the unconditional class whatever the class count, so an exported class table of
fewer classes is padded up to that row with copies of the null row; the true count rides along in the config.
"""
from __future__ import annotations

import torch

from scalegen.errors import UserError
from scalegen.models.layers import LAYER_NORM_EPS

DIFFUSERS_CLASS = "DiTTransformer2DModel"
# Per block: (diffusers name, official name); the embedders are shared by all blocks in the official layout.
BLOCK_KEYS = (
    ("norm1.linear", "adaLN_modulation.1"),
    ("attn1.to_out.0", "attn.proj"),
    ("ff.net.0.proj", "mlp.fc1"),
    ("ff.net.2", "mlp.fc2"),
)
SHARED_KEYS = (
    ("norm1.emb.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("norm1.emb.timestep_embedder.linear_2", "t_embedder.mlp.2"),
)
TOP_KEYS = (("pos_embed.proj", "x_embedder.proj"), ("proj_out_1", "final_layer.adaLN_modulation.1"),
            ("proj_out_2", "final_layer.linear"))
CLASS_TABLE = ("norm1.emb.class_embedder.embedding_table.weight", "y_embedder.embedding_table.weight")
PARAMETER_KINDS = ("weight", "bias")
PIPELINE_NULL_CLASS = 1000  # the label DiTPipeline hard-codes for the unconditional half of guidance
CLASS_COUNT_KEY = "_scalegen_num_classes"  # a padded table's real class count; diffusers ignores keys starting "_"


def diffusers_config(config) -> dict:
    """The `DiTTransformer2DModel` config of a `DiTConfig` (only the adaLN-Zero block has a diffusers counterpart)."""
    if config.block != "adaln_zero":
        raise UserError(f"diffusers has no DiT with the {config.block!r} block; only adaln_zero DiTs export")
    return {
        "_class_name": DIFFUSERS_CLASS, "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads, "in_channels": config.in_channels,
        "out_channels": config.out_channels, "num_layers": config.depth, "sample_size": config.input_size,
        "patch_size": config.patch_size, "num_embeds_ada_norm": max(config.num_classes, PIPELINE_NULL_CLASS),
        CLASS_COUNT_KEY: config.num_classes, "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False, "norm_eps": LAYER_NORM_EPS, "activation_fn": "gelu-approximate",
        "attention_bias": True, "dropout": 0.0, "upcast_attention": False,
    }


def padded_class_table(table: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A class table (num_classes rows, plus the null row when trained with label dropout) with the null row at
    `PIPELINE_NULL_CLASS` or after the last class: the rows between are copies of the null row, so unused labels are
    unconditional; a table without a null row gets a zero row in its place."""
    null = table[num_classes:num_classes + 1] if table.shape[0] > num_classes else torch.zeros_like(table[:1])  # (1, D)
    padding = max(num_classes, PIPELINE_NULL_CLASS) + 1 - num_classes
    return torch.cat([table[:num_classes], null.expand(padding, -1)])  # (max(N, 1000) + 1, D)


def to_diffusers(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """An official-layout DiT state dict (of the `DiTConfig` `config`) in diffusers' names, its class table padded
    for `DiTPipeline` (`padded_class_table`)."""
    converted = {}
    class_table = padded_class_table(state_dict[CLASS_TABLE[1]], config.num_classes)
    for ours, theirs in TOP_KEYS:
        for kind in PARAMETER_KINDS:
            converted[f"{ours}.{kind}"] = state_dict[f"{theirs}.{kind}"]
    for block in range(config.depth):
        prefix = f"transformer_blocks.{block}."
        for ours, theirs in SHARED_KEYS:
            for kind in PARAMETER_KINDS:
                converted[f"{prefix}{ours}.{kind}"] = state_dict[f"{theirs}.{kind}"]
        converted[prefix + CLASS_TABLE[0]] = class_table
        for ours, theirs in BLOCK_KEYS:
            for kind in PARAMETER_KINDS:
                converted[f"{prefix}{ours}.{kind}"] = state_dict[f"blocks.{block}.{theirs}.{kind}"]
        for kind in PARAMETER_KINDS:
            query, key, value = state_dict[f"blocks.{block}.attn.qkv.{kind}"].chunk(3, dim=0)
            converted.update({f"{prefix}attn1.to_q.{kind}": query, f"{prefix}attn1.to_k.{kind}": key,
                              f"{prefix}attn1.to_v.{kind}": value})
    return converted


def from_diffusers(state_dict: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A diffusers `DiTTransformer2DModel` state dict and config as an official-layout DiT state dict, less the fixed
    position table (`pos_embed`, which a freshly built `DiT` holds), and the `DiTConfig` fields; the first block's
    embedders serve all blocks, and a class table padded by `to_diffusers` loses its padding."""
    if config.get("_class_name") != DIFFUSERS_CLASS or config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise UserError(f"the diffusers config names {config.get('_class_name')} ({config.get('norm_type')}), not an "
                        f"adaLN-Zero {DIFFUSERS_CLASS}")
    hidden_size = config["num_attention_heads"] * config["attention_head_dim"]
    patch, in_channels = config["patch_size"], config["in_channels"]
    num_classes = config.get(CLASS_COUNT_KEY, config["num_embeds_ada_norm"])
    ours = dict(
        input_size=config["sample_size"], patch_size=patch, in_channels=in_channels, hidden_size=hidden_size,
        depth=config["num_layers"], num_heads=config["num_attention_heads"], num_classes=num_classes,
        learn_sigma=config.get("out_channels") == 2 * in_channels,
    )
    converted = {}
    for diffusers_name, official in TOP_KEYS:
        for kind in PARAMETER_KINDS:
            converted[f"{official}.{kind}"] = state_dict[f"{diffusers_name}.{kind}"]
    first = "transformer_blocks.0."
    for diffusers_name, official in SHARED_KEYS:
        for kind in PARAMETER_KINDS:
            converted[f"{official}.{kind}"] = state_dict[f"{first}{diffusers_name}.{kind}"]
    class_table = state_dict[first + CLASS_TABLE[0]]
    converted[CLASS_TABLE[1]] = torch.cat([class_table[:num_classes], class_table[-1:]])  # the classes, the null row
    shared = [f"{name}.{kind}" for name, _ in SHARED_KEYS for kind in PARAMETER_KINDS] + [CLASS_TABLE[0]]
    for block in range(1, ours["depth"]):
        for key in shared:
            if not torch.equal(state_dict[first + key], state_dict[f"transformer_blocks.{block}.{key}"]):
                raise UserError(f"block {block}'s {key} differs from block 0's: the official DiT layout shares one "
                                "timestep and class embedder, so this DiTTransformer2DModel does not convert")
    for block in range(ours["depth"]):
        prefix = f"transformer_blocks.{block}."
        for diffusers_name, official in BLOCK_KEYS:
            for kind in PARAMETER_KINDS:
                converted[f"blocks.{block}.{official}.{kind}"] = state_dict[f"{prefix}{diffusers_name}.{kind}"]
        for kind in PARAMETER_KINDS:
            converted[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(
                [state_dict[f"{prefix}attn1.to_{part}.{kind}"] for part in ("q", "k", "v")], dim=0)
    return converted, ours

