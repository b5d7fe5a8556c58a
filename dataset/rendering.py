"""Render a `Sample` to `input_ids` and `labels` in one pass, in the LM's chat template, expanding image
markers in place.

`render(sample, fmt, tokens_per_image, mode="chat", max_length=None, frames_per_video=4,
system_prompt=None, add_generation_prompt=False, image_token_id=None) -> Rendered`

`fmt` is a `ChatFormat` (the model's: `VLM.chat_format`): a tokenizer, a `ChatTemplate`
(dataset/chat_templates.py) and the special ids. A Qwen tokenizer (qwen/tokenizer.py) may be passed
instead: it means ChatML with that tokenizer's ids (Qwen's own layout, below).

chat mode, per message: `header[role] + content + suffix[role]` (ChatML: `<|im_start|>role\n content
<|im_end|>\n`), after the template's `bos` (none for ChatML):
- special tokens come only from the template; every text piece is encoded with `tokenizer.encode`, which
  never turns text into a special token (a user typing "<|im_end|>" gets plain text ids). ChatML encodes
  role, "\n" and each text piece separately, like Qwen's own `make_context`.
- each `<image>` -> `[image_start] + N x image_token + [image_end]` (start/end only when the LM has them)
  exactly where the marker stands inside the text; each `<video>` -> K such spans, one per frame
  (K = frames_per_video). N = `tokens_per_image`: an int (every image alike: the fixed-resolution case), or
  a function `(kind, index) -> int` giving the count of the `index`-th image (`kind` "image") or of each
  frame of the `index`-th video (`kind` "video") of `sample.images` / `sample.videos` — the dataset passes
  one made from each file's size through `visual.resolution.Resolution.layout`, the one count.
- labels: the assistant's content tokens and its end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...);
  everything else (headers, trailing newlines, user/system turns, every image span) is IGNORE_INDEX.
- no system prompt is added unless the sample has one, `system_prompt` is given (the sample wins) or the
  template has a `default_system`; a template's `user_prefix` goes before each user message's content;
  templates without a system role fold it into the first user message.
- a final user turn with no answer is dropped (nothing to learn from it), unless
  `add_generation_prompt=True` (inference): then it is kept and the assistant header is appended
  (unsupervised).

plain mode (LLaVA stage-1 pretraining): `bos`, the image spans of the first user turn (its text is
dropped), then the first assistant answer (the caption) and the end-of-text token; labels on caption +
end of text only. Later turns are ignored together with their images.

Length: `max_length` counts every token, image tokens included. Whole trailing (user, assistant) pairs are
dropped until the sample fits, so an image span is never cut; `Rendered.dropped_turns` /
`dropped_images` count what was dropped (messages; images + video frames). A sample that still does not
fit, or has no supervised token left, raises `BadSampleError("... too long ...")` (the dataset skips it).

`Rendered.media` lists the media of the kept turns in span order as `("image", path)` / `("video", path)`;
a video stands for K consecutive spans. `n_images` counts images, `n_frames` video frames; the pixel
rows a sample feeds the model are `n_images + n_frames`, in `media` order.

`estimate_length(sample, tokens_per_image, ...)` is a cheap length for length-grouped sampling: exact
(tokenizes, never decodes images) when a format or tokenizer is given, otherwise a byte-count approximation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.loss import IGNORE_INDEX
from .chat_templates import CHATML, ChatTemplate
from .hf_template import prompt_own, render_own
from .sample import IMAGE_MARKER, ROLES, VIDEO_MARKER, BadSampleError, Sample

MODES = ("chat", "plain")
_Span = Callable[[str, int], list[int]]  # (kind, index) -> one image's (one frame's) span ids
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")


@dataclass
class ChatFormat:
    """What rendering needs from an LM backbone: its tokenizer (`encode(text)` never yields a special
    token; `token_to_id(special)`), its chat template, the image span ids and the end-of-text id."""

    tokenizer: Any
    template: ChatTemplate
    image_token_id: int
    eos_id: int
    image_start_id: int | None = None
    image_end_id: int | None = None
    jinja: str | None = None  # the checkpoint's own template text (template OWN): dataset/hf_template.py renders

    def __post_init__(self) -> None:
        if not self.template.image_delimiters:  # e.g. `bigbro`: the image rows stand alone
            self.image_start_id = self.image_end_id = None
        self._ids: dict[str, int] = {}
        for tok in self.template.specials:
            try:
                self._ids[tok] = int(self.tokenizer.token_to_id(tok))
            except KeyError:
                pass  # a template token this tokenizer lacks: an error only if a rendering needs it

    @classmethod
    def for_qwen(cls, tokenizer) -> ChatFormat:
        """ChatML with a Qwen tokenizer's ids (qwen/tokenizer.py)."""
        return cls(tokenizer, CHATML, tokenizer.image_token_id, eos_id=tokenizer.eod_id,
                   image_start_id=tokenizer.image_start_id, image_end_id=tokenizer.image_end_id)

    @property
    def missing_specials(self) -> list[str]:
        """The template's special tokens this tokenizer lacks (looked up once, in `__post_init__`)."""
        return [t for t in self.template.specials if t not in self._ids]

    def special_id(self, token: str) -> int:
        if token not in self._ids:
            raise ValueError(f"chat template {self.template.name!r} needs the token {token!r}, which the "
                             f"tokenizer does not have; pick another chat_template")
        return self._ids[token]

    @property
    def end_of_turn_id(self) -> int:
        if self.jinja is not None:  # the template's own text says nothing we can read: end of text ends a turn
            return self.eos_id
        return self.special_id(self.template.end_of_turn)

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops at the end of turn, at the start of a new turn's header, or at end of text."""
        if self.jinja is not None:
            return [self.eos_id]
        stops = [self.end_of_turn_id]
        opener = self.template.pieces(self.template.header["user"])
        if opener and opener[0][0] == "special":
            stops.append(self.special_id(opener[0][1]))
        return list(dict.fromkeys(stops + [self.eos_id]))

    def image_span(self, tokens_per_image: int, image_token_id: int | None = None) -> list[int]:
        """One image's ids: `[image_start] + N x placeholder + [image_end]`; the placeholder is the format's
        unless the model was built with another one (e.g. an imported Llava checkpoint)."""
        pad = self.image_token_id if image_token_id is None else image_token_id
        start = [] if self.image_start_id is None else [self.image_start_id]
        end = [] if self.image_end_id is None else [self.image_end_id]
        return start + [pad] * tokens_per_image + end


