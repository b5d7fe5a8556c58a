"""Load an image for the cache (via `dataset.images.load_image`) and the three square transforms.

`load_rgb(path, max_pixels)`: the dataset's own loader, so the cache sees exactly what training would
(EXIF orientation; every mode -> RGB with transparency over white and 16-bit scaled; the pixel limit
checked from the header before decoding); any failure raises `ImageError` naming the file.

`square(image, size, mode, fill)`: `pad` = LLaVA's expand-to-square (centred, filled with `fill`) then
resize; `resize` = plain resize (aspect ratio not kept); `crop` = shortest side to `size` then a
centre crop. All return a `size` x `size` RGB image.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..dataset.images import MAX_PIXELS, load_image
from ..dataset.sample import BadSampleError
from .common import SourceError

DEFAULT_MAX_PIXELS = MAX_PIXELS
MODES = ("pad", "resize", "crop")
# CLIP's normalisation mean in 0-255: LLaVA pads with it so the pad is ~0 after normalisation.
CLIP_MEAN_RGB = (122, 116, 104)


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` to an upright RGB image; raises ImageError (naming the file) on any failure."""
    try:
        return load_image(str(path), max_pixels=max_pixels)
    except BadSampleError as e:
        raise ImageError(str(e)) from None
    except Exception as e:  # anything else PIL throws on an odd file is still one bad file, not a crash
        raise ImageError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def parse_fill(text: str) -> tuple[int, int, int]:
    """'mean' (CLIP mean colour), 'white', 'black' or 'R,G,B' -> an RGB tuple."""
    named = {"mean": CLIP_MEAN_RGB, "white": (255, 255, 255), "black": (0, 0, 0)}
    if text in named:
        return named[text]
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and 0 <= int(p) <= 255 for p in parts):
        raise SourceError(f"pad colour {text!r}: expected mean, white, black or R,G,B with 0-255 values")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def square(img: Image.Image, size: int, mode: str = "pad",
           fill: tuple[int, int, int] = CLIP_MEAN_RGB) -> Image.Image:
    """Make a `size` x `size` RGB image from `img` by `mode` (pad | resize | crop)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")  # a bug: the CLI offers MODES only
    assert size > 0, f"size must be positive, got {size}"
    w, h = img.size
    if mode == "pad":
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        return canvas.resize((size, size), Image.BICUBIC)
    if mode == "resize":
        return img.resize((size, size), Image.BICUBIC)
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))
