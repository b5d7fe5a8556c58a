"""Render a `Sample` to `input_ids` and `labels` in one pass (ChatML), expanding image markers in place.

`render(sample, tokenizer, tokens_per_image, mode="chat", max_length=None, frames_per_video=4,
system_prompt=None, add_generation_prompt=False, image_token_id=None) -> Rendered`

chat mode (ChatML, Qwen's template), per message:
    <|im_start|> role "\\n" content <|im_end|> "\\n"
- `role`, "\\n" and each text piece of the content are encoded separately (like Qwen's own
  `make_context`); text never becomes a special token.
- each `<image>` -> `image_start + N x image_token + image_end` (N = tokens_per_image) exactly where the
  marker stands inside the text; each `<video>` -> K such spans, one per frame (K = frames_per_video).
- labels: the assistant's content tokens and its `<|im_end|>`; everything else (headers, the trailing
  "\\n", user/system turns, every image span) is -100.
- no system prompt is added unless the sample has one or `system_prompt` is given (the sample wins).
- a final user turn with no answer is dropped (nothing to learn from it), unless
  `add_generation_prompt=True` (inference): then it is kept, `<|im_start|>assistant\n` is appended and
  every label is -100.

plain mode (LLaVA stage-1 pretraining): the image spans of the first user turn (its text is dropped),
then the first assistant answer (the caption) and `<|endoftext|>`; labels on caption + eod only. Later
turns are ignored together with their images.

Length: `max_length` counts every token, image tokens included. Whole trailing (user, assistant) pairs are
dropped until the sample fits, so an image span is never cut; a sample that still does not fit, or has
no supervised token left, raises `BadSampleError("... too long ...")` (the dataset skips it).

`Rendered.media` lists the media of the kept turns in span order as `("image", path)` / `("video", path)`;
a video stands for K consecutive spans. `n_images` counts images, `n_frames` video frames; the pixel
rows a sample feeds the model are `n_images + n_frames`, in `media` order.

`estimate_length(sample, tokens_per_image, ...)` is a cheap length for length-grouped sampling: exact
(tokenizes, never decodes images) when a tokenizer is given, otherwise a byte-count approximation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dataset.sample import IMAGE_MARKER, VIDEO_MARKER, BadSampleError, Sample

IGNORE_INDEX = -100
MODES = ("chat", "plain")
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    n_images: int
    n_frames: int = 0
    media: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_spans(self) -> int:
        """Image spans in `input_ids` = pixel rows the sample needs."""
        return self.n_images + self.n_frames


@dataclass
class _Piece:
    """A rendered stretch of the conversation (one message or one turn pair)."""

    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    media: list[tuple[str, str]] = field(default_factory=list)

    def add(self, ids: list[int], train: bool) -> None:
        self.ids += ids
        self.labels += ids if train else [IGNORE_INDEX] * len(ids)

    def extend(self, other: _Piece) -> None:
        self.ids += other.ids
        self.labels += other.labels
        self.media += other.media


class _MediaCursor:
    """Hands out the sample's images / videos in marker order."""

    def __init__(self, sample: Sample):
        self.sample, self.i_img, self.i_vid = sample, 0, 0

    def next(self, marker: str) -> tuple[str, str]:
        s = self.sample
        if marker == IMAGE_MARKER:
            if self.i_img >= len(s.images):
                raise BadSampleError(f"{s.where}: more <image> markers than images ({len(s.images)})")
            self.i_img += 1
            return ("image", s.images[self.i_img - 1])
        if self.i_vid >= len(s.videos):
            raise BadSampleError(f"{s.where}: more <video> markers than videos ({len(s.videos)})")
        self.i_vid += 1
        return ("video", s.videos[self.i_vid - 1])

    def check_all_used(self) -> None:
        s = self.sample
        if self.i_img != len(s.images) or self.i_vid != len(s.videos):
            raise BadSampleError(f"{s.where}: {self.i_img} <image> / {self.i_vid} <video> markers for "
                                 f"{len(s.images)} images / {len(s.videos)} videos")


def image_span(tokenizer, tokens_per_image: int, image_token_id: int | None = None) -> list[int]:
    """`image_start + N x placeholder + image_end`; the placeholder is the tokenizer's unless the model
    was built with another one (e.g. an imported Llava checkpoint)."""
    pad = tokenizer.image_token_id if image_token_id is None else image_token_id
    return [tokenizer.image_start_id] + [pad] * tokens_per_image + [tokenizer.image_end_id]


def _content(piece: _Piece, text: str, train: bool, cursor: _MediaCursor, tokenizer, span: list[int], k: int,
             text_too: bool = True) -> None:
    """Append `text` with its markers expanded in place; image spans are never trained on."""
    for part in _MARKERS.split(text):
        if part in (IMAGE_MARKER, VIDEO_MARKER):
            kind, path = cursor.next(part)
            piece.media.append((kind, path))
            n_spans = 1 if kind == "image" else k
            piece.add(span * n_spans, train=False)
        elif part and text_too:
            piece.add(tokenizer.encode(part), train)


def _message(msg: dict, cursor: _MediaCursor, tokenizer, span: list[int], k: int) -> _Piece:
    piece = _Piece()
    train = msg["role"] == "assistant"
    piece.add([tokenizer.im_start_id] + tokenizer.encode(msg["role"]) + tokenizer.encode("\n"), train=False)
    _content(piece, msg["content"], train, cursor, tokenizer, span, k)
    piece.add([tokenizer.im_end_id], train=train)  # the model learns to stop
    piece.add(tokenizer.encode("\n"), train=False)
    return piece