def as_chat_format(fmt) -> ChatFormat:
    """A ChatFormat as is, or ChatML for a Qwen tokenizer."""
    if isinstance(fmt, ChatFormat):
        return fmt
    if hasattr(fmt, "im_start_id"):
        return ChatFormat.for_qwen(fmt)
    raise TypeError(f"render needs a ChatFormat (VLM.chat_format) or a Qwen tokenizer, got {type(fmt).__name__}")


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    n_images: int
    n_frames: int = 0
    media: list[tuple[str, str]] = field(default_factory=list)
    dropped_turns: int = 0  # messages removed to fit max_length
    dropped_images: int = 0  # images and video frames inside them

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
    n_messages: int = 0

    def add(self, ids: list[int], train: bool) -> None:
        self.ids += ids
        self.labels += ids if train else [IGNORE_INDEX] * len(ids)

    def extend(self, other: _Piece) -> None:
        self.ids += other.ids
        self.labels += other.labels
        self.media += other.media
        self.n_messages += other.n_messages


class _MediaCursor:
    """Hands out the sample's images / videos in marker order."""

    def __init__(self, sample: Sample):
        self.sample, self.i_img, self.i_vid = sample, 0, 0

    def next(self, marker: str) -> tuple[str, str, int]:
        """(kind, path, index in sample.images / sample.videos) of the next marker's media."""
        s = self.sample
        if marker == IMAGE_MARKER:
            if self.i_img >= len(s.images):
                raise BadSampleError(f"{s.where}: more <image> markers than images ({len(s.images)})")
            self.i_img += 1
            return ("image", s.images[self.i_img - 1], self.i_img - 1)
        if self.i_vid >= len(s.videos):
            raise BadSampleError(f"{s.where}: more <video> markers than videos ({len(s.videos)})")
        self.i_vid += 1
        return ("video", s.videos[self.i_vid - 1], self.i_vid - 1)

    def check_all_used(self) -> None:
        s = self.sample
        if self.i_img != len(s.images) or self.i_vid != len(s.videos):
            raise BadSampleError(f"{s.where}: {self.i_img} <image> / {self.i_vid} <video> markers for "
                                 f"{len(s.images)} images / {len(s.videos)} videos")


