"""Rendering a `Sample` with a released checkpoint's OWN chat template (the wrapper families of model/released.py).

Contract:
- The template is the checkpoint's: `processor.chat_template` / `tokenizer.chat_template`, which transformers
  reads from chat_template.jinja / chat_template.json / tokenizer_config.json in the directory. Nothing here
  writes a template; a checkpoint without one is refused with one line naming the directory.
- The rendering (`hf_messages`, `SpanRule`, `expand_spans`, `render_hf`: the text rendered per turn boundary,
  each media token replaced by the processor's span text, tokenized once, labels by character offsets, spans
  -100, truncation by whole turns) lives in dataset/hf_template.py, shared with native imports whose template
  is none of ours (LLaVA-1.5's); it is re-exported here.
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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..core.loss import IGNORE_INDEX
from .collator import Batch
from .dataset import _parse_paths
from .formats import normalize, read_records, resolve_path
from .hf_template import SpanRule, expand_spans, hf_messages, render_hf
from .images import load_image, load_video_frames
from .sample import BadSampleError, Sample

__all__ = ["ReleasedDataset", "SpanRule", "expand_spans", "hf_messages", "released_collate", "render_hf",
           "stack_image_inputs"]

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
