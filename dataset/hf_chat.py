"""Rendering a `Sample` with a released checkpoint's OWN chat template (the wrapper families of model/released.py).

Contract:
- The template is the checkpoint's: `processor.chat_template` / `tokenizer.chat_template`, which transformers
  reads from chat_template.jinja / chat_template.json / tokenizer_config.json in the directory. Nothing here
  writes a template; a checkpoint without one is refused with one line naming the directory.
- `hf_messages(sample)` turns our messages (`<image>` / `<video>` markers in a string) into the
  transformers multimodal form: `content` a list of `{"type": "text", "text": ...}` / `{"type": "image"}` /
  `{"type": "video"}` parts, in order (an empty message: one empty text part).
- `SpanRule(token, part, spans)`: one kind of media (`part`: "image" | "video", the message part type). The
  template writes `token` once per item; `spans(n)` is the processor's own text for each of the first n items
  (Qwen2-VL: the token repeated; Idefics3: tiles with row/col markers and the global image; OneVision: a count
  that depends on how many images the sample holds, so n is the number the rendered turns keep).
- `render_hf(sample, template_fn, tokenize, rules, max_length, span_ids)` -> `(input_ids, labels, kept)`: the
  text is rendered once per assistant turn boundary (`template_fn(messages[:k], add_generation_prompt)`) and
  each render must be a prefix of the full one, else the template is refused (it rewrites earlier turns); the
  pieces between "prompt of turn k" and "end of turn k" are the assistant's (content + end-of-turn, as the
  template writes them) and get labels, everything else -100. Each rule's i-th `token` in the text is replaced
  by its i-th span. The whole text is then tokenized once, as the processor does (`tokenize(text) -> (ids,
  character offsets)`, a fast tokenizer's; a BPE merge across a turn boundary is the processor's too), and
  labels come from the offsets: a token starting inside an assistant piece is labelled unless it overlaps a
  span or is in `span_ids` (markers the template writes around a span); a token with no characters (a BOS the
  tokenizer adds) is -100. `kept` = `{part: items the kept turns hold}`.
- `ReleasedDataset(paths, render, max_length, ..., video_folder=None, frames_per_video=None)`: our data files
  (every format dataset/formats.py reads) as items `render(sample, images, max_length[, videos=...]) ->
  {"input_ids", "labels", <the processor's image / video inputs>}`; each video is `frames_per_video` frames
  from our frame sampler (`load_video_frames`), a list of PIL images; `frames_per_video=None` (a family
  without videos) refuses a video sample. A bad sample is skipped and counted (strict: raised), as in
  `VLMDataset`.
- `released_collate(pad_id, per_sample=())`: right-pads input_ids / labels / attention_mask `[B, T]` and joins
  each processor input with `stack_image_inputs`: flat keys concatenated in item order, zero-padded to the
  widest on every other dim (Qwen2-VL: pixel_values `[sum patches, C*T*P*P]`, image_grid_thw `[n, 3]`;
  LLaVA-NeXT / OneVision: pixel_values `[n, crops, C, H, W]` padded on the crop axis, the model reading each
  image's own crops from image_sizes; image_sizes `[n, 2]`, batch_num_images `[samples]`; pixel_values_videos
  `[videos, frames, C, H, W]`); keys in `per_sample` (Idefics3: pixel_values `[1, n_i, 3, H, W]` per item)
  padded with zeros to the batch's most images (and largest H, W) and stacked `[B, max n_i, ...]`; an item
  without images gets all-zero rows there (the model drops all-zero images).
- Truncation: whole (user, assistant) pairs are dropped from the end until the sample fits `max_length`;
  spans are never cut. A sample whose first pair does not fit raises `BadSampleError(kind="too_long")`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.loss import IGNORE_INDEX
from .collator import Batch
from .dataset import _parse_paths
from .formats import normalize, read_records, resolve_path
from .images import load_image, load_video_frames
from .sample import IMAGE_MARKER, VIDEO_MARKER, BadSampleError, Sample

_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")

# text -> (ids, character offsets [(start, end)] of each id)
TokenizeFn = Callable[[str], tuple[list[int], list[tuple[int, int]]]]


def hf_messages(sample: Sample) -> list[dict]:
    """Our messages as transformers' multimodal messages (text / image / video parts in order)."""
    out = []
    for msg in sample.messages:
        parts = []
        for piece in _MARKERS.split(msg["content"]):
            if piece == IMAGE_MARKER:
                parts.append({"type": "image"})
            elif piece == VIDEO_MARKER:
                parts.append({"type": "video"})
            elif piece:
                parts.append({"type": "text", "text": piece})
        # An empty message is one empty text part: templates read content[0] (Idefics3: "User:" vs "User: ").
        out.append({"role": msg["role"], "content": parts or [{"type": "text", "text": ""}]})
    return out


