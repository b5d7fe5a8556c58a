"""LLaVA-NeXT anyres pixels: one PIL image -> its crops for the tower, the base view first.

Contract:
- `anyres_pixels(image, res, processor, n_images=1) -> FloatTensor [crops, 3, S, S]` with
  `crops == res.layout(w, h, n_images).crops` (S = `res.image_size`, the tower's side):
  row 0 is the base view (the whole image resized to S x S, aspect ratio not kept: LLaVA-NeXT's choice,
  whatever the processor's `mode`), then the tiles row-major: the image resized into its best pinpoint
  (`visual.resolution.select_best_resolution`) keeping its aspect ratio (the long side fills it, the other
  side is ceil-rounded), pasted centred on a black canvas of the pinpoint's size, cut into S x S tiles.
  With `res.multi_image == "base"` and `n_images > 1` only the base view is returned (1 crop).
  Resampling, mean and std are the processor's (`ImageProcessor.resample / mean / std`); pixels are
  scaled to 0..1 and normalised as the processor does. Equal to transformers' `LlavaNextImageProcessorPil`
  (the PIL backend; `LlavaNextImageProcessor` is the torchvision one) within 1e-6 when its size,
  crop_size, resample, mean and std are the same.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .processor import RESAMPLE, ImageProcessor
from .resolution import Resolution, select_best_resolution


def fit_size(width: int, height: int, target_h: int, target_w: int) -> tuple[int, int]:
    """(width, height) of the image resized into target_h x target_w keeping its aspect ratio: the side with
    the smaller scale fills the target, the other is ceil-rounded and capped (transformers' rule)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return target_w, min(math.ceil(height * scale_w), target_h)
    return min(math.ceil(width * scale_h), target_w), target_h


def _normalise(crops: list[Image.Image], processor: ImageProcessor) -> torch.Tensor:
    """S x S RGB crops -> [n, 3, S, S], scaled to 0..1 then (x - mean) / std."""
    x = torch.stack([torch.from_numpy(np.asarray(c, dtype=np.float32) / 255.0).permute(2, 0, 1) for c in crops])
    mean = torch.tensor(processor.mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.std).view(1, 3, 1, 1)
    return (x - mean) / std  # [n, 3, S, S]


def anyres_pixels(image: Image.Image, res: Resolution, processor: ImageProcessor, n_images: int = 1) -> torch.Tensor:
    """The base view, then the tiles row-major: [crops, 3, S, S] (see the module docstring)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"anyres_pixels: expected a PIL.Image, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"anyres_pixels: image mode is {image.mode!r}; convert to 'RGB' before preprocessing")
    if res.mode != "anyres":
        raise ValueError(f"anyres_pixels needs a Resolution in anyres mode, got mode {res.mode!r}")
    s, rs = res.image_size, RESAMPLE[processor.resample]
    width, height = image.size
    layout = res.layout(width, height, n_images)
    crops = [image.resize((s, s), rs)]  # the base view: the whole image squeezed to S x S
    if layout.crops > 1:
        bh, bw = select_best_resolution(height, width, list(res.pinpoints))
        nw, nh = fit_size(width, height, bh, bw)
        canvas = Image.new("RGB", (bw, bh), (0, 0, 0))  # padding is black (0 before normalisation)
        canvas.paste(image.resize((nw, nh), rs), ((bw - nw) // 2, (bh - nh) // 2))
        crops += [canvas.crop((left, top, left + s, top + s)) for top in range(0, bh, s) for left in range(0, bw, s)]
    assert len(crops) == layout.crops, (len(crops), layout)
    return _normalise(crops, processor)  # [crops, 3, S, S]
