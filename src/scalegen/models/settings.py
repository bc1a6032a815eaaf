"""The models' names and options that the command line's parsers show, free of torch (the models import it): the DiT
presets, the DiT block kinds and LightningDiT's block options, and VAR's attention backends and generation defaults."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from scalegen.errors import UserError

# model size -> (depth, hidden size, heads); the number after the slash in a preset name is the patch size.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
PRESETS: tuple[str, ...] = tuple(f"DiT-{size}/{patch}" for size in MODEL_SIZES for patch in PATCH_SIZES)


def preset_dimensions(preset: str) -> dict[str, int]:
    """The depth, hidden size, heads and patch size of a named DiT preset such as "DiT-XL/2".

    Raises:
        UserError: for a name that is no preset.
    """
    try:
        size, patch = preset.removeprefix("DiT-").split("/")
        depth, hidden_size, num_heads = MODEL_SIZES[size]
        patch_size = int(patch)
        if patch_size not in PATCH_SIZES:
            raise KeyError(patch)
    except (KeyError, ValueError):
        raise UserError(f"unknown DiT preset {preset!r}; choose one of {', '.join(PRESETS)}") from None
    return {"depth": depth, "hidden_size": hidden_size, "num_heads": num_heads, "patch_size": patch_size}

BlockKind = Literal["adaln_zero", "adaln", "in_context", "cross_attention"]
BLOCK_KINDS: tuple[str, ...] = get_args(BlockKind)
ADALN_KINDS: tuple[str, ...] = ("adaln_zero", "adaln")
NormKind = Literal["layernorm", "rmsnorm"]
NORM_KINDS: tuple[str, ...] = get_args(NormKind)
MlpKind = Literal["gelu", "swiglu"]
MLP_KINDS: tuple[str, ...] = get_args(MlpKind)
ROPE_AXES = 2  # 2-D RoPE: one half of each head rotates with the token's row, the other with its column
ROPE_HEAD_DIVISOR = 2 * ROPE_AXES  # each half turns channel pairs


@dataclass(frozen=True)
class BlockOptions:
    """LightningDiT's options for the adaLN blocks; the defaults are the official DiT block, bit for bit.

    Fields:
        norm: "layernorm" (DiT's) or "rmsnorm" for the blocks' two affine-free norms.
        mlp: "gelu" (DiT's tanh-GELU MLP) or "swiglu" (LightningDiT's, hidden width 2/3 of the GELU MLP's).
        rope: rotate queries and keys by their 2-D grid position (the absolute sin-cos embedding stays).
        qk_norm: RMS-normalise each head's queries and keys (learnable weights) before RoPE and attention.
    """

    norm: NormKind = "layernorm"
    mlp: MlpKind = "gelu"
    rope: bool = False
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if self.norm not in NORM_KINDS:
            raise UserError(f"unknown norm {self.norm!r}; choose one of {', '.join(NORM_KINDS)}")
        if self.mlp not in MLP_KINDS:
            raise UserError(f"unknown mlp {self.mlp!r}; choose one of {', '.join(MLP_KINDS)}")

    def check(self, kind: str, head_dim: int) -> None:
        """A one-line error when options other than the official ones meet a block kind without them, or RoPE a
        head dimension it cannot split into row and column channel pairs."""
        if kind not in ADALN_KINDS and self != OFFICIAL_BLOCK:
            raise UserError(f"--norm, --mlp, --rope and --qk-norm apply to the {' and '.join(ADALN_KINDS)} blocks, "
                            f"not {kind}; drop them or use --block adaln_zero")
        if self.rope and head_dim % ROPE_HEAD_DIVISOR:
            raise UserError(f"--rope needs a head dimension (hidden size / heads) divisible by {ROPE_HEAD_DIVISOR}; "
                            f"got {head_dim}: change --hidden-size or --num-heads")


OFFICIAL_BLOCK = BlockOptions()



# Teacher-forcing attention: "sdpa" (the official path, a dense additive mask) or "flex" (FlexAttention, a
# block-sparse mask that skips the blocks above the diagonal).
AttentionBackend = Literal["sdpa", "flex"]
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)
# How a token is drawn from its probabilities: "multinomial" is the official torch.multinomial (one exponential draw per
# vocabulary entry, so the official tokens for a seed); "inverse-cdf" draws one uniform per position and looks it up
# in the cumulative probabilities (the same distribution, other tokens for a seed, far fewer random numbers).
Draws = Literal["multinomial", "inverse-cdf"]
DRAWS: tuple[str, ...] = get_args(Draws)
# VAR's token head (`token_heads`), what a VAR config that names none has.
CATEGORICAL_HEAD = "categorical"
FLOW_HEAD = "flow"  # continuous tokens by per-token flow matching (models/flow_head.py)
# The flow head's noisy context by default (xAR's; `train var --context-noise`): at equal training FLOPs it lifted the
# classifier accuracy of the samples from 0.76 to 0.86 and FID from 66.2 to 64.5; strength 1 reached FID 61.3 but
# accuracy 0.82 only (bench/var_continuous.py, bench/README.md).
FLOW_CONTEXT_NOISE = 0.5
# CoDe's setting (VAR-d30 drafts 8 of the 10 scales, VAR-d16 refines the last 2).
DEFAULT_REFINED_SCALES = 2
# FastVAR prunes the later blocks only (Infinity-2B: blocks 3..27 of 32): the first and the last block always see
# every token.
DEFAULT_UNPRUNED_FIRST_BLOCKS = 1
DEFAULT_UNPRUNED_LAST_BLOCKS = 1