@dataclass(frozen=True)
class SpanRule:
    """One kind of media: the template writes `token` once per item (a message part of type `part`), and the
    processor puts `spans(n)[i]` in its place, n being how many items of this kind the rendered turns keep."""

    token: str
    part: str  # "image" | "video"
    spans: Callable[[int], list[str]]


def expand_spans(text: str, spans: dict[str, list[str]]) -> str:
    """Each placeholder token of `spans` replaced, its i-th occurrence by `spans[token][i]` (the processor's
    expansion)."""
    return _expand([(text, False)], spans)[0]


def _segments(messages: list[dict], template_fn: Callable[[list[dict], bool], str]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant) pieces, by rendering each turn boundary."""
    full = template_fn(messages, False)
    segs: list[tuple[str, bool]] = []
    done = 0
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = template_fn(messages[:k], True)
        end = template_fn(messages[: k + 1], False)
        if not (full.startswith(prompt) and full.startswith(end) and end.startswith(prompt) and len(prompt) >= done):
            raise BadSampleError("the checkpoint's chat template rewrites earlier turns; cannot mask by turn",
                                 kind="bad_record")
        segs += [(full[done:len(prompt)], False), (full[len(prompt):len(end)], True)]
        done = len(end)
    if done < len(full):
        segs.append((full[done:], False))
    return segs


def render_hf(
    sample: Sample,
    template_fn: Callable[[list[dict], bool], str],
    tokenize: TokenizeFn,
    rules: list[SpanRule],
    max_length: int | None = None,
    span_ids: frozenset[int] = frozenset(),
) -> tuple[list[int], list[int], dict[str, int]]:
    """input_ids, labels (assistant tokens only) and the items kept per part (`{"image": n, "video": m}`) of
    `sample` under the checkpoint's template; every token of a span, and every token in `span_ids` (markers
    around a span), is -100 even inside an assistant turn."""
    messages = hf_messages(sample)
    n_pairs = sum(m["role"] == "assistant" for m in messages)
    if n_pairs == 0:
        raise BadSampleError(f"{sample.where}: no assistant turn to train on", kind="no_target")
    while n_pairs > 0:
        cut = _cut_after(messages, n_pairs)
        kept = {r.part: sum(_count_parts(m, r.part) for m in cut) for r in rules}
        spans = {r.token: list(r.spans(kept[r.part])) if kept[r.part] else [] for r in rules}
        text, train, span_ranges = _expand(_segments(cut, template_fn), spans)
        ids, offsets = tokenize(text)
        if max_length is None or len(ids) <= max_length:
            return ids, _labels(ids, offsets, train, span_ranges, span_ids), kept
        n_pairs -= 1
    raise BadSampleError(f"{sample.where}: its first turn is longer than max_length={max_length}", kind="too_long")


def _cut_after(messages: list[dict], n_pairs: int) -> list[dict]:
    """The messages up to and including the `n_pairs`-th assistant turn."""
    seen = 0
    for i, m in enumerate(messages):
        seen += m["role"] == "assistant"
        if seen == n_pairs:
            return messages[: i + 1]
    return messages


def _count_parts(message: dict, part: str) -> int:
    return sum(p.get("type") == part for p in message["content"])


Ranges = list[tuple[int, int]]  # character [start, end) ranges of the rendered text


def _expand(segs: list[tuple[str, bool]], spans: dict[str, list[str]]) -> tuple[str, Ranges, Ranges]:
    """The segments joined with each placeholder replaced by its next span, in order of appearance: (text,
    assistant ranges, span ranges). Each token must appear exactly as many times as it has spans."""
    used = dict.fromkeys(spans, 0)
    tokens = sorted((t for t in spans if t), key=len, reverse=True)  # the longest first: no token hides another
    split = re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")") if tokens else None
    out: list[str] = []
    train: Ranges = []
    span_ranges: Ranges = []
    pos = 0
    for text, is_train in segs:
        start = pos
        for i, piece in enumerate(split.split(text) if split else [text]):
            if i % 2:  # a placeholder (re.split puts the captured separators at odd positions)
                k = used[piece]
                if k >= len(spans[piece]):
                    raise BadSampleError(f"the template wrote more {piece} tokens than the {len(spans[piece])} "
                                         "item(s) of the sample")
                used[piece] = k + 1
                piece = spans[piece][k]
                span_ranges.append((pos, pos + len(piece)))
            out.append(piece)
            pos += len(piece)
        if is_train:
            train.append((start, pos))
    for token, n in used.items():
        if n != len(spans[token]):
            raise BadSampleError(f"{len(spans[token])} item(s) for {token} but the template wrote {n}")
    return "".join(out), train, span_ranges


def _labels(ids: list[int], offsets: list[tuple[int, int]], train: Ranges, spans: Ranges,
            span_ids: frozenset[int]) -> list[int]:
    """Each token's label from its characters: inside an assistant piece and no span -> its id, else -100."""
    labels = []
    for t, (s, e) in zip(ids, offsets):
        keep = e > s and any(a <= s < b for a, b in train) and not any(s < b and a < e for a, b in spans)
        labels.append(t if keep and t not in span_ids else IGNORE_INDEX)
    return labels


