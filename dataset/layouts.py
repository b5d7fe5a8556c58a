"""One sample's image token counts in a variable resolution mode, and the image-token budget.

The count of an image is `Resolution.layout(width, height, n_images).tokens` (visual/resolution.py, the one
rule). dataset/ sits below visual/ in the layers, so the dataset receives that `Resolution` object and calls
it here, duck-typed as `TokenRule`; nothing here computes a count of its own.

`plan_sample(rule, images, videos, frames_per_video, budget=None, policy="downscale") -> MediaPlan`
- `images` / `videos`: (width, height) of each of the sample's images (EXIF-rotated, as `load_image` returns
  them: dataset/images.py `image_size`) and of each video's frames, in `sample.images` / `sample.videos`
  order. `n_spans` = images + videos x frames_per_video: every layout of the sample is asked with that
  `n_images` (the multi-image policy of anyres), and the pixel side must be asked the same
  (`prepare_images(..., n_images=plan.n_spans)`).
- `budget` (`max_image_tokens`, image tokens over all the sample's media): a sample above it is either
  downscaled, every image and frame shrunk by one common factor (the largest that fits, found by bisection;
  sizes `max(1, round(side * factor))`; the pixels are resized to exactly `plan.size(kind, index)`, so the
  count and the pixels agree), or, with `policy="skip"` or when even 1-pixel-scale images do not fit,
  refused with `BadSampleError(kind="image_budget")`: the dataset skips and counts it, the run goes on.
- `sample_image_budget(max_image_tokens, max_batch_image_tokens, per_batch)`: the per-sample budget that
  keeps a micro-batch of `per_batch` samples (or packs) within `max_batch_image_tokens` as well.
- `MediaPlan.count(kind, index)` is the `(kind, index) -> int` function `render` takes; `total` the
  sample's image tokens (videos: each frame counted); `factor` < 1 and `tokens_before` record a downscale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from .sample import BadSampleError

Size = tuple[int, int]  # (width, height) in pixels
POLICIES = ("downscale", "skip")


class TokenRule(Protocol):
    """What the data path uses of `visual.resolution.Resolution`."""

    mode: str

    @property
    def variable(self) -> bool: ...

    def layout(self, width: int, height: int, n_images: int = 1): ...  # -> ImageLayout (.tokens)


@dataclass(frozen=True)
class MediaPlan:
    images: tuple[Size, ...]  # size each image is handed to the pixel function in, sample.images order
    videos: tuple[Size, ...]  # size of each video's frames, sample.videos order
    image_tokens: tuple[int, ...]  # placeholders per image
    video_tokens: tuple[int, ...]  # placeholders per frame of each video
    n_spans: int  # images + video frames of the sample: the n_images of every layout
    frames_per_video: int
    factor: float = 1.0  # < 1: downscaled to fit the budget
    tokens_before: int = 0  # image tokens at the files' own sizes

    def count(self, kind: str, index: int) -> int:
        return self.image_tokens[index] if kind == "image" else self.video_tokens[index]

    def size(self, kind: str, index: int) -> Size:
        return self.images[index] if kind == "image" else self.videos[index]

    @property
    def total(self) -> int:
        return sum(self.image_tokens) + self.frames_per_video * sum(self.video_tokens)


def scaled(size: Size, factor: float) -> Size:
    if factor >= 1.0:
        return size
    return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))


def _counts(rule: TokenRule, sizes: Sequence[Size], n: int) -> tuple[int, ...]:
    return tuple(int(rule.layout(w, h, n).tokens) for w, h in sizes)


def _plan(rule: TokenRule, images: Sequence[Size], videos: Sequence[Size], k: int, factor: float,
          before: int | None = None) -> MediaPlan:
    """Sizes scaled by `factor` and their counts; `before` None = these are the files' own sizes."""
    n = len(images) + k * len(videos)
    imgs, vids = tuple(scaled(s, factor) for s in images), tuple(scaled(s, factor) for s in videos)
    plan = MediaPlan(imgs, vids, _counts(rule, imgs, n), _counts(rule, vids, n), n, k, factor)
    return replace(plan, tokens_before=plan.total if before is None else before)


def downscale_factor(rule: TokenRule, images: Sequence[Size], videos: Sequence[Size], k: int,
                     budget: int) -> float | None:
    """The largest common factor in (0, 1) whose sizes fit `budget` (bisection; the lower end always fits,
    so the answer fits even where counts are not monotone in the size), or None when nothing fits."""
    longest = max(max(s) for s in (*images, *videos))
    lo, hi = 1.0 / longest, 1.0  # lo: every side about one pixel

    def fits(f: float) -> bool:
        return _plan(rule, images, videos, k, f).total <= budget

    if not fits(lo):
        return None
    while (hi - lo) * longest > 0.25:  # below a quarter pixel on the longest side nothing changes
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan_sample(rule: TokenRule, images: Sequence[Size], videos: Sequence[Size], frames_per_video: int,
                budget: int | None = None, policy: str = "downscale", where: str = "sample") -> MediaPlan:
    """The sample's sizes and counts under `rule`, within `budget` (module docstring)."""
    try:
        plan = _plan(rule, images, videos, frames_per_video, 1.0)
        if budget is None or plan.total <= budget:
            return plan
        if policy == "downscale":
            factor = downscale_factor(rule, images, videos, frames_per_video, budget)
            if factor is not None:
                return _plan(rule, images, videos, frames_per_video, factor, before=plan.total)
            why = "even shrunk to a few pixels"
        else:
            why = "over_budget=skip"
    except ValueError as e:  # the rule refuses a size (e.g. native: aspect ratio over 200)
        raise BadSampleError(f"{where}: {e}", "bad_image") from e
    raise BadSampleError(f"{where}: {plan.total} image tokens ({rule.mode}) exceed the budget of {budget} "
                         f"(max_image_tokens / max_batch_image_tokens) {why}: skipped", "image_budget")


def sample_image_budget(max_image_tokens: int | None, max_batch_image_tokens: int | None,
                        per_batch: int) -> int | None:
    """The per-sample budget the dataset holds each sample to: `max_image_tokens`, and at most
    `max_batch_image_tokens // per_batch` so that any `per_batch` samples (or packs) of a micro-batch stay
    within the batch budget together. None = no budget (a cap below 1 is refused by the dataset)."""
    caps = [c for c in (max_image_tokens, None if max_batch_image_tokens is None
                        else max_batch_image_tokens // max(1, per_batch)) if c is not None]
    return min(caps) if caps else None