def _count(pieces: list[_Piece]) -> tuple[int, int]:
    media = [m for p in pieces for m in p.media]
    return sum(kind == "image" for kind, _ in media), sum(kind == "video" for kind, _ in media)


def render(
    sample: Sample,
    tokenizer,
    tokens_per_image: int,
    mode: str = "chat",
    max_length: int | None = None,
    frames_per_video: int = 4,
    system_prompt: str | None = None,
    add_generation_prompt: bool = False,
    image_token_id: int | None = None,
) -> Rendered:
    """Token ids + labels of `sample` (see the module docstring). `image_token_id` overrides the
    tokenizer's placeholder (pass the model's `VLM.image_token_id`)."""
    if add_generation_prompt and mode != "chat":
        raise ValueError("render: add_generation_prompt needs mode='chat'")
    if mode not in MODES:
        raise ValueError(f"render: mode must be one of {MODES}, got {mode!r}")
    assert tokens_per_image > 0 and frames_per_video > 0, (tokens_per_image, frames_per_video)
    msgs = sample.messages
    if not msgs:
        raise BadSampleError(f"{sample.where}: empty conversation")
    cursor = _MediaCursor(sample)
    span = image_span(tokenizer, tokens_per_image, image_token_id)  # one image's ids, built once

    if mode == "plain":
        user = next((m for m in msgs if m["role"] == "user"), None)
        answer = next((m for m in msgs if m["role"] == "assistant"), None)
        if user is None or answer is None:
            raise BadSampleError(f"{sample.where}: plain mode needs a user turn and an assistant answer")
        if _MARKERS.search(answer["content"]):
            raise BadSampleError(f"{sample.where}: plain mode: the caption contains an image/video marker")
        piece = _Piece()
        _content(piece, user["content"], False, cursor, tokenizer, span, frames_per_video, text_too=False)
        piece.add(tokenizer.encode(answer["content"]) + [tokenizer.eod_id], train=True)
        kept = [piece]
    else:
        prefix = _Piece()
        body = msgs
        if msgs[0]["role"] == "system":
            body = msgs[1:]
            prefix = _message(msgs[0], cursor, tokenizer, span, frames_per_video)
        elif system_prompt:
            prefix = _message({"role": "system", "content": system_prompt}, cursor, tokenizer, span,
                              frames_per_video)
        pairs: list[_Piece] = []
        for m in body:
            if m["role"] == "system":
                raise BadSampleError(f"{sample.where}: a system message after the first turn")
            piece = _message(m, cursor, tokenizer, span, frames_per_video)
            if m["role"] == "user":
                pairs.append(piece)
            elif not pairs:
                raise BadSampleError(f"{sample.where}: conversation starts with an assistant turn")
            else:
                pairs[-1].extend(piece)
        cursor.check_all_used()  # before any dropping: a marker/image mismatch is an error, not a skip
        if pairs and body[-1]["role"] == "user" and not add_generation_prompt:
            pairs.pop()  # an unanswered final question has nothing to learn from
        kept = [prefix]
        total = len(prefix.ids)
        for p in pairs:
            if max_length is not None and total + len(p.ids) > max_length:
                break  # drop this pair and every later one: whole turns, never part of a span
            kept.append(p)
            total += len(p.ids)
        if add_generation_prompt and len(kept) != len(pairs) + 1:
            # Dropping trailing turns would drop the question being asked; shorten the history instead.
            raise BadSampleError(f"{sample.where}: too long: the prompt exceeds max_length {max_length}",
                                 "too_long")

    out = _Piece()
    for p in kept:
        out.extend(p)
    if max_length is not None and len(out.ids) > max_length:
        raise BadSampleError(f"{sample.where}: too long: {len(out.ids)} tokens > max_length {max_length}",
                             "too_long")
    if add_generation_prompt:
        # Inference: the prompt ends with an open assistant header; nothing is supervised.
        out.add([tokenizer.im_start_id] + tokenizer.encode("assistant") + tokenizer.encode("\n"), train=False)
        if max_length is not None and len(out.ids) > max_length:
            raise BadSampleError(f"{sample.where}: too long: prompt of {len(out.ids)} tokens > max_length "
                                 f"{max_length}", "too_long")
    elif not any(lab != IGNORE_INDEX for lab in out.labels):
        if mode == "chat" and len(kept) == 1 and pairs:
            first = len(prefix.ids) + len(pairs[0].ids)
            raise BadSampleError(f"{sample.where}: too long: the first turn alone ({first} tokens) exceeds "
                                 f"max_length {max_length}", "too_long")
        raise BadSampleError(f"{sample.where}: no supervised (assistant) token", "no_target")
    n_img, n_vid = _count([out])
    return Rendered(out.ids, out.labels, n_images=n_img, n_frames=n_vid * frames_per_video, media=out.media)


def estimate_length(
    sample: Sample,
    tokens_per_image: int,
    mode: str = "chat",
    frames_per_video: int = 4,
    tokenizer=None,
) -> int:
    """Length of the rendered sample without decoding images: exact with a tokenizer, else ~bytes/4."""
    if tokenizer is not None:
        return len(render(sample, tokenizer, tokens_per_image, mode, None, frames_per_video).input_ids)
    span = tokens_per_image + 2
    n = 0
    for m in sample.messages:
        text = m["content"]
        n_img, n_vid = text.count(IMAGE_MARKER), text.count(VIDEO_MARKER)
        n += (n_img + n_vid * frames_per_video) * span
        n += len(_MARKERS.sub("", text).encode("utf-8")) // 4 + 1 + (5 if mode == "chat" else 0)
    return n
