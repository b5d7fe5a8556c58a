"""Native-resolution rows for the LM: tower patch rows of variable grids -> projected image tokens.

Contract (modes "native" and "naflex"; the batch is visual/native.py's: `pixel_values` [n_patches_total,
3, p, p], `image_grid` LongTensor [n_images, 2]):

    rows = tower.forward_grid(pixel_values, image_grid)               # [n_patches_total, C]
    feats = native_rows(rows, image_grid, merge, projector)          # [sum of tokens, D]

- `merge` = `Resolution.merge` for "native" (Qwen2-VL: each merge x merge block of an image's patch grid
  becomes one row of merge**2 * C channels, block row-major, channels ordered (dy, dx, C): Qwen2-VL's patch
  merger order, the projector's `pixel_shuffle`), and 1 for "naflex" (every patch is a token).
- The projector is a `Projector` whose MLP reads merge**2 * C channels: built with
  `reduce="pixel_shuffle", reduce_factor=merge` from the tower width C (the natural config for "native"),
  or without reduction from in_dim = merge**2 * C; "avg_pool" is refused.
- Tokens per image = grid_h * grid_w / merge**2, in image order (`tokens_per_image`), which is what
  `Resolution.layout(...).tokens` gave when the sample was rendered; the caller asserts the placeholder count.
- An image's tokens depend on that image alone: merging is per image and the MLP is row-wise.
"""

from __future__ import annotations

import torch

from ..visual.native import grid_list
from .projector import Projector, pixel_shuffle_grids


def tokens_per_image(image_grid: torch.Tensor, merge: int) -> list[int]:
    """image_grid [n_images, 2] -> tokens of each image: grid_h * grid_w / merge**2 (grids divisible by merge)."""
    out = []
    for h, w in grid_list(image_grid):
        if h % merge or w % merge:
            raise ValueError(f"an image grid of {h}x{w} patches is not divisible by merge={merge}")
        out.append(h * w // merge**2)
    return out


def check_native_projector(projector: Projector, width: int, merge: int) -> None:
    """The projector must read merge**2 * width channels per token, merged by pixel shuffle (or not at all)."""
    if projector.reduce == "avg_pool":
        raise ValueError("native resolution merges patches by pixel shuffle; the projector's reduce=avg_pool "
                         "has no variable-grid form (use reduce=pixel_shuffle or none)")
    if projector.reduce == "pixel_shuffle" and projector.reduce_factor != merge:
        raise ValueError(f"projector reduce_factor={projector.reduce_factor} differs from the resolution's "
                         f"merge={merge}")
    if projector.mlp_in_dim != width * merge**2:
        raise ValueError(f"projector MLP reads {projector.mlp_in_dim} channels; tower rows of width {width} "
                         f"merged {merge}x{merge} give {width * merge**2}")


def native_rows(tower_rows: torch.Tensor, image_grid: torch.Tensor, merge: int, projector: Projector) -> torch.Tensor:
    """[n_patches_total, C] tower rows (images consecutive) -> [sum of tokens_per_image, D] LM rows."""
    if tower_rows.ndim != 2:
        raise ValueError(f"native_rows: tower rows must be [n_patches_total, C], got {tuple(tower_rows.shape)}")
    check_native_projector(projector, tower_rows.shape[1], merge)
    grids = grid_list(image_grid)
    tokens_per_image(image_grid, merge)  # divisibility, with the grid named
    merged = pixel_shuffle_grids(tower_rows, grids, merge) if merge > 1 else tower_rows  # [T, C*merge**2]
    return projector.project_rows(merged)  # [T, D]
