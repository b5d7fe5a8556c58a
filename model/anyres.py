"""The model's resolution rule and LLaVA-NeXT's packing of crop rows into each image's token rows.

Contract:
- `build_resolution(config, towers, projector, tokens) -> visual.resolution.Resolution`: the one rule from an
  image's size to its crops and tokens, from the config's resolution keys and the tower facts. No key set:
  mode "fixed" (the tower's `image_size` and patch grid, `tokens_per_crop` = the projector's rows per
  crop): today's behaviour. `image_grid_pinpoints` set: mode "anyres". A token-reducing
  projector (pixel_shuffle / avg_pool by s) is handled: its output grid (h/s, w/s) is row-major like the
  tower's, so the crops' reduced grids are joined the same way (`Resolution.grid` is then that grid). A tower that also returns its CLS
  (select="cls_patch") is refused (one line naming `select`), as Resolution refuses it.
- `image_layouts(res, image_sizes [n, 2] (height, width), image_crops [n], n_per_image=None) -> [ImageLayout]`:
  each image's layout, checked against the crops given for it (a ValueError names the image, its size and
  both counts). `n_per_image[i]` = the number of images of image i's sample (`multi_image="base"` gives an
  image of a multi-image sample its base view only); None infers it from the crops (1 crop = base only).
- `pack_anyres(rows [n_crops, T, D], image_sizes, layouts, res, newline [D] | None) -> [sum tokens, D]`:
  per image (its crops consecutive, images in order), LLaVA-NeXT's layout: the base view's T rows; then,
  for a tiled image, the tiles' grids joined into one (tiles_h*h) x (tiles_w*w) map, the padding lines
  removed again (unpad, to the original aspect ratio), shrunk bilinearly when `anyres_max` asks, and
  `newline` after each map row; an image with 1 crop = base rows + newline. The row count of each image
  equals `layout.tokens` (asserted). Same numbers as transformers' `LlavaNextModel.pack_image_features`
  (and LLaVA-OneVision's `anyres_max` interpolation) on the same rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..visual.resolution import ImageLayout, Resolution, anyres_max_grid, unpadded_grid
from .config import VLMConfig
from .native import check_native_projector


def crop_grid(towers: nn.Module, projector: nn.Module) -> tuple[int, int]:
    """The projector's output grid for one crop: the tower's patch grid, divided by a token reduction."""
    s = int(projector.reduce_factor) if projector.reduce is not None else 1
    return int(towers.grid[0]) // s, int(towers.grid[1]) // s


def build_resolution(config: VLMConfig, towers: nn.Module, projector: nn.Module, tokens: int) -> Resolution:
    """`tokens`: the projector's rows for one square crop (`VLM.tokens_per_image`)."""
    size = int(towers.image_size)
    if config.max_pixels is not None or getattr(towers, "max_num_patches", None):
        return _native_resolution(config, towers, projector, tokens)
    if not config.anyres:
        grid = (int(towers.grid[0]), int(towers.grid[1]))
        return Resolution(mode="fixed", image_size=size, grid=grid, tokens_per_crop=tokens)
    grid = crop_grid(towers, projector)  # the rows' grid per crop: what the tiles' maps are joined from
    try:
        return Resolution(
            mode="anyres", image_size=size, patch_size=size // max(grid[0], 1), grid=grid, tokens_per_crop=tokens,
            pinpoints=tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints),
            image_newline=config.image_newline, multi_image=config.multi_image, anyres_max=config.anyres_max,
        )
    except ValueError as e:  # one line naming the key: select=patch, or a pinpoint not a multiple of the size
        raise ValueError(f"VLMConfig.image_grid_pinpoints (anyres): {e}") from None


def _native_resolution(config: VLMConfig, towers: nn.Module, projector: nn.Module, tokens: int) -> Resolution:
    """Modes "native" (max_pixels set) and "naflex" (a SigLIP2 NaFlex tower): variable patch grids."""
    what = "a SigLIP2 NaFlex tower" if config.max_pixels is None else "VLMConfig.max_pixels (native resolution)"
    if config.anyres:
        raise ValueError(f"{what} and image_grid_pinpoints (anyres) exclude each other; set one")
    if not getattr(towers, "variable_grid", False):
        raise ValueError(f"{what}: the tower ({type(towers).__name__}) cannot read variable patch grids; use one "
                         f"hf_clip, hf_siglip, hf_siglip2 or timm CNN tower")
    merge = int(projector.reduce_factor) if projector.reduce is not None else 1
    check_native_projector(projector, int(towers.hidden_size), merge)
    common = dict(image_size=int(towers.image_size), patch_size=int(towers.patch_size), grid=tuple(towers.grid),
                  tokens_per_crop=tokens)
    if config.max_pixels is None:  # NaFlex: the tower's own patch budget; every patch is a token
        if merge != 1:
            raise ValueError("a SigLIP2 NaFlex tower gives one token per patch: drop the projector's reduce")
        return Resolution(mode="naflex", max_num_patches=int(towers.max_num_patches), **common)
    f = int(towers.patch_size) * merge
    return Resolution(mode="native", merge=merge, min_pixels=config.min_pixels or f * f,
                      max_pixels=config.max_pixels, **common)


