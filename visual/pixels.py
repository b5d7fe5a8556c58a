"""Images -> the model's pixel inputs under a `Resolution`: one call for the dataset, chat and serving.

`prepare_images(images, res, processor, n_images=None) -> dict[str, Tensor]` takes one sample's images
(PIL RGB, in span order) and returns the keys `VLM.forward` reads, the collator concatenates image by image:
- fixed:          `pixel_values` [N, 3, S, S] (the processor's square; today's input, nothing else);
- anyres:         `pixel_values` [sum crops, 3, S, S] (each image's base view, then its tiles row-major),
                  `image_sizes` LongTensor [N, 2] (height, width of the image as given), `image_crops`
                  LongTensor [N] (crops per image);
- native, naflex: `pixel_values` [sum patches, 3, p, p] (each image's patch grid row-major), `image_sizes`
                  [N, 2], `image_grid` LongTensor [N, 2] (patch rows, cols).
A sample without images gets `{}` (fixed mode: the processor's empty [0, 3, S, S]).
`n_images` is the number of images in the sample (the multi-image policy of anyres), default len(images).
Every image's count agrees with `res.layout(width, height, n_images)` (asserted), the rule rendering used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from .anyres import anyres_pixels
from .native import native_pixels
from .processor import ImageProcessor
from .resolution import Resolution

META_KEYS = ("image_sizes", "image_crops", "image_grid")  # per-image LongTensor rows, concatenated by the collator
PIXEL_FNS: dict[str, Callable[[Image.Image, Resolution, ImageProcessor, int], torch.Tensor]] = {
    "anyres": anyres_pixels,  # base view + tiles
    "native": native_pixels,  # smart_resize, patch rows
    "naflex": native_pixels,  # NaFlex size, patch rows
}


def prepare_images(images: Sequence[Image.Image], res: Resolution, processor: ImageProcessor,
                   n_images: int | None = None) -> dict[str, torch.Tensor]:
    """One sample's images -> {pixel_values, and the per-image keys of its mode} (module docstring)."""
    if res.mode == "fixed":
        return {"pixel_values": processor(list(images))}  # [N, 3, S, S]
    if res.mode not in PIXEL_FNS:
        raise ValueError(f"resolution mode {res.mode!r} has no pixel function in visual.pixels.PIXEL_FNS")
    if not images:
        return {}  # a text-only sample: no pixel key at all
    n = len(images) if n_images is None else int(n_images)
    pix, sizes, crops, grids = [], [], [], []
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise TypeError(f"image {i}: expected a PIL.Image, got {type(img).__name__}")
        if img.mode != "RGB":
            raise ValueError(f"image {i}: mode is {img.mode!r}; convert to 'RGB' before preprocessing")
        w, h = img.size
        lay = res.layout(w, h, n)
        rows = PIXEL_FNS[res.mode](img, res, processor, n)  # [crops or patches, 3, s, s]
        expected = lay.crops if res.mode == "anyres" else lay.grid[0] * lay.grid[1]
        assert rows.shape[0] == expected, f"{res.mode}: {rows.shape[0]} rows for a {w}x{h} image, rule says {expected}"
        pix.append(rows)
        sizes.append((h, w))
        crops.append(lay.crops)
        grids.append(lay.grid)
    out = {"pixel_values": torch.cat(pix),
           "image_sizes": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)}
    if res.mode == "anyres":
        out["image_crops"] = torch.tensor(crops, dtype=torch.long)
    else:
        out["image_grid"] = torch.tensor(grids, dtype=torch.long).reshape(-1, 2)
    return out
