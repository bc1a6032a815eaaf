"""FastVAR's cached token pruning for VAR generation (Guo et al., 2025): at the finest scales most tokens have
already converged, so each pruned block computes its attention and MLP branches only for the *pivotal* tokens — those
farthest from the scale's mean token — and fills the other positions with the same branch's output at the last
unpruned scale, upsampled (area) to the current grid. The pruned positions also add no keys or values to the KV
cache. Training-free; the settings (`TokenPruning`) say which scales, how many tokens, which blocks.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scalegen.errors import UserError
from scalegen.models.settings import DEFAULT_UNPRUNED_FIRST_BLOCKS, DEFAULT_UNPRUNED_LAST_BLOCKS

# FastVAR prunes its two largest scales by 40 % and 50 % (Infinity at 1024 px, `FASTVAR_FRACTIONS`). On the shipped
# 32-px VAR (16×16 at most) that cost 9 % of FID for 12 % of the time; 30 % of the last scale alone cost 3 %
# (bench/README.md): the default is the latter.
DEFAULT_PRUNED_FRACTIONS = (0.3,)
FASTVAR_FRACTIONS = (0.4, 0.5)


@dataclass(frozen=True)
class TokenPruning:
    """Which tokens generation computes at the finest scales.

    Attributes:
        fractions: the fraction of tokens *not* computed at each of the last len(fractions) scales (coarse to fine);
            0 computes all of that scale's tokens.
        unpruned_first_blocks: the first blocks that always compute every token.
        unpruned_last_blocks: the last blocks that always compute every token.
    """

    fractions: tuple[float, ...] = DEFAULT_PRUNED_FRACTIONS
    unpruned_first_blocks: int = DEFAULT_UNPRUNED_FIRST_BLOCKS
    unpruned_last_blocks: int = DEFAULT_UNPRUNED_LAST_BLOCKS

    def check(self, patch_nums: Sequence[int], depth: int) -> None:
        """A one-line UserError when these settings do not fit a model with these scales and blocks."""
        if not self.fractions:
            raise UserError("token pruning needs at least one fraction (--prune 0.4,0.5 prunes the last two scales)")
        if any(not 0 <= fraction < 1 for fraction in self.fractions):
            raise UserError(f"pruned fractions must be in [0, 1), got {list(self.fractions)}")
        if len(self.fractions) >= len(patch_nums):
            raise UserError(f"--prune gives {len(self.fractions)} fractions but the model has {len(patch_nums)} scales: "
                            "prune fewer scales, so that one scale before them holds every token")
        if min(self.unpruned_first_blocks, self.unpruned_last_blocks) < 0:
            raise UserError("the numbers of unpruned first and last blocks cannot be negative")
        if self.unpruned_first_blocks + self.unpruned_last_blocks >= depth:
            raise UserError(f"{self.unpruned_first_blocks} first and {self.unpruned_last_blocks} last unpruned blocks "
                            f"leave none of the model's {depth} blocks to prune")

    def kept_tokens(self, patch_nums: Sequence[int]) -> list[int]:
        """The number of tokens each scale computes in its pruned blocks (every token at the unpruned scales)."""
        first_pruned = len(patch_nums) - len(self.fractions)
        kept = [patch * patch for patch in patch_nums]
        for scale_index, fraction in enumerate(self.fractions, start=first_pruned):
            kept[scale_index] -= int(kept[scale_index] * fraction)
        return kept

    def pruned_blocks(self, depth: int) -> range:
        """The blocks that compute only the kept tokens at a pruned scale."""
        return range(self.unpruned_first_blocks, depth - self.unpruned_last_blocks)


def pivotal_tokens(x: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` positions of each row farthest (squared L2) from the row's mean token: FastVAR's pivotal tokens.

    Args:
        x: (B, l, C) the positions of one scale.
        count: how many to keep.

    Returns:
        (B, count) position indices.
    """
    distance = (x - x.mean(dim=1, keepdim=True)).square().sum(dim=-1)  # (B, l)
    return distance.topk(count, dim=1, sorted=False).indices  # (B, count)


class PrunedGeneration:
    """One generation's pruning state: the branch outputs recorded at the last unpruned scale, and what each block
    computes at each scale (`block_tokens`)."""

    def __init__(self, pruning: TokenPruning, patch_nums: Sequence[int], depth: int) -> None:
        pruning.check(patch_nums, depth)
        self.patch_nums = tuple(patch_nums)
        self.kept = pruning.kept_tokens(patch_nums)
        self.pruned_blocks = pruning.pruned_blocks(depth)
        self.cached_scale = len(patch_nums) - len(pruning.fractions) - 1  # the last scale holding every token
        self.branches: dict[tuple[int, str], torch.Tensor] = {}  # (block, branch) -> (2B, p_c², C) at the cached scale

    def block_tokens(self, scale_index: int, block_index: int) -> BlockTokens | None:
        """What block `block_index` computes at scale `scale_index`: None for every token with nothing to record."""
        side = self.patch_nums[scale_index]
        if scale_index == self.cached_scale and block_index in self.pruned_blocks:
            return BlockTokens(self, block_index, side, None)
        if scale_index > self.cached_scale and block_index in self.pruned_blocks and self.kept[scale_index] < side * side:
            return BlockTokens(self, block_index, side, self.kept[scale_index])
        return None


class BlockTokens:
    """The tokens one block computes at one scale: every token (recording the branch outputs for the finer scales),
    or only the pivotal ones, the others restored from the recorded outputs."""

    def __init__(self, state: PrunedGeneration, block_index: int, side: int, kept: int | None) -> None:
        self.state = state
        self.block_index = block_index
        self.side = side
        self.kept = kept

    def compute(self, branch: str, x: torch.Tensor, layer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One residual branch (`layer`, position-wise but for attention) over this scale's positions.

        Args:
            branch: the branch's name ("attention", "ffn"), to find its recorded output.
            x: (B, l, C) the positions entering the branch.
            layer: the branch: (B, n, C) positions -> (B, n, C) outputs.

        Returns:
            (B, l, C) outputs at every position.
        """
        key = (self.block_index, branch)
        if self.kept is None:
            out = layer(x)  # (B, l, C)
            self.state.branches[key] = out
            return out
        width = x.shape[-1]
        index = pivotal_tokens(x, self.kept).unsqueeze(-1).expand(-1, -1, width)  # (B, n, C)
        computed = layer(x.gather(1, index))  # (B, n, C)
        recorded = self.state.branches[key]  # (B, p_c², C)
        cached_side = self.state.patch_nums[self.state.cached_scale]
        grid = recorded.transpose(1, 2).reshape(x.shape[0], width, cached_side, cached_side)  # (B, C, p_c, p_c)
        restored = F.interpolate(grid, size=(self.side, self.side), mode="area")  # (B, C, p, p)
        restored = restored.flatten(2).transpose(1, 2).to(computed.dtype)  # (B, l, C)
        return restored.scatter(1, index, computed)  # (B, l, C)
