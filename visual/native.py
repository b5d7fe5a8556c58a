"""Native-resolution pixels: an image at the size `Resolution.layout` gives it, cut into patch rows.

Batch contract of the modes "native" (Qwen2-VL) and "naflex" (SigLIP2), which the collator builds and
`VisionTower.forward_grid` reads:
- `pixel_values` FloatTensor [n_patches_total, 3, p, p]: each image's patches row-major over its
  (grid_h, grid_w) patch grid, images consecutive in sample order, normalised with the tower's mean / std;
- `image_grid` LongTensor [n_images, 2]: (grid_h, grid_w) per image, so image i owns the
  grid_h * grid_w rows after those of images 0..i-1.
The size comes only from `Resolution.layout(width, height).resize` ((W, H), multiples of p); the tokens the
image gets are that layout's `tokens` (naflex: grid_h * grid_w; native: grid_h * grid_w / merge**2).

`native_pixels(image, res, processor)` resizes with the processor's resample filter (PIL, on the uint8
image), scales to 0..1, normalises with its mean / std and patchifies: for "naflex" this is exactly what
transformers' Siglip2ImageProcessor (PIL backend) computes, its (py, px, channel)-flattened patches
reordered to [3, p, p]. `patchify` / `unpatchify` convert between [k, 3, H, W] and the patch rows;
`grid_groups` lists images by equal grid so a backend runs each shape once. One sample's images become the
batch keys through visual/pixels.py's `prepare_images`, whose `PIXEL_FNS` table names `native_pixels` for both
modes (its signature is that table's: `n_images` does not change a native / naflex layout).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .processor import RESAMPLE, ImageProcessor
from .resolution import Resolution

GRID_MODES = ("native", "naflex")


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[k, 3, H, W] -> [k * (H/p) * (W/p), 3, p, p], each image's patches row-major, images consecutive."""
    k, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"an image of {w}x{h} px is not a whole number of {patch}-px patches")
    gh, gw = h // patch, w // patch
    x = x.reshape(k, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)  # [k, gh, gw, 3, p, p]
    return x.reshape(k * gh * gw, c, patch, patch)


def unpatchify(patches: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """[k * gh * gw, 3, p, p] (k images of one grid) -> [k, 3, gh * p, gw * p]; inverse of `patchify`."""
    n, c, p, _ = patches.shape
    assert n % (grid_h * grid_w) == 0, f"{n} patches are not whole {grid_h}x{grid_w} grids"
    k = n // (grid_h * grid_w)
    x = patches.reshape(k, grid_h, grid_w, c, p, p).permute(0, 3, 1, 4, 2, 5)  # [k, 3, gh, p, gw, p]
    return x.reshape(k, c, grid_h * p, grid_w * p)


def grid_list(image_grid: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """image_grid [n_images, 2] -> [(grid_h, grid_w), ...] as Python ints."""
    rows = image_grid.tolist() if isinstance(image_grid, torch.Tensor) else image_grid
    return [(int(h), int(w)) for h, w in rows]


def row_offsets(grids: Sequence[tuple[int, int]]) -> list[int]:
    """Where each image's rows start in the flat [n_patches_total, ...] tensor (n_images + 1 entries)."""
    out = [0]
    for h, w in grids:
        out.append(out[-1] + h * w)
    return out


def grid_groups(grids: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """Image indices by grid, in first-seen order: images of one grid can run through a tower as one batch."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, g in enumerate(grids):
        groups.setdefault(g, []).append(i)
    return groups


def run_by_grid(pixel_values: torch.Tensor, image_grid: torch.Tensor, run, prefix: int = 0) -> torch.Tensor:
    """Patch rows [P, 3, p, p] of images with grids `image_grid` -> `run`'s patch rows [P, D], in input order.
    Images of equal grid go through `run(images [k, 3, gh*p, gw*p]) -> [k, prefix + gh*gw, D]` together;
    the first `prefix` rows (CLS, registers) are dropped. Each image's rows depend on that image alone."""
    grids = grid_list(image_grid)
    start = row_offsets(grids)
    pieces: list[torch.Tensor] = [pixel_values[:0]] * len(grids)
    for (gh, gw), idx in grid_groups(grids).items():
        patches = torch.cat([pixel_values[start[i] : start[i + 1]] for i in idx])  # [k*gh*gw, 3, p, p]
        hidden = run(unpatchify(patches, gh, gw))  # [k, prefix + gh*gw, D]
        assert hidden.shape[1] == prefix + gh * gw, f"{hidden.shape[1]} rows for a {gh}x{gw} grid (+{prefix})"
        for j, i in enumerate(idx):
            pieces[i] = hidden[j, prefix:]  # [gh*gw, D]
    return torch.cat(pieces)  # [n_patches_total, D]


def check_grid_batch(pixel_values: torch.Tensor, image_grid: torch.Tensor, patch: int, what: str) -> None:
    """Loud checks of the batch contract: shapes, patch size, and rows == sum of grid_h * grid_w."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[2] != pixel_values.shape[3]:
        raise ValueError(f"{what}: native pixel_values must be [n_patches, 3, p, p], got {tuple(pixel_values.shape)}")
    if pixel_values.shape[2] != patch:
        raise ValueError(f"{what}: patches of {pixel_values.shape[2]} px, the tower's patch is {patch} px")
    if image_grid.ndim != 2 or image_grid.shape[1] != 2:
        raise ValueError(f"{what}: image_grid must be [n_images, 2] (grid_h, grid_w), got {tuple(image_grid.shape)}")
    if len(image_grid) and int(image_grid.min()) < 1:
        raise ValueError(f"{what}: image_grid has an empty grid: {image_grid.tolist()}")
    total = int((image_grid[:, 0] * image_grid[:, 1]).sum())
    if total != pixel_values.shape[0]:
        raise ValueError(f"{what}: image_grid covers {total} patches, pixel_values holds {pixel_values.shape[0]}")


def native_pixels(image: Image.Image, res: Resolution, processor: ImageProcessor, n_images: int = 1) -> torch.Tensor:
    """One RGB image -> FloatTensor [gh * gw, 3, p, p] at `res.layout(w, h).resize`, normalised."""
    if res.mode not in GRID_MODES:
        raise ValueError(f"native_pixels is for resolution modes {GRID_MODES}, not {res.mode!r}")
    if image.mode != "RGB":
        raise ValueError(f"image mode is {image.mode!r}; convert to 'RGB' before preprocessing")
    lay = res.layout(*image.size, n_images)
    img = image if image.size == lay.resize else image.resize(lay.resize, RESAMPLE[processor.resample])
    arr = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3] in 0..1
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [3, H, W]
    mean = torch.tensor(processor.mean).view(3, 1, 1)
    std = torch.tensor(processor.std).view(3, 1, 1)
    patches = patchify(((x - mean) / std)[None], res.patch_size)  # [gh * gw, 3, p, p]
    assert patches.shape[0] == lay.grid[0] * lay.grid[1], f"{patches.shape[0]} patches, layout grid {lay.grid}"
    return patches

