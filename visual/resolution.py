"""How an image of a given size becomes tower inputs and LM tokens: the one rule every part of the project asks.

Rendering (how many placeholders), truncation and packing (span lengths), the budgets, the plan, serving and
the collator all call `Resolution.layout(width, height, n_images)`; nothing else computes a token count.

Modes (`Resolution.mode`):
- "fixed"  (default; no resolution key set) every image is one square crop of the tower's `image_size` and gets
           `tokens_per_crop` tokens, whatever its size. Today's behaviour, unchanged.
- "anyres" LLaVA-NeXT: the image's best resolution among `pinpoints` ((height, width) pairs) is chosen
           (`select_best_resolution`: most effective pixels, then least waste), the image is resized into it
           keeping its aspect ratio, padded, and cut into `image_size` tiles; the tower also sees the whole
           image resized to one square (the base view, first). The tiles' patch grids are joined into one
           feature map, the padding rows/columns are removed again ("unpad", to the original aspect ratio)
           and a learned `image_newline` vector closes each row. Tokens = base + rows * (cols + newline).
           `anyres_max` (LLaVA-OneVision's `anyres_max_N`) bilinearly shrinks a feature map of more than
           N base views' worth of rows*cols. `multi_image="base"` gives an image of a sample with several
           images the base view only (LLaVA-NeXT-Interleave's choice): tokens = base (+1 newline).
- "native" Qwen2-VL's `smart_resize`: height and width rounded to multiples of patch*merge, total pixels kept
           within [min_pixels, max_pixels], aspect ratio kept as closely as possible; the tower (position
           embeddings interpolated) reads the (H/patch) x (W/patch) grid and the projector merges each
           merge x merge block into one token: tokens = (H/patch) * (W/patch) / merge**2.
- "naflex" SigLIP2 NaFlex: the largest size whose sides are multiples of patch with at most `max_num_patches`
           patches (a binary search on the scale, as transformers' Siglip2ImageProcessor does); tokens =
           (H/patch) * (W/patch) <= max_num_patches.

Sizes are (width, height) in pixels as PIL reports them, after EXIF orientation (dataset/images.py
`image_size`). `layout` returns an `ImageLayout`: `tokens` (placeholders in the text), `crops` (tower rows
for crop modes: 1 base + tiles), `grid` (rows, cols of the final feature map before newlines, or the patch
grid for native/naflex), and `resize` (the (width, height) the pixels are resized to before cropping or
patching).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MODES = ("fixed", "anyres", "native", "naflex")
MULTI_IMAGE = ("base", "anyres")


def select_best_resolution(height: int, width: int, pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) among `pinpoints` that keeps most of the image's pixels, then wastes the least.
    Same rule and tie-break (first wins) as LLaVA-NeXT."""
    best, best_eff, best_waste = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(ph), int(pw)), eff, waste
    assert best is not None, f"no pinpoint fits an image of {width}x{height}: {pinpoints}"
    return best