class _Writer:
    """Turns template strings, text and image spans into one piece's ids and labels.

    Text is buffered and encoded in runs: a run ends at a special token, an image span or a change of
    the supervised flag; with `join_text=False` (ChatML) every text chunk is its own run."""

    def __init__(self, fmt: ChatFormat, span: _Span, frames: int, cursor: _MediaCursor):
        self.fmt, self.span, self.frames, self.cursor = fmt, span, frames, cursor
        self.piece = _Piece()
        self._text, self._train = "", False

    def _flush(self) -> None:
        if self._text:
            self.piece.add(self.fmt.tokenizer.encode(self._text), self._train)
        self._text = ""

    def text(self, text: str, train: bool) -> None:
        if not text:
            return
        if train != self._train or not self.fmt.template.join_text:
            self._flush()
        self._text, self._train = self._text + text, train

    def template(self, text: str, train: bool = False) -> None:
        for kind, part in self.fmt.template.pieces(text):
            if kind == "special":
                self._flush()
                self.piece.add([self.fmt.special_id(part)], train)
            else:
                self.text(part, train)

    def content(self, text: str, train: bool, text_too: bool = True) -> None:
        """`text` with its markers expanded in place; image spans are never trained on."""
        for part in _MARKERS.split(text):
            if part in (IMAGE_MARKER, VIDEO_MARKER):
                kind, path, index = self.cursor.next(part)
                self._flush()
                self.piece.media.append((kind, path))
                self.piece.add(self.span(kind, index) * (1 if kind == "image" else self.frames), train=False)
            elif text_too:
                self.text(part, train)

    def done(self) -> _Piece:
        self._flush()
        return self.piece


def _message(msg: dict, fmt: ChatFormat, span: _Span, k: int, cursor: _MediaCursor) -> _Piece:
    t = fmt.template
    role = msg["role"]
    w = _Writer(fmt, span, k, cursor)
    w.template(t.header[role])
    content = t.user_prefix + msg["content"] if role == "user" else msg["content"]
    w.content(content, train=role == "assistant")
    suffix = t.suffix[role]
    if role == "assistant":  # the end-of-turn token is learned with the answer: the model learns to stop
        w.template(t.end_of_turn, train=True)
        suffix = suffix[len(t.end_of_turn):]
    w.template(suffix)
    piece = w.done()
    piece.n_messages = 1
    return piece


def _count(pieces: list[_Piece], frames_per_video: int) -> tuple[int, int]:
    media = [m for p in pieces for m in p.media]
    return sum(kind == "image" for kind, _ in media), frames_per_video * sum(kind == "video" for kind, _ in media)


def _too_long(message: str, fmt: ChatFormat, prefix: _Piece, pairs: list[_Piece], mode: str,
              add_generation_prompt: bool) -> BadSampleError:
    """A too_long error carrying `length`, the sample's full rendered length (what max_length=None gives:
    every turn plus the closing or the generation header), so a skip report needs no second render."""
    t = fmt.template
    tail = t.header["assistant"] if add_generation_prompt else t.closing if mode == "chat" else ""
    w = _Writer(fmt, None, 0, None)
    w.template(tail)
    e = BadSampleError(message, "too_long")
    e.length = len(prefix.ids) + sum(len(p.ids) for p in pairs) + len(w.done().ids)
    return e


