"""Rendering a `Sample` with a released checkpoint's OWN chat template (the wrapper families of model/released.py).

Contract:
- The template is the checkpoint's: `processor.chat_template` / `tokenizer.chat_template`, which transformers
  reads from chat_template.jinja / chat_template.json / tokenizer_config.json in the directory. Nothing here
  writes a template; a checkpoint without one is refused with one line naming the directory.
- `hf_messages(sample)` turns our messages (`<image>` / `<video>` markers in a string) into the
  transformers multimodal form: `content` a list of `{"type": "text", "text": ...}` / `{"type": "image"}` /
  `{"type": "video"}` parts, in order.
- `render_hf(sample, template_fn, tokenize, image_token, image_counts, max_length)` -> `(input_ids, labels)`:
  the text is rendered once per assistant turn boundary (`template_fn(messages[:k], add_generation_prompt)`)
  and each render must be a prefix of the full one, else the template is refused (it rewrites earlier turns);
  the pieces between "prompt of turn k" and "end of turn k" are the assistant's (content + end-of-turn, as
  the template writes them) and get labels, everything else -100. The i-th `image_token` in the text is
  repeated `image_counts[i]` times, as the processor does, before tokenizing, so every image-span token
  (and the template's start/end markers around it) is -100.
- Truncation: whole (user, assistant) pairs are dropped from the end until the sample fits `max_length`;
  spans are never cut. A sample whose first pair does not fit raises `BadSampleError(kind="too_long")`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..core.loss import IGNORE_INDEX
from .sample import IMAGE_MARKER, VIDEO_MARKER, BadSampleError, Sample

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


def render_hf(
    sample: Sample,
    template_fn: Callable[[list[dict], bool], str],
    tokenize: Callable[[str], list[int]],
    image_token: str,
    image_counts: list[int],
    max_length: int | None = None,
    span_ids: frozenset[int] = frozenset(),
) -> tuple[list[int], list[int]]:
    """input_ids and labels (assistant tokens only) of `sample` under the checkpoint's template; tokens in
    `span_ids` (the image span's placeholder and markers) are -100 even inside an assistant turn."""
    messages = hf_messages(sample)
    n_pairs = sum(m["role"] == "assistant" for m in messages)
    if n_pairs == 0:
        raise BadSampleError(f"{sample.where}: no assistant turn to train on", kind="no_target")
    while n_pairs > 0:
        cut = _cut_after(messages, n_pairs)
        used = sum(_count_images(m) for m in cut)
        ids, labels = _tokenize(_segments(cut, template_fn), tokenize, image_token, image_counts[:used])
        if max_length is None or len(ids) <= max_length:
            return ids, [IGNORE_INDEX if t in span_ids else y for t, y in zip(ids, labels)]
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


def _count_images(message: dict) -> int:
    return sum(part.get("type") == "image" for part in message["content"])


def _tokenize(segs: list[tuple[str, bool]], tokenize: Callable[[str], list[int]], image_token: str,
              counts: list[int]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    k = 0
    for text, train in segs:
        n = text.count(image_token)
        piece = tokenize(expand_images(text, image_token, counts[k:k + n]))
        k += n
        ids += piece
        labels += piece if train else [IGNORE_INDEX] * len(piece)
    if k != len(counts):
        raise BadSampleError(f"{len(counts)} image(s) but the template wrote {k} image token(s)")
    return ids, labels