def unpadded_grid(height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
    """Rows x cols of a padded feature map -> the rows x cols that cover the image itself (LLaVA-NeXT's
    unpad: the padding was split evenly on both sides, so an even number of lines goes)."""
    if width / height > cols / rows:  # wider than the map: rows were padded
        new_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    return rows, cols


def anyres_max_grid(rows: int, cols: int, base_tokens: int, anyres_max: int | None) -> tuple[int, int]:
    """LLaVA-OneVision's cap: a map of more than `anyres_max` base views' tokens is shrunk by the ratio
    sqrt(rows*cols / (anyres_max*base)) when that ratio exceeds 1.1 (then int(rows // r), int(cols // r))."""
    if not anyres_max:
        return rows, cols
    ratio = math.sqrt(rows * cols / (anyres_max * base_tokens))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's rule: (height, width) -> (H, W), multiples of `factor`, H*W within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an image of {width}x{height} has an aspect ratio over 200; crop it first")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return int(h), int(w)


def naflex_size(height: int, width: int, patch: int, max_num_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """SigLIP2 NaFlex: the largest (H, W), multiples of `patch` (at least one patch each), with
    (H/patch)*(W/patch) <= max_num_patches, found by bisecting the scale as transformers does."""

    def side(scale: float, n: int) -> int:
        return max(patch, math.ceil(n * scale / patch) * patch)

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (side(mid, height) / patch) * (side(mid, width) / patch) <= max_num_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, height), side(lo, width)


@dataclass(frozen=True)
class ImageLayout:
    tokens: int  # placeholders this image takes in the text
    crops: int  # tower rows for crop modes (fixed: 1; anyres: 1 base + tiles); 1 for native/naflex
    grid: tuple[int, int]  # anyres: final feature rows x cols before newlines; native/naflex: patch grid
    resize: tuple[int, int]  # (width, height) the pixels are resized to (anyres: the best resolution)


@dataclass(frozen=True)
class Resolution:
    """The resolution settings of a model plus the tower facts they need. Build with `from_config`."""

    mode: str = "fixed"
    image_size: int = 0  # the tower's square input side (fixed / anyres crops)
    patch_size: int = 0  # pixels per patch side (native / naflex; anyres: image_size // grid)
    grid: tuple[int, int] = (0, 0)  # the tower's patch grid for one square crop
    tokens_per_crop: int = 0  # the projector's rows for one square crop (fixed mode's count)
    pinpoints: tuple[tuple[int, int], ...] = field(default_factory=tuple)  # anyres (height, width) choices
    image_newline: bool = True  # anyres: a learned vector after each row
    multi_image: str = "base"  # anyres: "base" = base view only when a sample has several images
    anyres_max: int | None = None  # anyres: at most this many base views' tokens (OneVision)
    min_pixels: int = 56 * 56  # native
    max_pixels: int = 28 * 28 * 1280  # native
    merge: int = 2  # native: merge x merge patches -> one token (projector pixel shuffle)
    max_num_patches: int = 256  # naflex

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"resolution mode {self.mode!r} is not one of {MODES}")
        if self.multi_image not in MULTI_IMAGE:
            raise ValueError(f"multi_image={self.multi_image!r} is not one of {MULTI_IMAGE}")
        if self.mode == "anyres" and not self.pinpoints:
            raise ValueError("anyres needs image_grid_pinpoints: a list of [height, width] resolutions")
        if self.mode == "anyres" and self.tokens_per_crop != self.grid[0] * self.grid[1]:
            raise ValueError(f"anyres needs towers that return the patch grid only ({self.grid[0]}x{self.grid[1]}"
                             f" = {self.grid[0] * self.grid[1]} rows, got {self.tokens_per_crop}): use select=patch")
        for ph, pw in self.pinpoints:
            if ph % self.image_size or pw % self.image_size:
                raise ValueError(f"image_grid_pinpoints entry [{ph}, {pw}] is not a multiple of the tower's "
                                 f"image size {self.image_size}")
        if self.mode == "native" and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} > max_pixels={self.max_pixels}")

    @property
    def variable(self) -> bool:
        return self.mode != "fixed"

    def layout(self, width: int, height: int, n_images: int = 1) -> ImageLayout:
        """The one count: an image of width x height, in a sample holding `n_images` images."""
        if width < 1 or height < 1:
            raise ValueError(f"an image of {width}x{height} has no pixels")
        if self.mode == "fixed":
            s = self.image_size
            return ImageLayout(self.tokens_per_crop, 1, self.grid, (s, s))
        if self.mode == "anyres":
            return self._anyres(width, height, n_images)
        if self.mode == "native":
            f = self.patch_size * self.merge
            h, w = smart_resize(height, width, f, self.min_pixels, self.max_pixels)
            gh, gw = h // self.patch_size, w // self.patch_size
            return ImageLayout(gh * gw // self.merge**2, 1, (gh, gw), (w, h))
        h, w = naflex_size(height, width, self.patch_size, self.max_num_patches)
        gh, gw = h // self.patch_size, w // self.patch_size
        return ImageLayout(gh * gw, 1, (gh, gw), (w, h))

    def tokens(self, width: int, height: int, n_images: int = 1) -> int:
        return self.layout(width, height, n_images).tokens

    def _anyres(self, width: int, height: int, n_images: int) -> ImageLayout:
        s, (gh, gw) = self.image_size, self.grid
        base = gh * gw
        if n_images > 1 and self.multi_image == "base":
            return ImageLayout(base + int(self.image_newline), 1, (gh, gw), (s, s))
        bh, bw = select_best_resolution(height, width, list(self.pinpoints))
        tr, tc = -(-bh // s), -(-bw // s)  # tiles per column / row
        rows, cols = unpadded_grid(height, width, tr * gh, tc * gw)
        rows, cols = anyres_max_grid(rows, cols, base, self.anyres_max)
        return ImageLayout(base + rows * (cols + int(self.image_newline)), 1 + tr * tc, (rows, cols), (bw, bh))

    # ----- sweeps for the plan ------------------------------------------------------------------------
    def max_tokens(self, n_images: int = 1) -> int:
        """The most tokens any image can get (the plan's worst case), from the formula, not a sweep:
        anyres: an image of exactly the pinpoint's size loses nothing to unpadding, and no image maps
        to more rows x cols than its chosen pinpoint, so the maximum is over the pinpoints themselves;
        native: the largest a*b <= max_pixels / (patch*merge)**2 with an aspect ratio <= 200 (an image of
        a*f x b*f pixels is kept as is); naflex: max_num_patches (an image of 1 x max_num_patches patches)."""
        if self.mode == "fixed":
            return self.tokens_per_crop
        if self.mode == "anyres":
            if n_images > 1 and self.multi_image == "base":
                return self.tokens(self.image_size, self.image_size, n_images)
            return self._anyres_max_tokens()
        if self.mode == "native":
            f = self.patch_size * self.merge
            n = self.max_pixels // f**2
            best = max(a * (n // a) for a in range(1, math.isqrt(n) + 1) if (n // a) <= 200 * a)
            if 200 * f * f > self.max_pixels:  # smart_resize keeps one row of f when the short side
                best = max(best, math.isqrt(200 * self.max_pixels) // f)  # floors to 0: up to sqrt(200*max)/f
            return best
        return self.max_num_patches

    def _anyres_max_tokens(self) -> int:
        """Without a cap: the largest pinpoint map. With `anyres_max` the shrink is not monotonic, so every
        map unpadding can leave (an even number of lines removed from one side) is tried."""
        s, (gh, gw), nl = self.image_size, self.grid, int(self.image_newline)
        best = 0
        for ph, pw in self.pinpoints:
            rows, cols = ph // s * gh, pw // s * gw
            maps = {(rows, cols)}
            if self.anyres_max:
                maps |= {(rows - 2 * k, cols) for k in range(rows // 2 + 1)}
                maps |= {(rows, cols - 2 * k) for k in range(cols // 2 + 1)}
            for r, c in maps:
                r, c = anyres_max_grid(r, c, gh * gw, self.anyres_max)
                best = max(best, gh * gw + r * (c + nl))
        return best

    def token_range(self, sizes: list[tuple[int, int]] | None = None) -> tuple[int, int]:
        """(min, max) tokens per image over `sizes` ((width, height) pairs), by default over a sweep of
        aspect ratios 1:8..8:1 at several scales (the plan's min / max)."""
        sizes = sizes or sweep_sizes(self)
        counts = [self.tokens(w, h) for w, h in sizes]
        return min(counts), max(counts)


def sweep_sizes(res: Resolution) -> list[tuple[int, int]]:
    """(width, height) pairs covering aspect ratios 1:8..8:1 from small to the largest pinpoint / pixel cap."""
    if res.mode == "anyres":
        top = max(max(p) for p in res.pinpoints) * 2
    elif res.mode == "native":
        top = int(math.sqrt(res.max_pixels)) * 3
    else:
        top = max(res.image_size, res.patch_size * int(math.sqrt(max(res.max_num_patches, 1)))) * 3
    sizes = [(pw, ph) for ph, pw in res.pinpoints]  # anyres: each pinpoint's own size (its maximum)
    for scale in (0.25, 0.5, 1.0):
        long = max(16, int(top * scale))
        for ratio in (1, 1.5, 2, 3, 4, 8):
            short = max(8, int(long / ratio))
            sizes += [(long, short), (short, long)]
    return sizes