def _check_messages(sample: Sample) -> None:
    """Each message a dict with a known role and str content: the one check for every caller of render."""
    for i, m in enumerate(sample.messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadSampleError(f"{sample.where}: messages[{i}]: expected a dict with 'role' and 'content', "
                                 f"got {m!r}")
        if m["role"] not in ROLES:
            raise BadSampleError(f"{sample.where}: messages[{i}]: role {m['role']!r} is not one of {ROLES}")
        if not isinstance(m["content"], str):
            raise BadSampleError(f"{sample.where}: messages[{i}]: content must be a string, got "
                                 f"{type(m['content']).__name__}")


def _plain_turns(sample: Sample, fmt: ChatFormat, span: _Span, k: int, cursor: _MediaCursor) -> _Piece:
    """plain mode after the opening: the first user turn's image spans, the first answer and end of text."""
    msgs = sample.messages
    user = next((m for m in msgs if m["role"] == "user"), None)
    answer = next((m for m in msgs if m["role"] == "assistant"), None)
    if user is None or answer is None:
        raise BadSampleError(f"{sample.where}: plain mode needs a user turn and an assistant answer")
    if _MARKERS.search(answer["content"]):
        raise BadSampleError(f"{sample.where}: plain mode: the caption contains an image/video marker")
    w = _Writer(fmt, span, k, cursor)
    w.content(user["content"], False, text_too=False)
    w.text(answer["content"], train=True)
    w.done().add([fmt.eos_id], train=True)
    return w.piece


def _chat_pairs(sample: Sample, fmt: ChatFormat, span: _Span, k: int, cursor: _MediaCursor,
                prefix: _Piece, system_prompt: str | None, add_generation_prompt: bool) -> list[_Piece]:
    """chat mode: the system prompt (appended to `prefix`, or folded into the first user turn), then one
    piece per (user, answers) pair; a final unanswered question is dropped unless a prompt is wanted."""
    t = fmt.template
    body = list(sample.messages)
    system = None
    if body[0]["role"] == "system":
        system = body.pop(0)["content"]
    elif system_prompt:
        system = system_prompt
    elif t.default_system is not None:
        system = t.default_system
    if system is not None and t.folds_system:
        first = next((i for i, m in enumerate(body) if m["role"] == "user"), None)
        if first is not None:
            body[first] = {"role": "user", "content": t.system.format(system=system, content=body[first]["content"])}
        system = None
    if system is not None:
        prefix.extend(_message({"role": "system", "content": system}, fmt, span, k, cursor))
    pairs: list[_Piece] = []
    for m in body:
        if m["role"] == "system":
            raise BadSampleError(f"{sample.where}: a system message after the first turn")
        piece = _message(m, fmt, span, k, cursor)
        if m["role"] == "user":
            pairs.append(piece)
        elif not pairs:
            raise BadSampleError(f"{sample.where}: conversation starts with an assistant turn")
        else:
            pairs[-1].extend(piece)
    cursor.check_all_used()  # before any dropping: a marker/image mismatch is an error, not a skip
    if pairs and body[-1]["role"] == "user" and not add_generation_prompt:
        pairs.pop()  # an unanswered final question has nothing to learn from
    return pairs


def _fitting(prefix: _Piece, pairs: list[_Piece], max_length: int | None) -> list[_Piece]:
    """`prefix` and the leading pairs that fit in `max_length` together."""
    kept = [prefix]
    total = len(prefix.ids)
    for p in pairs:
        if max_length is not None and total + len(p.ids) > max_length:
            break  # drop this pair and every later one: whole turns, never part of a span
        kept.append(p)
        total += len(p.ids)
    return kept


def _template_piece(fmt: ChatFormat, span: _Span, k: int, cursor: _MediaCursor, text: str) -> _Piece:
    """The ids of template string `text` (unsupervised)."""
    w = _Writer(fmt, span, k, cursor)
    w.template(text)
    return w.done()


def _span_maker(fmt: ChatFormat, tokens_per_image, image_token_id: int | None) -> Callable[[str, int], list[int]]:
    """(kind, index) -> that image's (or each frame's) ids; spans of equal length are built once."""
    spans: dict[int, list[int]] = {}

    def span(kind: str, index: int) -> list[int]:
        n = tokens_per_image if isinstance(tokens_per_image, int) else int(tokens_per_image(kind, index))
        assert n > 0, f"{kind} {index}: {n} tokens"
        if n not in spans:
            spans[n] = fmt.image_span(n, image_token_id)
        return spans[n]

    return span


def render(
    sample: Sample,
    tokenizer,
    tokens_per_image: int | Callable[[str, int], int],
    mode: str = "chat",
    max_length: int | None = None,
    frames_per_video: int = 4,
    system_prompt: str | None = None,
    add_generation_prompt: bool = False,
    image_token_id: int | None = None,
) -> Rendered:
    """Token ids + labels of `sample` (see the module docstring). `tokenizer` is a ChatFormat or a Qwen
    tokenizer; `image_token_id` overrides the placeholder (pass the model's `VLM.image_token_id`)."""
    if add_generation_prompt and mode != "chat":
        raise ValueError("render: add_generation_prompt needs mode='chat'")
    if mode not in MODES:
        raise ValueError(f"render: mode must be one of {MODES}, got {mode!r}")
    assert frames_per_video > 0, frames_per_video
    fmt = as_chat_format(tokenizer)
    t = fmt.template
    if not sample.messages:
        raise BadSampleError(f"{sample.where}: empty conversation")
    if fmt.jinja is not None and mode == "chat":
        return _render_own(sample, fmt, tokens_per_image, max_length, system_prompt, add_generation_prompt,
                           image_token_id)
    cursor = _MediaCursor(sample)
    span = _span_maker(fmt, tokens_per_image, image_token_id)
    k = frames_per_video
    opening = _Writer(fmt, span, k, cursor)
    if t.bos:
        opening.template(t.bos)
    prefix = opening.done()

    if mode == "plain":
        prefix.extend(_plain_turns(sample, fmt, span, k, cursor))
        kept, pairs = [prefix], []
    else:
        _check_messages(sample)
        pairs = _chat_pairs(sample, fmt, span, k, cursor, prefix, system_prompt, add_generation_prompt)
        kept = _fitting(prefix, pairs, max_length)
        if add_generation_prompt and len(kept) != len(pairs) + 1:
            # Dropping trailing turns would drop the question being asked; shorten the history instead.
            raise _too_long(f"{sample.where}: too long: the prompt exceeds max_length {max_length}",
                            fmt, prefix, pairs, mode, add_generation_prompt)

    out = _Piece()
    for p in kept:
        out.extend(p)
    if max_length is not None and len(out.ids) > max_length:
        raise _too_long(f"{sample.where}: too long: {len(out.ids)} tokens > max_length {max_length}",
                        fmt, prefix, pairs, mode, add_generation_prompt)
    if add_generation_prompt:
        # Inference: the prompt ends with an open assistant header; nothing is supervised.
        out.extend(_template_piece(fmt, span, k, cursor, t.header["assistant"]))
        if max_length is not None and len(out.ids) > max_length:
            raise _too_long(f"{sample.where}: too long: prompt of {len(out.ids)} tokens > max_length "
                            f"{max_length}", fmt, prefix, pairs, mode, add_generation_prompt)
    else:
        if mode == "chat" and t.closing:
            out.extend(_template_piece(fmt, span, k, cursor, t.closing))
        if not any(lab != IGNORE_INDEX for lab in out.labels):
            if mode == "chat" and len(kept) == 1 and pairs:
                first = len(prefix.ids) + len(pairs[0].ids)
                raise _too_long(f"{sample.where}: too long: the first turn alone ({first} tokens) exceeds "
                                f"max_length {max_length}", fmt, prefix, pairs, mode, add_generation_prompt)
            raise BadSampleError(f"{sample.where}: no supervised (assistant) token", "no_target")
    n_img, n_frames = _count([out], k)
    dropped = pairs[len(kept) - 1:] if mode == "chat" else []
    d_img, d_frames = _count(dropped, k)
    return Rendered(out.ids, out.labels, n_images=n_img, n_frames=n_frames, media=out.media,
                    dropped_turns=sum(p.n_messages for p in dropped), dropped_images=d_img + d_frames)


def _render_own(sample: Sample, fmt: ChatFormat, tokens_per_image, max_length: int | None,
                system_prompt: str | None, add_generation_prompt: bool, image_token_id: int | None) -> Rendered:
    """chat mode under the checkpoint's own Jinja template (`fmt.jinja`): dataset/hf_template.py's rendering,
    so the ids are its processor's; spans are the placeholder repeated, as that processor writes them."""
    _check_messages(sample)
    tok = fmt.tokenizer.hf_tokenizer
    pad = fmt.image_token_id if image_token_id is None else image_token_id
    if isinstance(tokens_per_image, int):
        count = lambda i: tokens_per_image  # noqa: E731
    else:
        count = lambda i: int(tokens_per_image("image", i))  # noqa: E731
    if add_generation_prompt:
        ids = prompt_own(sample, tok, fmt.jinja, count, pad, system_prompt)
        if max_length is not None and len(ids) > max_length:
            e = BadSampleError(f"{sample.where}: too long: prompt of {len(ids)} tokens > max_length {max_length}",
                               "too_long")
            e.length = len(ids)
            raise e
        labels, dropped, used = [IGNORE_INDEX] * len(ids), 0, len(sample.images)
    else:
        ids, labels, dropped, used = render_own(sample, tok, fmt.jinja, count, pad, max_length, system_prompt)
    return Rendered(ids, labels, n_images=used, media=[("image", p) for p in sample.images[:used]],
                    dropped_turns=dropped, dropped_images=len(sample.images) - used)


def estimate_length(
    sample: Sample,
    tokens_per_image: int | Callable[[str, int], int],
    mode: str = "chat",
    frames_per_video: int = 4,
    tokenizer=None,
) -> int:
    """Length of the rendered sample without decoding images: exact with a tokenizer, else ~bytes/4."""
    if tokenizer is not None:
        return len(render(sample, tokenizer, tokens_per_image, mode, None, frames_per_video).input_ids)
    count = (lambda kind, i: tokens_per_image) if isinstance(tokens_per_image, int) else tokens_per_image
    n, i_img, i_vid = 0, 0, 0
    for m in sample.messages:
        text = m["content"]
        for part in _MARKERS.findall(text):
            if part == IMAGE_MARKER:
                n, i_img = n + count("image", i_img) + 2, i_img + 1
            else:
                n, i_vid = n + (count("video", i_vid) + 2) * frames_per_video, i_vid + 1
        n += len(_MARKERS.sub("", text).encode("utf-8")) // 4 + 1 + (5 if mode == "chat" else 0)
    return n


def render_answer(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """An assistant answer after a generation prompt (`render(..., add_generation_prompt=True)`): its content
    and end-of-turn token supervised, the rest of the template's assistant suffix and `closing` not; the same
    ids the whole conversation's rendering gives after that prompt. Preference pairs render their prompt once
    and each answer with this. `text` must hold no image / video marker."""
    fmt = as_chat_format(tokenizer)
    t = fmt.template
    if _MARKERS.search(text):
        raise ValueError("render_answer: an answer holds no image / video marker")
    w = _Writer(fmt, None, 0, None)
    w.content(text, train=True)
    w.template(t.end_of_turn, train=True)
    w.template(t.suffix["assistant"][len(t.end_of_turn):])
    if t.closing:
        w.template(t.closing)
    piece = w.done()
    return piece.ids, piece.labels
