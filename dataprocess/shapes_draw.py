"""Drawing primitives of the synthetic shapes dataset: 4 flat colours x 4 shapes on a white canvas.

Shapes are drawn with PIL ImageDraw without anti-aliasing, so every non-background pixel has exactly
one of the `COLOURS` values (tests and a tiny CNN can rely on that). A shape of half-size `r` centred
at (cx, cy) stays inside the box [cx-r, cx+r] x [cy-r, cy+r].
"""

from __future__ import annotations

from PIL import Image, ImageDraw

BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: int, cy: int, r: int) -> None:
    """Draw one filled shape of half-size `r` centred at (cx, cy)."""
    fill = COLOURS[colour]
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        # a little smaller than the box so its area is close to the circle's (shape, not size, differs)
        s = round(r * 0.85)
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "cross":
        w = max(1, round(r * 0.35))  # half the arm width
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")  # a bug: shapes come from SHAPES


def render(size: int | tuple[int, int], items: list[tuple[str, str, int, int, int]]) -> Image.Image:
    """A `size` x `size` (or `size` = (width, height)) RGB image with the given (shape, colour, cx, cy, r)
    items drawn in order."""
    img = Image.new("RGB", (size, size) if isinstance(size, int) else tuple(size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for shape, colour, cx, cy, r in items:
        draw_shape(draw, shape, colour, cx, cy, r)
    return img