def image_layouts(
    res: Resolution, image_sizes: torch.Tensor, image_crops: torch.Tensor, n_per_image: list[int] | None = None
) -> list[ImageLayout]:
    sizes = [(int(h), int(w)) for h, w in torch.as_tensor(image_sizes).view(-1, 2).tolist()]
    crops = [int(c) for c in torch.as_tensor(image_crops).view(-1).tolist()]
    if len(sizes) != len(crops):
        raise ValueError(f"image_sizes has {len(sizes)} image(s) but image_crops {len(crops)}")
    if n_per_image is not None and len(n_per_image) != len(sizes):
        raise ValueError(f"image_counts cover {len(n_per_image)} image(s) but image_sizes {len(sizes)}")
    layouts = []
    for i, ((h, w), c) in enumerate(zip(sizes, crops)):
        if n_per_image is not None:
            n = n_per_image[i]
        else:  # 1 crop = the base view of an image in a multi-image sample
            n = 2 if c == 1 and res.multi_image == "base" else 1
        lay = res.layout(w, h, n)
        if lay.crops != c:
            raise ValueError(f"image {i} ({w}x{h}, {n} image(s) in its sample): {c} crop(s) given, but the "
                             f"resolution rule gives {lay.crops} (preprocess with visual/anyres.py anyres_pixels)")
        layouts.append(lay)
    return layouts


def _tile_map(tiles: torch.Tensor, height: int, width: int, layout: ImageLayout, res: Resolution) -> torch.Tensor:
    """[tiles, h*w, D] of one image -> its unpadded (and anyres_max-shrunk) map [rows, cols, D]."""
    (gh, gw), s, d = res.grid, res.image_size, tiles.shape[-1]
    bw, bh = layout.resize  # the best pinpoint, (width, height)
    tr, tc = -(-bh // s), -(-bw // s)  # tiles per column / per row
    assert tiles.shape[0] == tr * tc, (tiles.shape, tr, tc)
    fmap = tiles.view(tr, tc, gh, gw, d).permute(0, 2, 1, 3, 4).reshape(tr * gh, tc * gw, d)  # [H, W, D]
    rows, cols = unpadded_grid(height, width, tr * gh, tc * gw)
    top, left = (tr * gh - rows) // 2, (tc * gw - cols) // 2  # the padding was split evenly on both sides
    fmap = fmap[top : top + rows, left : left + cols]  # [rows, cols, D]
    new = anyres_max_grid(rows, cols, gh * gw, res.anyres_max)
    if new != (rows, cols):  # LLaVA-OneVision: bilinear shrink of an oversized map
        fmap = F.interpolate(fmap.permute(2, 0, 1)[None], size=new, mode="bilinear")[0].permute(1, 2, 0)
    return fmap  # [rows', cols', D]


def pack_anyres(
    rows: torch.Tensor,
    image_sizes: torch.Tensor,
    layouts: list[ImageLayout],
    res: Resolution,
    newline: torch.Tensor | None,
) -> torch.Tensor:
    """[n_crops, T, D] projected crop rows -> [sum tokens, D], image after image (module docstring)."""
    sizes = torch.as_tensor(image_sizes).view(-1, 2).tolist()
    n_crops = sum(lay.crops for lay in layouts)
    if rows.shape[0] != n_crops:
        raise ValueError(f"{rows.shape[0]} crops of pixels/features but the images' layouts need {n_crops}")
    d, out, start = rows.shape[-1], [], 0
    for (h, w), lay in zip(sizes, layouts):
        crops = rows[start : start + lay.crops]  # [crops, T, D]
        start += lay.crops
        parts = [crops[0]]  # the base view's rows [T, D]
        if lay.crops > 1:
            fmap = _tile_map(crops[1:], int(h), int(w), lay, res)  # [r, c, D]
            if newline is not None:
                nl = newline.to(fmap.dtype).view(1, 1, d).expand(fmap.shape[0], 1, d)
                fmap = torch.cat([fmap, nl], dim=1)  # [r, c + 1, D]: a newline closes each row
            parts.append(fmap.reshape(-1, d))
        elif newline is not None:
            parts.append(newline.to(crops.dtype).view(1, d))
        image = torch.cat(parts)  # [tokens, D]
        assert image.shape[0] == lay.tokens, (
            f"anyres packing gave {image.shape[0]} rows for an image of {w}x{h}, the resolution rule says "
            f"{lay.tokens} ({lay})")
        out.append(image)
    return torch.cat(out)  # [sum tokens, D]
