"""Rendering a `Sample` with a released checkpoint's OWN chat template (the wrapper families of model/released.py).

Contract:
- The template is the checkpoint's: `processor.chat_template` / `tokenizer.chat_template`, which transformers
  reads from chat_template.jinja / chat_template.json / tokenizer_config.json in the directory. Nothing here
  writes a template; a checkpoint without one is refused with one line naming the directory.
- `hf_messages(sample)` turns our messages (`<image>` / `<video>` markers in a string) into the
  transformers multimodal form: `content` a list of `{"type": "text", "text": ...}` / `{"type": "image"}` /
  `{"type": "video"}` parts, in order.
- `render_hf(sample, template_fn, tokenize, rules, max_length, span_ids)` -> `(input_ids, labels, kept)`:
  the text is rendered once per assistant turn boundary (`template_fn(messages[:k], add_generation_prompt)`)
  and each render must be a prefix of the full one, else the template is refused (it rewrites earlier turns);
  the pieces between "prompt of turn k" and "end of turn k" are the assistant's (content + end-of-turn, as
  the template writes them) and get labels, everything else -100. The expanded text is tokenized ONCE, as
  the processor does (`tokenize(text) -> (ids, offsets)`, the tokenizer's own leading ids such as a Vicuna
  `<s>` included): a merge across a turn boundary is the processor's too; a token is a target when its
  characters overlap an assistant piece (transformers' assistant-mask rule). Each `SpanRule(token, part, counts)` says
  how one kind of media (image / video) becomes its span: the i-th `token` in the text is repeated
  `counts(n)[i]` times, as the processor does, before tokenizing (n = the items of that part the kept turns
  hold), so every span token (and the template's start/end markers around it, `span_ids`) is -100; `kept`
  = `{part: n}`.
- `ReleasedDataset(paths, render, max_length, ..., video_folder=None, frames_per_video=None)`: our data files
  (every format dataset/formats.py reads) as items `render(sample, images, max_length[, videos=...]) ->
  {"input_ids", "labels", <the processor's image / video inputs>}`; each video is `frames_per_video` frames
  from our frame sampler (`load_video_frames`), a list of PIL images; `frames_per_video=None` (a family
  without videos) refuses a video sample. A bad sample is skipped and counted (strict: raised), as in
  `VLMDataset`.
- `concat_inputs(parts)` / `released_collate(pad_id)`: right-pads input_ids / labels / attention_mask `[B, T]`
  and concatenates every processor input in item order (Qwen2-VL: pixel_values `[sum patches, C*T*P*P]`,
  image_grid_thw `[n, 3]`; LLaVA-NeXT / OneVision: pixel_values `[n, patches, C, H, W]` zero-padded on the
  patch axis to the widest, image_sizes `[n, 2]`, batch_num_images `[samples]`; pixel_values_videos
  `[videos, frames, C, H, W]`).
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


# text -> (ids, character offsets [(start, end)] of each id), the tokenizer's own special ids included
TokenizeFn = Callable[[str], tuple[list[int], list[tuple[int, int]]]]


@dataclass(frozen=True)
class SpanRule:
    """How one kind of media becomes its span: the template writes `token` once per item (a message part of
    type `part`), the processor repeats it `counts(n)[i]` times, where n is how many items of this kind the
    rendered turns keep (OneVision counts a sample's images by how many it holds)."""

    token: str
    part: str  # "image" | "video"
    counts: Callable[[int], list[int]]


def render_hf(
    sample: Sample,
    template_fn: Callable[[list[dict], bool], str],
    tokenize: TokenizeFn,
    rules: list[SpanRule],
    max_length: int | None = None,
    span_ids: frozenset[int] = frozenset(),
) -> tuple[list[int], list[int], dict[str, int]]:
    """input_ids, labels (assistant tokens only) and the items kept per part (`{"image": n, "video": m}`) of
    `sample` under the checkpoint's template; tokens in `span_ids` (the spans' placeholders and markers) are
    -100 even inside an assistant turn."""
    messages = hf_messages(sample)
    n_pairs = sum(m["role"] == "assistant" for m in messages)
    if n_pairs == 0:
        raise BadSampleError(f"{sample.where}: no assistant turn to train on", kind="no_target")
    while n_pairs > 0:
        cut = _cut_after(messages, n_pairs)
        kept = {r.part: sum(_count_parts(m, r.part) for m in cut) for r in rules}
        counts = {r.token: list(r.counts(kept[r.part])) for r in rules}
        ids, labels = _tokenize(_segments(cut, template_fn), tokenize, counts)
        if max_length is None or len(ids) <= max_length:
            return ids, [IGNORE_INDEX if t in span_ids else y for t, y in zip(ids, labels)], kept
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


def expand_spans(text: str, counts: dict[str, list[int]]) -> str:
    """Each placeholder token of `counts` expanded in turn: its i-th occurrence repeated counts[token][i] times."""
    for token, n in counts.items():
        text = expand_images(text, token, n)
    return text


def _tokenize(segs: list[tuple[str, bool]], tokenize: TokenizeFn,
              counts: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    """The whole conversation tokenized at once (as the processor does: a BPE merge may cross a turn
    boundary), spans expanded in place; a token is a target when its characters overlap an assistant piece
    (transformers' assistant-mask rule)."""
    pieces: list[tuple[str, bool]] = []
    used = dict.fromkeys(counts, 0)
    for text, train in segs:
        here = {}
        for token, n in counts.items():
            k = text.count(token)
            here[token], used[token] = n[used[token]:used[token] + k], used[token] + k
        pieces.append((expand_spans(text, here), train))
    for token, n in counts.items():
        if used[token] != len(n):
            raise BadSampleError(f"{len(n)} item(s) for {token} but the template wrote {used[token]}")
    targets, pos = [], 0
    for text, train in pieces:
        if train:
            targets.append((pos, pos + len(text)))
        pos += len(text)
    ids, offsets = tokenize("".join(text for text, _ in pieces))
    labels = [t if any(s < b and e > a for a, b in targets) else IGNORE_INDEX for t, (s, e) in zip(ids, offsets)]
    return ids, labels


def concat_inputs(parts: list[dict]) -> dict[str, torch.Tensor]:
    """The processor outputs of several samples as one batch, in order: tensors concatenated on dim 0; a 5-D
    `[n, patches, C, H, W]` (LLaVA-NeXT / OneVision crops, padded per call to its widest image) is zero-padded
    on dim 1 to the widest in the batch first (the model reads each image's own patch count)."""
    out: dict[str, torch.Tensor] = {}
    for k in sorted({k for p in parts for k, v in p.items() if isinstance(v, torch.Tensor)}):
        tensors = [p[k] for p in parts if k in p]
        if tensors[0].dim() == 5 and k == "pixel_values":
            width = max(t.shape[1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, width - t.shape[1])) for t in tensors]
        out[k] = torch.cat(tensors)  # [sum over samples, ...]
    return out


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


def released_collate(pad_id: int) -> Callable[[list[dict]], Batch]:
    """Right-padded ids / labels / mask and the concatenated image inputs of a micro-batch."""

    def collate(items: list[dict]) -> Batch:
        T = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)  # [B, T]
        labels = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(items), T), dtype=torch.long)  # [B, T]
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(it["input_ids"]), torch.tensor(it["labels"]), 1
        batch = Batch(input_ids=input_ids, attention_mask=mask, labels=labels)
        for k, v in concat_inputs(items).items():
            batch[k] = v  # [sum over items, ...] in item order
        batch.ids = [it.get("id") for it in items]
        batch.skipped = [rec for it in items for rec in it.get("skipped", [])]
        return batch

    return collate