class ReleasedDataset(torch.utils.data.Dataset):
    """Our data files rendered by a released checkpoint's template and processor (`render`)."""

    def __init__(self, paths: Any, render: Callable[..., dict], max_length: int | None,
                 image_folder: str | None = None, strict: bool = False, allow_absolute_paths: bool = False,
                 max_retries: int = 16, video_folder: str | None = None, frames_per_video: int | None = None):
        self.render, self.max_length, self.strict, self.max_retries = render, max_length, strict, max_retries
        self.frames_per_video = frames_per_video  # None: the family takes no videos (refused per sample)
        self.skipped: dict[tuple[str, int], dict] = {}
        self.samples: list[Sample] = []
        for spec in _parse_paths(paths, image_folder, video_folder):
            bad: list[tuple[int, BadSampleError]] | None = None if strict else []
            for pos, record in read_records(spec["path"], bad):
                try:
                    self.samples.append(normalize(record, pos, spec["path"], image_folder=spec["image_folder"],
                                                  video_folder=spec["video_folder"],
                                                  allow_absolute_paths=allow_absolute_paths))
                except BadSampleError as e:
                    if strict:
                        raise
                    self._skip(spec["path"], pos, e)
            for pos, e in bad or []:
                self._skip(spec["path"], pos, e)
        if not self.samples:
            raise BadSampleError(f"{', '.join(str(s['path']) for s in _parse_paths(paths, None, None))}: no usable sample")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        """Each sample's rendered length (rendered once, on first use: the length-grouped sampler); 0 = bad."""
        if getattr(self, "_lengths", None) is None:
            self._lengths = []
            for s in self.samples:
                try:
                    self._lengths.append(len(self.build(s)["input_ids"]))
                except BadSampleError:
                    self._lengths.append(0)
        return self._lengths

    def _skip(self, file: str, position: int, e: BadSampleError) -> dict:
        rec = {"file": str(file), "position": position, "kind": e.kind, "reason": str(e)}
        self.skipped.setdefault((rec["file"], position), rec)
        return rec

    def absorb(self, records: list[dict]) -> None:
        """Merge skip records produced in DataLoader workers into this object."""
        for r in records:
            self.skipped.setdefault((r["file"], r["position"]), r)

    def skip_report(self) -> dict:
        """`{"skipped": n, "by_kind": {kind: count}, "examples": [first reasons]}` plus VLMDataset's other
        counts at 0 (truncation here drops whole turns inside `render`, counted by the caller's lengths)."""
        recs = list(self.skipped.values())
        by_kind: dict[str, int] = {}
        for r in recs:
            by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
        return {"skipped": len(recs), "by_kind": by_kind, "examples": [r["reason"] for r in recs[:5]],
                "truncated_samples": 0, "dropped_turns": 0, "dropped_images": 0, "downscaled_samples": 0}

    def build(self, s: Sample) -> dict:
        if s.videos and self.frames_per_video is None:
            raise BadSampleError(f"{s.where}: videos are not supported for this released family yet", kind="bad_video")
        images = [load_image(resolve_path(p, None, "", True)) for p in s.images]
        if not s.videos:
            return {**self.render(s, images, self.max_length), "id": s.id}
        # Each video becomes frames_per_video frames from our frame sampler, fed as the family's video input.
        videos = [load_video_frames(resolve_path(p, None, "", True), self.frames_per_video) for p in s.videos]
        return {**self.render(s, images, self.max_length, videos=videos), "id": s.id}

    def __getitem__(self, i: int) -> dict:
        new_skips = []
        for attempt in range(self.max_retries + 1):
            s = self.samples[(i + attempt) % len(self.samples)]
            try:
                return {**self.build(s), "skipped": new_skips}
            except BadSampleError as e:
                if self.strict:
                    raise
                file, pos = s.source or ("<memory>", 0)
                new_skips.append(self._skip(file, pos, e))
        raise BadSampleError(f"{self.max_retries + 1} bad samples in a row from index {i}")


