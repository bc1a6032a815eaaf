"""Zero-shot editing masks for VAR (in-painting, out-painting, class-conditional editing).

A keep mask lives on the finest token grid (1 = keep the source image's token, 0 = let VAR generate). At each
scale it is resized to that scale's grid; generation then takes the source tokens at the kept positions.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from scalegen.errors import UserError

EditMode = Literal["inpaint", "outpaint"]
# Official rule (demo_zero_shot_edit.ipynb): scales with fewer tokens than this always copy the source,
# so the global layout (the 1×1 scale) is kept.
MIN_TOKENS_TO_EDIT = 4
# A resized mask keeps a token when more than half of it is covered by kept area.
KEEP_THRESHOLD = 0.5


def parse_box(text: str) -> tuple[float, float, float, float]:
    """"x0,y0,x1,y1" (pixels) → four floats."""
    try:
        x0, y0, x1, y1 = (float(item) for item in str(text).split(","))
    except ValueError:
        raise UserError(f"the box (--box) {text!r} must be four comma-separated numbers x0,y0,x1,y1") from None
    return x0, y0, x1, y1


def box_mask(
    image_size: int | tuple[int, int],
    box: tuple[float, float, float, float],
    grid_size: int,
    mode: EditMode = "inpaint",
) -> torch.Tensor:
    """Build the finest-grid keep mask for editing a pixel box.

    Args:
        image_size: image height and width in pixels (an int for square images).
        box: (x0, y0, x1, y1) pixel box, 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height.
        grid_size: side of the finest token grid (the tokenizer's last patch number).
        mode: "inpaint" regenerates the box and keeps the rest; "outpaint" keeps the box and regenerates the rest.

    Returns:
        (grid_size, grid_size) float mask, 1 where the source tokens are kept.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise UserError(
            f"box {box} is not inside the {width}x{height} image: give x0,y0,x1,y1 with "
            f"0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}"
        )
    if mode not in ("inpaint", "outpaint"):
        raise UserError(f"unknown edit mode {mode!r}: use 'inpaint' or 'outpaint'")
    inside_box = torch.zeros(grid_size, grid_size)
    rows = slice(round(y0 / height * grid_size), round(y1 / height * grid_size))
    columns = slice(round(x0 / width * grid_size), round(x1 / width * grid_size))
    inside_box[rows, columns] = 1.0
    return 1.0 - inside_box if mode == "inpaint" else inside_box


def resize_keep_mask(keep_mask: torch.Tensor, patch_num: int, batch_size: int) -> torch.Tensor:
    """Resize a finest-grid keep mask to one scale's grid, as the official zero-shot editing demo does.

    Args:
        keep_mask: (H, W) or (B, H, W) mask on the finest grid, 1 = keep the source token.
        patch_num: side of the target scale's grid.
        batch_size: B, to broadcast a shared (H, W) mask.

    Returns:
        (B, patch_num * patch_num) bool, True where the source token is kept (row-major).
    """
    mask = keep_mask.float()
    if mask.ndim == 2:
        mask = mask.expand(batch_size, *mask.shape)  # (B, H, W)
    resized = F.interpolate(mask.unsqueeze(1), size=(patch_num, patch_num), mode="bilinear", align_corners=False)
    keep = resized.flatten(1) > KEEP_THRESHOLD  # (B, p*p)
    if patch_num * patch_num < MIN_TOKENS_TO_EDIT:
        keep = torch.ones_like(keep)
    return keep


def check_edit_inputs(
    source_tokens: Sequence[torch.Tensor] | None,
    keep_mask: torch.Tensor | None,
    patch_nums: Sequence[int],
    batch_size: int,
) -> bool:
    """Validate editing inputs for a generation run.

    Args:
        source_tokens: per-scale source tokens, each (B, p*p) (continuous ones (B, p*p, c)), or None when not editing.
        keep_mask: (H, W) or (B, H, W) finest-grid keep mask, or None when not editing.
        patch_nums: token grid sides per scale.
        batch_size: B.

    Returns:
        True when editing, False for plain generation (both None).
    """
    if source_tokens is None and keep_mask is None:
        return False
    if source_tokens is None or keep_mask is None:
        raise ValueError("editing needs both source_tokens and keep_mask")
    expected = [(batch_size, patch * patch) for patch in patch_nums]
    found = [tuple(tokens.shape[:2]) for tokens in source_tokens]  # a continuous token has channels after these
    if found != expected:
        raise ValueError(f"source_tokens must have shapes {expected} (one per scale, from img_to_tokens; continuous "
                         f"tokens with their channels after), got {found}")
    finest = patch_nums[-1]
    if keep_mask.ndim not in (2, 3) or tuple(keep_mask.shape[-2:]) != (finest, finest):
        raise ValueError(
            f"keep_mask must be ({finest}, {finest}) or (B, {finest}, {finest}) (see box_mask), "
            f"got {tuple(keep_mask.shape)}"
        )
    return True


@torch.no_grad()
def edit_box(
    model: nn.Module,
    image: torch.Tensor,
    box: tuple[float, float, float, float],
    mode: EditMode = "inpaint",
    class_id: int | None = None,
    **sampling,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-shot in-painting (regenerate the box) or out-painting (keep only the box) of one image with a VAR.

    Args:
        model: a VAR with its tokenizer attached.
        image: (1, C, S, S) in [0, 1], at the tokenizer's image size.
        box: (x0, y0, x1, y1) in pixels of `image`.
        mode: "inpaint" or "outpaint".
        class_id: the class to draw the new content as; None is unconditional (the null class).
        **sampling: settings, seed, generator and single settings (cfg, top_k, ...), as `VAR.edit` takes them.
    Returns:
        (edited (1, C, S, S) in [0, 1], mask (1, 1, S, S): 1 where content was regenerated).
    """
    tokenizer, num_classes = model.tokenizer, model.config.num_classes
    if class_id is not None and not 0 <= class_id < num_classes:
        raise UserError(f"--class {class_id} is out of range; this model has classes 0..{num_classes - 1}")
    size = tokenizer.image_size
    grid = tokenizer.patch_nums[-1]
    keep = box_mask(size, box, grid, mode)  # (p, p), 1 = keep
    if keep.min() == keep.max():
        inside = int((keep if mode == "outpaint" else 1 - keep).sum())
        raise UserError(f"the box {box} covers {inside} of the {grid}×{grid} tokens ({size / grid:g} px each), so "
                        f"{mode} would change {'nothing' if inside == 0 else 'everything'}; make the box cover at "
                        "least one token and leave at least one out")
    source_tokens = model.token_head.targets(tokenizer, image.to(model.class_emb.weight.device) * 2 - 1)  # K × (1, p²)
    edited = model.edit([num_classes if class_id is None else class_id], source_tokens, keep, **sampling)
    regenerated = F.interpolate((1 - keep)[None, None], size=(size, size), mode="nearest")  # (1, 1, S, S)
    return edited, regenerated
