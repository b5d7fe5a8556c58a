"""Rendering a `Sample` with a checkpoint's OWN Jinja chat template: the one renderer behind the released wrapper
families (model/released.py, through dataset/hf_chat.py) and native imports whose template is none of ours
(LLaVA-1.5's "USER: <image>\\n... ASSISTANT: ..." through `dataset.rendering.render`, `ChatFormat.jinja`).

Contract:
- `hf_messages(sample)` turns our messages (`<image>` / `<video>` markers in a string) into the
  transformers multimodal form: `content` a list of `{"type": "text", "text": ...}` / `{"type": "image"}` /
  `{"type": "video"}` parts, in order (an empty message: one empty text part). The template decides where each
  part goes (LLaVA-1.5's puts a message's images before its text), as the processor's `apply_chat_template` does.
- `SpanRule(token, part, spans)`: one kind of media (`part`: "image" | "video", the message part type). The
  template writes `token` once per item; `spans(n)` is the processor's own text for each of the first n items
  (Qwen2-VL, LLaVA: the token repeated; Idefics3: tiles with row/col markers and the global image; OneVision: a
  count that depends on how many images the sample holds, so n is the number the rendered turns keep).
  `expand_spans(text, {token: [span text, ...]})` replaces each token's i-th occurrence by its i-th span.
- `render_hf(sample, template_fn, tokenize, rules, max_length, span_ids)` -> `(input_ids, labels, kept)`: the
  text is rendered once per assistant turn boundary (`template_fn(messages[:k], add_generation_prompt)`) and
  each render must be a prefix of the full one, else the template is refused (it rewrites earlier turns); the
  pieces between "prompt of turn k" and "end of turn k" are the assistant's (content + end-of-turn, as the
  template writes them) and get labels, everything else -100. Each rule's i-th `token` in the text is replaced
  by its i-th span. The whole text is then tokenized once, as the processor does (`tokenize(text) -> (ids,
  character offsets)`, a fast tokenizer's; a BPE merge across a turn boundary is the processor's too), and
  labels come from the offsets: a token starting inside an assistant piece is labelled unless it overlaps a
  span or is in `span_ids` (markers the template writes around a span); a token with no characters (a BOS the
  tokenizer adds) is -100. (A token starting in an assistant piece's last characters and running on, as
  Llama's "▁USER:" after LLaVA-1.5's trailing space, is the assistant's: transformers' `{% generation %}`
  mask marks it too.) `kept` = `{part: items the kept turns hold}`.
- Truncation: whole (user, assistant) pairs are dropped from the end until the sample fits `max_length`;
  spans are never cut. A sample whose first pair does not fit raises `BadSampleError(kind="too_long")`.
- `offsets_tokenizer(tokenizer)`: a fast tokenizer as `tokenize` (its special ids unless the text already
  starts with its BOS: transformers' chat rule). `render_own(sample, tokenizer, jinja, count, image_token_id,
  ...)` -> `(ids, labels, dropped_messages, kept_images)` and `prompt_own(...)` -> prompt ids with the reply
  header: what `dataset.rendering.render` calls for a template given as text (each image span = the
  placeholder repeated `count(i)` times, as LlavaProcessor writes it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.loss import IGNORE_INDEX
from .sample import IMAGE_MARKER, VIDEO_MARKER, BadSampleError, Sample

Tokenize = Callable[[str], tuple[list[int], list[tuple[int, int]]]]  # text -> (ids, char offsets)

_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")


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
    tokenize: Tokenize,
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



def offsets_tokenizer(tokenizer: Any) -> Tokenize:
    """A transformers fast tokenizer as `text -> (ids, offsets)`, tokenized as transformers' chat path does: its
    special ids (Llama's BOS) unless the text already starts with its BOS."""
    if not getattr(tokenizer, "is_fast", False):
        raise BadSampleError("the checkpoint's tokenizer has no tokenizer.json (a fast tokenizer is needed to label "
                             "by character offsets)", kind="bad_record")

    def tokenize(text: str) -> tuple[list[int], list[tuple[int, int]]]:
        bos = tokenizer.bos_token
        enc = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)), return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    return tokenize


def _template_fn(tokenizer: Any, jinja: str) -> Callable[[list[dict], bool], str]:
    def fn(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    return fn


def _own_sample(sample: Sample, system_prompt: str | None) -> Sample:
    if sample.videos:
        raise BadSampleError(f"{sample.where}: videos are not supported with the checkpoint's own template yet",
                             kind="bad_video")
    if system_prompt and sample.messages and sample.messages[0]["role"] != "system":
        return Sample(id=sample.id, messages=[{"role": "system", "content": system_prompt}, *sample.messages],
                      images=sample.images, videos=sample.videos, source=sample.source)
    return sample


def render_own(sample: Sample, tokenizer: Any, jinja: str, count: Callable[[int], int], image_token_id: int,
               max_length: int | None = None, system_prompt: str | None = None) -> tuple[list[int], list[int], int, int]:
    """A training sample under template text `jinja` with the transformers `tokenizer`: (ids, labels, messages
    dropped, images kept); `count(i)` is the i-th image's span length; every placeholder is -100."""
    sample = _own_sample(sample, system_prompt)
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    template, tokenize = _template_fn(tokenizer, jinja), offsets_tokenizer(tokenizer)
    ends = [i for i, m in enumerate(sample.messages) if m["role"] == "assistant"]
    if not ends:
        raise BadSampleError(f"{sample.where}: no assistant turn to train on", kind="no_target")
    for end in reversed(ends):  # whole (user, assistant) pairs dropped from the end until it fits
        kept = sample.messages[: end + 1]
        n_img = sum(m["content"].count(IMAGE_MARKER) for m in kept)
        cut = Sample(id=sample.id, messages=kept, images=sample.images[:n_img], source=sample.source)
        rule = SpanRule(image_token, "image", lambda n: [image_token * count(i) for i in range(n)])
        ids, labels, _ = render_hf(cut, template, tokenize, [rule], span_ids=frozenset({image_token_id}))
        if max_length is None or len(ids) <= max_length:
            return ids, labels, len(sample.messages) - len(kept), n_img
    raise BadSampleError(f"{sample.where}: its first turn is longer than max_length={max_length}", kind="too_long")


def prompt_own(sample: Sample, tokenizer: Any, jinja: str, count: Callable[[int], int], image_token_id: int,
               system_prompt: str | None = None) -> list[int]:
    """The prompt ids (the template's reply header appended) of `sample`'s messages."""
    sample = _own_sample(sample, system_prompt)
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    text = _template_fn(tokenizer, jinja)(hf_messages(sample), True)
    spans = [image_token * count(i) for i in range(text.count(image_token))]
    return offsets_tokenizer(tokenizer)(expand_spans(text, {image_token: spans}))[0]
