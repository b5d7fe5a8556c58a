"""Rendering a `Sample` with a checkpoint's OWN Jinja chat template: the one renderer behind the released wrapper
families (model/released.py, through dataset/hf_chat.py) and native imports whose template is none of ours
(LLaVA-1.5's "USER: <image>\\n... ASSISTANT: ..." through `dataset.rendering.render`, `ChatFormat.jinja`).

Contract:
- `hf_messages(sample)` turns our messages (`<image>` / `<video>` markers in a string) into the
  transformers multimodal form: `content` a list of `{"type": "text", "text": ...}` / `{"type": "image"}` /
  `{"type": "video"}` parts, in order. The template decides where each part goes (LLaVA-1.5's puts a
  message's images before its text), exactly as the released processor's `apply_chat_template` does.
- `render_hf(sample, template_fn, tokenize, image_token, image_counts, max_length, span_ids)` ->
  `(input_ids, labels)`: the text is rendered once per assistant turn boundary
  (`template_fn(messages[:k], add_generation_prompt)`) and each render must be a prefix of the full one, else
  the template is refused (it rewrites earlier turns); the characters between "prompt of turn k" and "end of
  turn k" are the assistant's (content + end of turn, as the template writes them). The i-th `image_token`
  in the text is repeated `image_counts[i]` times, as the processor does, then the WHOLE text is tokenized
  once (`tokenize(text) -> (ids, offsets)`, the tokenizer's own special tokens included, e.g. Llama's BOS),
  so the ids are the processor's for any tokenizer; a token is labelled when its first character lies in an
  assistant stretch (what transformers' `{% generation %}` assistant mask marks), every token in `span_ids`
  (the image placeholder and its markers) is -100.
- Truncation: whole (user, assistant) pairs are dropped from the end until the sample fits `max_length`;
  spans are never cut. A sample whose first pair does not fit raises `BadSampleError(kind="too_long")`.
- `render_own(sample, tokenizer, jinja, count, image_token_id, ...)` -> `(ids, labels, dropped_messages,
  kept_images)` for `dataset.rendering.render` (a transformers tokenizer and its template text);
  `prompt_own(...)` -> the prompt ids with the reply header (`add_generation_prompt=True`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..core.loss import IGNORE_INDEX
from .sample import IMAGE_MARKER, VIDEO_MARKER, BadSampleError, Sample

_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")
Tokenize = Callable[[str], tuple[list[int], list[tuple[int, int]]]]  # text -> (ids, char offsets)


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
        out.append({"role": msg["role"], "content": parts})
    return out


def expand_images(text: str, image_token: str, counts: list[int]) -> str:
    """Repeat the i-th `image_token` in `text` `counts[i]` times (the processor's expansion)."""
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(counts):
        raise BadSampleError(f"the template wrote {len(pieces) - 1} image token(s) for {len(counts)} image(s)")
    out = [pieces[0]]
    for n, rest in zip(counts, pieces[1:]):
        out.append(image_token * n + rest)
    return "".join(out)


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


def _fit(sample: Sample, template_fn: Callable[[list[dict], bool], str], tokenize: Tokenize, image_token: str,
         image_counts: list[int], max_length: int | None) -> tuple[list[int], list[int], int, int]:
    """(ids, labels, messages kept, images kept) of the longest leading run of turn pairs that fits."""
    messages = hf_messages(sample)
    n_pairs = sum(m["role"] == "assistant" for m in messages)
    if n_pairs == 0:
        raise BadSampleError(f"{sample.where}: no assistant turn to train on", kind="no_target")
    while n_pairs > 0:
        cut = _cut_after(messages, n_pairs)
        used = sum(_count_images(m) for m in cut)
        ids, labels = _label(_segments(cut, template_fn), tokenize, image_token, image_counts[:used])
        if max_length is None or len(ids) <= max_length:
            return ids, labels, len(cut), used
        n_pairs -= 1
    raise BadSampleError(f"{sample.where}: its first turn is longer than max_length={max_length}", kind="too_long")


def render_hf(
    sample: Sample,
    template_fn: Callable[[list[dict], bool], str],
    tokenize: Tokenize,
    image_token: str,
    image_counts: list[int],
    max_length: int | None = None,
    span_ids: frozenset[int] = frozenset(),
) -> tuple[list[int], list[int]]:
    """input_ids and labels (assistant tokens only) of `sample` under the checkpoint's template; tokens in
    `span_ids` (the image span's placeholder and markers) are -100 even inside an assistant turn."""
    ids, labels, _, _ = _fit(sample, template_fn, tokenize, image_token, image_counts, max_length)
    return ids, [IGNORE_INDEX if t in span_ids else y for t, y in zip(ids, labels)]


def _cut_after(messages: list[dict], n_pairs: int) -> list[dict]:
    """The messages up to and including the `n_pairs`-th assistant turn."""
    seen = 0
    for i, m in enumerate(messages):
        seen += m["role"] == "assistant"
        if seen == n_pairs:
            return messages[: i + 1]
    return messages


def _count_images(message: dict) -> int:
    return sum(part.get("type") == "image" for part in message["content"])


def _label(segs: list[tuple[str, bool]], tokenize: Tokenize, image_token: str,
           counts: list[int]) -> tuple[list[int], list[int]]:
    """Expand each segment's images, tokenize the whole text once, label tokens starting in an assistant piece."""
    texts: list[str] = []
    trained: list[tuple[int, int]] = []  # [start, end) character ranges of the assistant pieces
    k = pos = 0
    for text, train in segs:
        n = text.count(image_token)
        piece = expand_images(text, image_token, counts[k:k + n])
        k += n
        if train:
            trained.append((pos, pos + len(piece)))
        texts.append(piece)
        pos += len(piece)
    if k != len(counts):
        raise BadSampleError(f"{len(counts)} image(s) but the template wrote {k} image token(s)")
    ids, offsets = tokenize("".join(texts))
    labels = [t if e > s and any(a <= s < b for a, b in trained) else IGNORE_INDEX
              for t, (s, e) in zip(ids, offsets)]
    return ids, labels


def offsets_tokenizer(tokenizer: Any) -> Tokenize:
    """A transformers fast tokenizer as `text -> (ids, offsets)`, its own special tokens added (the processor's
    call: Llama's BOS; nothing for Qwen2's)."""

    def tokenize(text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = tokenizer(text, return_offsets_mapping=True)
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
    counts = [count(i) for i in range(len(sample.images))]
    ids, labels, kept, used = _fit(sample, _template_fn(tokenizer, jinja), offsets_tokenizer(tokenizer),
                                   image_token, counts, max_length)
    labels = [IGNORE_INDEX if t == image_token_id else y for t, y in zip(ids, labels)]
    return ids, labels, len(sample.messages) - kept, used


def prompt_own(sample: Sample, tokenizer: Any, jinja: str, count: Callable[[int], int], image_token_id: int,
               system_prompt: str | None = None) -> list[int]:
    """The prompt ids (the template's reply header appended) of `sample`'s messages."""
    sample = _own_sample(sample, system_prompt)
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    text = _template_fn(tokenizer, jinja)(hf_messages(sample), True)
    text = expand_images(text, image_token, [count(i) for i in range(text.count(image_token))])
    return offsets_tokenizer(tokenizer)(text)[0]
