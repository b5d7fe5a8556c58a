"""`VLMDataset`: data files -> rendered, image-loaded training items, skipping bad samples.

`VLMDataset(paths, tokenizer, image_processor, tokens_per_image, image_folder=None, video_folder=None,
max_length=None, mode="chat", strict=False, frames_per_video=4, system_prompt=None, ...)`

- `tokenizer`: the model's `ChatFormat` (`VLM.chat_format`: its chat template and special ids), or a
  Qwen tokenizer (ChatML); see dataset/rendering.py.

- `paths`: one path, or a list whose entries are a path, `(path, weight)` or
  `{"path", "weight", "image_folder", "video_folder"}`. A weight w keeps the file's samples
  round(w * n) times in the index: whole copies plus a seeded random subset (w=0.5 -> half, w=2 -> twice).
- Records are read and normalised at construction (cheap, no image is opened).
- `item = dataset[i]` is a dict: `input_ids` LongTensor [T], `labels` LongTensor [T], `pixel_values`
  FloatTensor [n_spans, 3, H, W] in span order (or None for a text-only sample), `n_images` (= n_spans),
  `id`, and `skipped` (the skip records produced while building this item, see below).
- Bad samples: any `BadSampleError` (bad record, bad image, too long, ...) in non-strict mode is recorded
  (`skipped`: id, file, position, kind, reason), logged once with its reason, and the next index is tried
  instead (deterministic), so a long run never dies on data; after `max_retries` consecutive bad samples
  it raises (the data is broken, not a sample). `strict=True` raises at the first bad sample.

Skips and DataLoader workers (the choice made here): each worker holds its own copy of the dataset, so
a skip recorded in a worker is invisible to the main process. Two mechanisms keep the report reachable:
1. `validate()` pre-scans in the main process (normalise, render with `max_length`, check media files
   exist and their headers are readable and under the pixel limit; no pixel is decoded). Bad samples
   found there are removed from the index and recorded; most data problems are caught here.
2. Skips that still happen in `__getitem__` ride along with the item (`item["skipped"]`); the collator
   moves them to `batch.skipped`, and the training loop hands them back with `dataset.absorb(...)`.
   Each worker also logs every skip as it happens.
`skip_report()` then returns the counts by kind (and the first few reasons) for the end of the run.
A data set left with no usable sample raises `NoUsableDataError` (a UserError) with the counts by reason
and, for samples too long, the longest one's length and the keys that change it.

Truncation: a sample shortened to fit `max_length` (whole trailing turns dropped, with their images) is
recorded in `truncated` and counted in `skip_report()` (`truncated_samples`, `dropped_turns`,
`dropped_images`, `truncated_examples`). `validate()` meets every sample in this process; without it,
truncations in DataLoader workers are logged by the workers only.

`feature_cache=DIR` (a directory from `python -m qwenvl_lab.dataprocess.cache_features`): items carry
`image_features` FloatTensor [n_spans, T, C] (the frozen towers' output) and `pixel_values` None; no
image is decoded. An image missing from the cache (or a video) is a bad sample (kind `no_feature`).

Variable tokens per image (`resolution=`, a `visual.resolution.Resolution` whose mode is not "fixed";
None or a fixed one = today's int `tokens_per_image` for every image, nothing below applies):
- each media file's size comes from its header (`image_size`, EXIF-rotated as `load_image` returns it;
  a video's frame size from its stream header), read once per path, never a decoded pixel; the counts are
  `resolution.layout(w, h, n)` with n = the sample's images + video frames (dataset/layouts.py), passed to
  `render` as its `(kind, index) -> int` function. `validate()` and `__getitem__` compute them the same way,
  so validated lengths are the built lengths.
- `__getitem__` loads the images, resizes any whose size differs from the planned one (a downscale) and calls
  `prepare_images(images, resolution, image_processor, n)` (visual.pixels.prepare_images, handed in by the
  caller because dataset/ sits below visual/): the item holds its `pixel_values` and per-image keys
  (`image_sizes`, `image_crops` or `image_grid`; none of them for a text-only sample: `pixel_values` None).
- `feature_cache` is refused (cached features have one fixed shape per image).
Budget (`max_image_tokens`: image tokens over all the media a sample names, any mode): a sample above it is
downscaled (`over_budget="downscale"`, variable modes: every image shrunk by one common factor, recorded in
`downscaled` and counted in `skip_report()` as `downscaled_samples`) or skipped and counted (kind
`image_budget`; always so in fixed mode, whose count does not depend on the size). trainer/run.py derives
the per-sample budget from `max_batch_image_tokens` too (see there).

`lengths` gives one length per index entry for length-grouped sampling: `estimate_length` (byte-count
approximation) until `validate()` has run, exact token counts afterwards. In a variable resolution mode the
estimate gives every image the most tokens an image can get (`Resolution.max_tokens`, no image is opened):
an upper bound, so packs built from it never exceed max_length (a square crop's count would underestimate).
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from ..core.errors import UserError
from .feature_cache import FeatureCache, refuse_variable_resolution
from .formats import normalize, read_records
from .images import (
    MAX_PIXELS,
    image_size,
    load_image,
    load_video_frames,
    open_header,
    too_large_message,
    video_frame_size,
)
from .layouts import POLICIES, MediaPlan, TokenRule, plan_sample
from .rendering import estimate_length, render
from .sample import BadSampleError, Sample

logger = logging.getLogger(__name__)


class NoUsableDataError(UserError, ValueError):
    """Every sample of a data set was skipped; the message gives the counts by reason."""


def _parse_paths(paths: Any, image_folder: str | None, video_folder: str | None) -> list[dict]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    specs = []
    for entry in paths:
        if isinstance(entry, (str, os.PathLike)):
            entry = {"path": entry}
        elif isinstance(entry, (tuple, list)) and len(entry) == 2:
            entry = {"path": entry[0], "weight": entry[1]}
        if not isinstance(entry, dict) or "path" not in entry:
            raise UserError(f"dataset path entry must be a path, (path, weight) or a dict with 'path': "
                             f"{entry!r}")
        unknown = set(entry) - {"path", "weight", "image_folder", "video_folder"}
        if unknown:
            raise UserError(f"dataset path entry {entry['path']}: unknown keys {sorted(unknown)}")
        weight = float(entry.get("weight", 1.0))
        if weight < 0:
            raise UserError(f"dataset path entry {entry['path']}: weight must be >= 0, got {weight}")
        specs.append({
            "path": str(entry["path"]), "weight": weight,
            "image_folder": entry.get("image_folder", image_folder),
            "video_folder": entry.get("video_folder", video_folder),
        })
    if not specs:
        raise UserError("VLMDataset: no data files given")
    return specs


class VLMDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        paths: Any,
        tokenizer,
        image_processor: Callable[[list[Image.Image]], torch.Tensor] | None,
        tokens_per_image: int,
        image_folder: str | None = None,
        video_folder: str | None = None,
        max_length: int | None = None,
        mode: str = "chat",
        strict: bool = False,
        frames_per_video: int = 4,
        system_prompt: str | None = None,
        max_pixels: int = MAX_PIXELS,
        allow_absolute_paths: bool = False,
        seed: int = 0,
        max_retries: int = 100,
        feature_cache: str | os.PathLike | None = None,
        image_token_id: int | None = None,
        resolution: TokenRule | None = None,
        prepare_images: Callable[..., dict[str, torch.Tensor]] | None = None,
        max_image_tokens: int | None = None,
        over_budget: str = "downscale",
    ):
        self.tokenizer, self.image_processor = tokenizer, image_processor  # a ChatFormat or a Qwen tokenizer
        self.image_token_id = image_token_id  # the model's placeholder; None = the tokenizer's
        self.tokens_per_image, self.max_length, self.mode = tokens_per_image, max_length, mode
        self.strict, self.frames_per_video, self.system_prompt = strict, frames_per_video, system_prompt
        self.max_pixels, self.max_retries = max_pixels, max_retries
        # Variable tokens per image (module docstring); None = fixed: `tokens_per_image` for every image.
        self.resolution = resolution if resolution is not None and resolution.variable else None
        self.prepare_images = prepare_images
        self.max_image_tokens, self.over_budget = max_image_tokens, over_budget
        self._check_resolution_keys(feature_cache)
        # Cached tower outputs instead of images (dataset/feature_cache.py); None = decode images.
        self.feature_cache = None if feature_cache is None else FeatureCache(feature_cache)
        self._sizes: dict[tuple[str, str], tuple[int, int]] = {}  # (kind, path) -> (width, height) from the header
        self.downscaled: dict[tuple[str, int], dict] = {}  # (file, position) -> factor and tokens before/after
        self._image_tokens: dict[int, int] = {}  # sample position -> image tokens (exact, from validate)
        self.samples: list[Sample] = []
        self.skipped: dict[tuple[str, int], dict] = {}  # (file, position) -> skip record
        self.truncated: dict[tuple[str, int], dict] = {}  # (file, position) -> turns/images dropped to fit
        self._paths = paths
        self.index: list[int] = []  # dataset position -> self.samples position (weights repeat entries)
        self._exact_lengths: dict[int, int] = {}
        rng = random.Random(seed)

        for spec in _parse_paths(paths, image_folder, video_folder):
            bad_lines: list[tuple[int, BadSampleError]] | None = None if strict else []
            records = read_records(spec["path"], bad_lines)
            for line, err in bad_lines or []:
                self._record(None, (spec["path"], line), err)
            first = len(self.samples)
            for pos, rec in records:
                try:
                    self.samples.append(normalize(
                        rec, pos, spec["path"], image_folder=spec["image_folder"],
                        video_folder=spec["video_folder"], allow_absolute_paths=allow_absolute_paths))
                except BadSampleError as e:
                    if strict:
                        raise
                    sid = rec.get("id") if isinstance(rec, dict) else None
                    self._record(None if sid is None else str(sid), (spec["path"], pos), e)
            own = list(range(first, len(self.samples)))
            whole, frac = divmod(spec["weight"], 1.0)
            picked = own * int(whole) + rng.sample(own, round(frac * len(own)))
            self.index += sorted(picked)
        if self.skipped:
            logger.warning("VLMDataset: %d bad record(s) skipped while reading: %s", len(self.skipped),
                           dict(Counter(r["kind"] for r in self.skipped.values())))
        if not self.index:
            raise self.no_usable_sample()

    def _check_resolution_keys(self, feature_cache) -> None:
        if self.over_budget not in POLICIES:
            raise UserError(f"over_budget={self.over_budget!r} is not one of {POLICIES}")
        if self.max_image_tokens is not None and self.max_image_tokens < 1:
            raise UserError(f"max_image_tokens (or max_batch_image_tokens / per_device_train_batch_size) must be "
                            f">= 1, got {self.max_image_tokens}")
        if self.resolution is None:
            return
        if feature_cache is not None:
            refuse_variable_resolution(self.resolution)
        if self.prepare_images is None:
            raise ValueError(f"VLMDataset: resolution mode {self.resolution.mode!r} needs prepare_images="
                             f"qwenvl_lab.visual.pixels.prepare_images (dataset/ cannot import visual/)")

    # ------------------------------------------------------------------------------------------ skips
    def _record(self, sid: str | None, source: tuple[str, int], err: BadSampleError) -> dict | None:
        key = (str(source[0]), int(source[1]))
        if key in self.skipped:
            return None  # already counted (e.g. met again in a later epoch)
        rec = {"id": sid, "file": key[0], "position": key[1], "kind": getattr(err, "kind", "bad_record"),
               "reason": str(err)}
        self.skipped[key] = rec
        logger.warning("skipping bad sample (pid %d): %s", os.getpid(), err)
        return rec

    def absorb(self, records: list[dict]) -> None:
        """Merge skip records produced in DataLoader workers (`batch.skipped`) into this object."""
        for r in records:
            self.skipped.setdefault((r["file"], r["position"]), r)

    def skip_report(self) -> dict:
        """For the end of a run: `{"skipped": n, "by_kind": {kind: count}, "examples": [first reasons],
        "truncated_samples": n, "dropped_turns": n, "dropped_images": n, "truncated_examples": [records],
        "downscaled_samples": n, "downscaled_examples": [records]}` (over-budget samples: skipped ones are
        kind `image_budget`, downscaled ones are counted apart, with their factor and tokens)."""
        recs = list(self.skipped.values())
        cut = list(self.truncated.values())
        small = list(self.downscaled.values())
        return {"skipped": len(recs), "by_kind": dict(Counter(r["kind"] for r in recs)),
                "examples": [r["reason"] for r in recs[:10]],
                "truncated_samples": len(cut), "dropped_turns": sum(r["dropped_turns"] for r in cut),
                "dropped_images": sum(r["dropped_images"] for r in cut), "truncated_examples": cut[:10],
                "downscaled_samples": len(small), "downscaled_examples": small[:10]}

    def _note_truncation(self, s: Sample, r) -> None:
        """Turns dropped to fit max_length are counted per sample (never lost silently)."""
        if not r.dropped_turns:
            return
        key = (str(s.source[0]), int(s.source[1])) if s.source else (s.id, 0)
        if key in self.truncated:
            return
        self.truncated[key] = {"id": s.id, "file": key[0], "position": key[1], "dropped_turns": r.dropped_turns,
                               "dropped_images": r.dropped_images, "kept_tokens": len(r.input_ids)}
        logger.info("%s: %d turn(s) with %d image(s) dropped to fit max_length %s", s.where, r.dropped_turns,
                    r.dropped_images, self.max_length)

    def no_usable_sample(self) -> NoUsableDataError:
        """The error for a data set whose every sample was skipped: counts by reason, and for samples too
        long, the longest one's length and the keys that change it."""
        rep = self.skip_report()
        msg = f"no usable sample in {self._paths}: {rep['skipped']} skipped {rep['by_kind']}"
        longest = max((r.get("length", 0) for r in self.skipped.values() if r["kind"] == "too_long"), default=0)
        if longest:
            per_image = (f"takes {self.tokens_per_image} tokens" if self.resolution is None else
                         f"takes the tokens its size gives in resolution mode {self.resolution.mode!r}")
            msg += (f"; the longest sample has {longest} tokens but max_length is {self.max_length} (each image "
                    f"{per_image}, each video frames_per_video={self.frames_per_video} images): raise max_length, "
                    f"or lower frames_per_video / the tokens per image (model.reduce / model.reduce_factor"
                    f"{'' if self.resolution is None else ', max_image_tokens'})")
        if rep["examples"]:
            msg += f". First: {rep['examples'][0]}"
        return NoUsableDataError(msg)

    # ------------------------------------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self.index)

    def _media_size(self, s: Sample, kind: str, path: str) -> tuple[int, int]:
        """(width, height) of an image (EXIF-rotated) or of a video's frames, from the header; cached per path."""
        key = (kind, path)
        if key not in self._sizes:
            try:
                self._sizes[key] = image_size(path, self.max_pixels) if kind == "image" else video_frame_size(path)
            except BadSampleError as e:
                raise BadSampleError(f"{s.where}: {e}", e.kind) from e
        return self._sizes[key]

    def _plan(self, s: Sample) -> MediaPlan | None:
        """Variable modes: every media's size and count within the budget (dataset/layouts.py). Fixed mode:
        None, after the budget check (a fixed count cannot be downscaled: over budget is skipped)."""
        if self.resolution is None:
            total = (len(s.images) + self.frames_per_video * len(s.videos)) * self.tokens_per_image
            if self.max_image_tokens is not None and total > self.max_image_tokens:
                raise BadSampleError(f"{s.where}: {total} image tokens exceed the budget of {self.max_image_tokens} "
                                     f"(max_image_tokens / max_batch_image_tokens); a fixed resolution cannot be "
                                     f"downscaled: skipped", "image_budget")
            return None
        plan = plan_sample(self.resolution, [self._media_size(s, "image", p) for p in s.images],
                           [self._media_size(s, "video", p) for p in s.videos], self.frames_per_video,
                           self.max_image_tokens, self.over_budget, s.where)
        if plan.factor < 1.0:
            key = (str(s.source[0]), int(s.source[1])) if s.source else (s.id, 0)
            self.downscaled.setdefault(key, {"id": s.id, "file": key[0], "position": key[1],
                                             "factor": round(plan.factor, 4), "tokens_before": plan.tokens_before,
                                             "tokens_after": plan.total})
        return plan

    def _render(self, s: Sample, plan: MediaPlan | None = None):
        counts = self.tokens_per_image if plan is None else plan.count
        r = render(s, self.tokenizer, counts, self.mode, self.max_length,
                   self.frames_per_video, self.system_prompt, image_token_id=self.image_token_id)
        self._note_truncation(s, r)
        return r

    def _span_tokens(self, r, plan: MediaPlan | None) -> int:
        """Image tokens of a rendered sample (its kept spans)."""
        if plan is None:
            return r.n_spans * self.tokens_per_image
        index = _media_indices(r.media)
        return sum(plan.count(kind, i) * (1 if kind == "image" else self.frames_per_video)
                   for (kind, _), i in zip(r.media, index, strict=True))

    def _cached_features(self, s: Sample, media: list) -> torch.Tensor | None:
        """`[n_spans, T, C]` tower outputs of the sample's images from the feature cache (or None)."""
        rows = []
        for kind, path in media:
            if kind != "image":
                raise BadSampleError(f"{s.where}: {kind} {path}: a feature cache holds images only", "no_feature")
            try:
                rows.append(self.feature_cache.get(path))  # [T, C]
            except KeyError:
                raise BadSampleError(f"{s.where}: image {path} is not in the feature cache "
                                     f"{self.feature_cache.root}", "no_feature") from None
        return torch.stack(rows) if rows else None

    def build(self, s: Sample) -> dict:
        """Render `s` and load its media; raises `BadSampleError` for any bad part."""
        plan = self._plan(s)
        r = self._render(s, plan)
        if plan is not None:
            return self._build_variable(s, r, plan)
        if self.feature_cache is not None:
            return {
                "input_ids": torch.tensor(r.input_ids, dtype=torch.long),  # [T]
                "labels": torch.tensor(r.labels, dtype=torch.long),  # [T]
                "pixel_values": None,
                "image_features": self._cached_features(s, r.media),  # [n_spans, T_img, C] | None
                "n_images": r.n_spans,
                "id": s.id,
            }
        frames = self._load_media(s, r)
        pixel_values = None
        if frames:
            if self.image_processor is None:
                raise ValueError(f"{s.where} has images but the dataset was built without an image_processor")
            pixel_values = self.image_processor(frames)  # [n_spans, 3, H, W]
            assert pixel_values.ndim == 4 and pixel_values.shape[0] == len(frames) == r.n_spans, (
                f"{s.where}: image_processor returned {tuple(pixel_values.shape)} for {len(frames)} frames "
                f"({r.n_spans} image spans in the text)")
        return {
            "input_ids": torch.tensor(r.input_ids, dtype=torch.long),  # [T]
            "labels": torch.tensor(r.labels, dtype=torch.long),  # [T]
            "pixel_values": pixel_values,
            "n_images": r.n_spans,
            "id": s.id,
        }

    def _load_media(self, s: Sample, r) -> list[Image.Image]:
        frames: list[Image.Image] = []
        for kind, path in r.media:
            try:
                if kind == "image":
                    frames.append(load_image(path, self.max_pixels))
                else:
                    frames += load_video_frames(path, self.frames_per_video)
            except BadSampleError as e:
                raise BadSampleError(f"{s.where}: {e}", e.kind) from e
        return frames

    def _build_variable(self, s: Sample, r, plan: MediaPlan) -> dict:
        """A variable-mode item: images at their planned sizes through `prepare_images` (module docstring)."""
        frames = self._load_media(s, r)
        sizes = [plan.size(kind, i) for (kind, _), i in zip(r.media, _media_indices(r.media), strict=True)
                 for _ in range(1 if kind == "image" else self.frames_per_video)]
        # A downscale (or a video frame whose decoded size differs from its header): the pixels take the size
        # the count was made from, so the text and the pixels agree.
        frames = [f if f.size == size else f.resize(size, Image.Resampling.BICUBIC)
                  for f, size in zip(frames, sizes, strict=True)]
        pix = self.prepare_images(frames, self.resolution, self.image_processor, plan.n_spans) if frames else {}
        n_rows = len(pix["image_sizes"]) if "image_sizes" in pix else r.n_spans
        assert n_rows == r.n_spans, f"{s.where}: prepare_images gave {n_rows} images for {r.n_spans} spans"
        return {
            "input_ids": torch.tensor(r.input_ids, dtype=torch.long),  # [T]
            "labels": torch.tensor(r.labels, dtype=torch.long),  # [T]
            "pixel_values": pix.pop("pixel_values", None),  # [sum crops | sum patches, 3, s, s]
            **pix,  # image_sizes [n, 2], image_crops [n] | image_grid [n, 2]
            "n_images": r.n_spans,
            "id": s.id,
        }

    def __getitem__(self, i: int) -> dict:
        new_skips = []
        for attempt in range(self.max_retries + 1):
            s = self.samples[self.index[(i + attempt) % len(self.index)]]
            try:
                item = self.build(s)
                item["skipped"] = new_skips
                return item
            except BadSampleError as e:
                if self.strict:
                    raise
                rec = self._record(s.id, s.source, e)
                if rec is not None:
                    new_skips.append(rec)
        raise NoUsableDataError(f"VLMDataset: {self.max_retries + 1} bad samples in a row from index {i}; "
                           f"the data is broken, see skip_report(): {self.skip_report()}")

    # -------------------------------------------------------------------------------------- validation
    def validate(self, check_media: bool = True) -> dict:
        """Pre-scan every sample in this process without decoding pixels; bad ones leave the index.

        Renders with `max_length` (catches marker mismatches and too-long samples, and records exact
        lengths), and with `check_media` opens each image header (exists, readable, under max_pixels)
        and checks each video file exists. Strict mode raises at the first problem. Returns skip_report().
        """
        bad: set[int] = set()
        for k in sorted(set(self.index)):
            s = self.samples[k]
            try:
                plan = self._plan(s)  # variable modes: every media header read here (exists, readable, size)
                r = self._render(s, plan)
                if check_media and plan is None:
                    for kind, path in r.media:
                        if self.feature_cache is not None:
                            if kind != "image" or path not in self.feature_cache:
                                raise BadSampleError(f"{s.where}: {kind} {path} is not in the feature cache "
                                                     f"{self.feature_cache.root}", "no_feature")
                        else:
                            _check_media(s, kind, path, self.max_pixels)
                self._exact_lengths[k] = len(r.input_ids)
                self._image_tokens[k] = self._span_tokens(r, plan)
            except BadSampleError as e:
                if self.strict:
                    raise
                rec = self._record(s.id, s.source, e)
                if rec is not None and rec["kind"] == "too_long":
                    rec["length"] = getattr(e, "length", 0)  # the full length, from render
                bad.add(k)
        self.index = [k for k in self.index if k not in bad]
        if not self.index:
            raise self.no_usable_sample()
        return self.skip_report()

    @property
    def image_tokens(self) -> list[int]:
        """Image tokens per dataset position (the packing sampler's second budget): exact after validate();
        a sample not validated is rendered here (headers only), a bad one counts 0 (it is skipped later)."""
        for k in set(self.index) - set(self._image_tokens):
            s = self.samples[k]
            try:
                plan = self._plan(s)
                self._image_tokens[k] = self._span_tokens(self._render(s, plan), plan)
            except BadSampleError:
                self._image_tokens[k] = 0
        return [self._image_tokens[k] for k in self.index]

    @property
    def lengths(self) -> list[int]:
        """One length per dataset position: exact after validate(), else a cheap estimate."""
        return [self._exact_lengths.get(k) or estimate_length(self.samples[k], self._estimate_count(self.samples[k]),
                                                              self.mode, self.frames_per_video)
                for k in self.index]

    def _estimate_count(self, sample: Sample) -> int:
        """Tokens per image for `estimate_length`: fixed mode's count, else the resolution's most (an upper
        bound that needs no image header; the multi-image policy of the sample's image count applied)."""
        if self.resolution is None:
            return self.tokens_per_image
        return self.resolution.max_tokens(max(1, len(sample.images) + len(sample.videos) * self.frames_per_video))


def _media_indices(media: list[tuple[str, str]]) -> list[int]:
    """Each rendered media's index among the sample's images / videos (render keeps them in order, and
    truncation drops trailing ones only)."""
    seen = {"image": 0, "video": 0}
    out = []
    for kind, _ in media:
        out.append(seen[kind])
        seen[kind] += 1
    return out


def _check_media(s: Sample, kind: str, path: str, max_pixels: int) -> None:
    """Cheap existence/header check of one media file (no pixel decoding)."""
    if not os.path.isfile(path):
        raise BadSampleError(f"{s.where}: {kind} file not found: {path}", "missing_file")
    if os.path.getsize(path) == 0:
        raise BadSampleError(f"{s.where}: {kind} file is empty (0 bytes): {path}", "bad_image")
    if kind != "image":
        return
    try:
        with open_header(path) as img:  # header only; PIL's own bomb limit off: ours decides below
            w, h = img.size
    except Exception as e:  # noqa: BLE001 - any header failure means "not an image"
        raise BadSampleError(f"{s.where}: not a readable image: {path} ({e})", "bad_image") from e
    if w * h > max_pixels:
        raise BadSampleError(f"{s.where}: {too_large_message(path, w, h, max_pixels)}", "too_large")
