"""Image preprocessing for a tower: PIL RGB images -> normalised FloatTensor [N, 3, size, size].

Modes:
- "pad"    LLaVA's expand-to-square: paste the image centred on a square canvas filled with the mean colour
           (mean * 255, or `pad_color` * 255), then resize to size x size. Keeps the whole image and its
           aspect ratio.
- "resize" plain resize to size x size (aspect ratio not kept; SigLIP's own preprocessing).
- "crop"   resize the shorter side to size / crop_pct, then center-crop size x size (CLIP's and timm's
           eval preprocessing).
Images must already be RGB (the dataset converts modes); anything else raises naming the image index.
`to_dict()` / `ImageProcessor(**d)` round-trip the facts so a checkpoint can restore them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

MODES = ("pad", "resize", "crop")
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# PIL's integer codes, as transformers' preprocessor_config.json stores them ("resample": 3).
_RESAMPLE_BY_CODE = {int(v): k for k, v in RESAMPLE.items()}


def resample_name(resample: str | int) -> str:
    """Normalise a PIL code (3) or a name ("bicubic", "BICUBIC") to a key of RESAMPLE."""
    if isinstance(resample, int):
        if resample not in _RESAMPLE_BY_CODE:
            raise ValueError(f"unknown PIL resample code {resample}; valid: {sorted(_RESAMPLE_BY_CODE)}")
        return _RESAMPLE_BY_CODE[resample]
    name = str(resample).lower()
    if name not in RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; valid: {sorted(RESAMPLE)}")
    return name


class ImageProcessor:
    """`__call__(list[PIL.Image]) -> FloatTensor [N, 3, size, size]`, normalised with mean/std."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        mode: str = "pad",
        resample: str | int = "bicubic",
        crop_pct: float = 1.0,
        pad_color: Sequence[float] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"image mode {mode!r} is not one of {MODES}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values, got mean={mean} std={std}")
        assert int(size) > 0 and 0 < crop_pct <= 1.0, f"bad size={size} / crop_pct={crop_pct}"
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.mode = mode
        self.resample = resample_name(resample)
        self.crop_pct = float(crop_pct)
        # pad fill in 0..1; LLaVA's choice (the mean) unless given, e.g. by MultiTower whose mean is 0
        self.pad_color = tuple(float(c) for c in (self.mean if pad_color is None else pad_color))
        assert len(self.pad_color) == 3, f"pad_color needs 3 values, got {pad_color}"

    def to_dict(self) -> dict:
        return {
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "mode": self.mode,
            "resample": self.resample,
            "crop_pct": self.crop_pct,
            "pad_color": list(self.pad_color),
        }

    def __repr__(self) -> str:
        return f"ImageProcessor({self.to_dict()})"

    # ----- geometry ----------------------------------------------------------------------------------
    def _square(self, img: Image.Image) -> Image.Image:
        s, rs = self.size, RESAMPLE[self.resample]
        if self.mode == "resize":
            return img.resize((s, s), rs)
        if self.mode == "pad":
            w, h = img.size
            side = max(w, h)
            fill = tuple(int(c * 255) for c in self.pad_color)  # LLaVA: background = mean colour in 0..255
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(img, ((side - w) // 2, (side - h) // 2))
            return canvas.resize((s, s), rs)
        # crop: shorter side -> size / crop_pct, then the centre size x size window
        w, h = img.size
        short = math.floor(s / self.crop_pct)
        if w <= h:
            nw, nh = short, max(short, round(h * short / w))
        else:
            nw, nh = max(short, round(w * short / h)), short
        img = img.resize((nw, nh), rs)
        left, top = round((nw - s) / 2), round((nh - s) / 2)
        return img.crop((left, top, left + s, top + s))

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        out = []
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise TypeError(f"image {i}: expected a PIL.Image, got {type(img).__name__}")
            if img.mode != "RGB":
                raise ValueError(f"image {i}: mode is {img.mode!r}; convert to 'RGB' before preprocessing")
            arr = np.asarray(self._square(img), dtype=np.float32) / 255.0  # [S, S, 3] in 0..1
            out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))  # [3, S, S]
        if not out:
            return torch.empty(0, 3, self.size, self.size)
        x = torch.stack(out)  # [N, 3, S, S]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std