def stack_image_inputs(parts: list[dict[str, torch.Tensor]], per_sample: tuple[str, ...] = ()) -> dict:
    """One batch's image / video inputs from each conversation's (`{}` for one without any), in order.

    Flat keys: zero-padded to the largest size of every dim but the first, then concatenated on dim 0 (`[sum
    over items, ...]`; only LLaVA-NeXT / OneVision crops differ there, and the model reads each image's crops from
    its image_sizes). `per_sample` keys: each `[1, n_i, ...]`, padded with zeros to the largest size of every dim
    but the first and stacked `[B, max n_i, ...]`; a conversation without the key gets zeros (an all-zero image,
    which Idefics3-style models drop)."""
    out: dict[str, torch.Tensor] = {}
    for k in sorted({k for p in parts for k, v in p.items() if isinstance(v, torch.Tensor)}):
        present = [p[k] for p in parts if k in p]
        shape = [max(t.shape[d] for t in present) for d in range(1, present[0].dim())]
        if k not in per_sample:
            padded = []
            for t in present:
                grown = t.new_zeros(t.shape[0], *shape)  # [n, widest ...]
                grown[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
                padded.append(grown)
            out[k] = torch.cat(padded)  # [sum over items, ...] in item order
            continue
        stacked = present[0].new_zeros(len(parts), *shape)  # [B, max n_i, ...]
        for b, p in enumerate(parts):
            if k in p:
                t = p[k][0]
                stacked[(b, *(slice(0, n) for n in t.shape))] = t
        out[k] = stacked
    return out


def released_collate(pad_id: int, per_sample: tuple[str, ...] = ()) -> Callable[[list[dict]], Batch]:
    """Right-padded ids / labels / mask and the joined image inputs of a micro-batch (`stack_image_inputs`)."""

    def collate(items: list[dict]) -> Batch:
        T = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)  # [B, T]
        labels = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(items), T), dtype=torch.long)  # [B, T]
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(it["input_ids"]), torch.tensor(it["labels"]), 1
        batch = Batch(input_ids=input_ids, attention_mask=mask, labels=labels)
        images = [{k: v for k, v in it.items() if isinstance(v, torch.Tensor)} for it in items]
        batch.update(stack_image_inputs(images, per_sample))
        batch.ids = [it.get("id") for it in items]
        batch.skipped = [rec for it in items for rec in it.get("skipped", [])]
        return batch

    return collate
