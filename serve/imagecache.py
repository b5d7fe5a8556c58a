"""Images by content: per-image keys, per-image inputs, and a bounded LRU cache of each image's placeholder
rows, so an image seen in an earlier turn (or any recent request) is not run through the towers again.

Contract:
- `concat_image_inputs([inputs, ...])`: several rows' (or images') inputs as one prefill's, each key
  concatenated in order (the inverse of `split_image_inputs`).
- `split_image_inputs(inputs) -> [inputs of one image]`: one conversation's `vlm.image_inputs(...)` cut image
  by image (fixed: one `pixel_values` row each; anyres: `image_crops[i]` rows plus row i of `image_sizes` /
  `image_crops`; native / naflex: `image_grid[i]` rows*cols patch rows plus row i of `image_sizes` /
  `image_grid`); concatenating the pieces in order gives `inputs` back.
- `image_key(one_image_inputs) -> str`: a digest of the image's model inputs (key names, dtypes, shapes and
  bytes). Those inputs are the decoded pixels after the model's resolution rule (size, crops or patch grid,
  normalisation), so two images share a key exactly when the towers would see the same input: the resolution
  settings are part of the key by construction, and a different picture never hits.
- `span_tokens(vlm, inputs) -> [int]`: each image's placeholder count in one conversation (fixed:
  `vlm.tokens_per_image`; otherwise `vlm.resolution.layout(width, height, n_images).tokens`).
- `ImageCache(max_bytes)`: `get(key) -> rows [n_tokens, D] | None` (a hit moves the entry to the most recently
  used end), `put(key, rows)` (evicts least recently used entries until the total is within `max_bytes`; rows
  larger than the whole budget are not kept), `stats() -> dict` (hits, misses, evictions, entries, bytes,
  max_bytes). `max_bytes=0` keeps nothing (every lookup misses). Used from the engine thread only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch

ImageInputs = dict[str, torch.Tensor]


def concat_image_inputs(parts: list[ImageInputs]) -> ImageInputs:
    """Several rows' image inputs -> one prefill's: each key concatenated in row order (rows without images
    add nothing). The per-image keys go image by image like `pixel_values`, as the collator does."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    keys = set(parts[0])
    for p in parts[1:]:
        if set(p) != keys:
            raise ValueError(f"rows with different image input keys in one prefill: {sorted(keys)} vs {sorted(p)}")
    return {k: torch.cat([p[k] for p in parts]) for k in sorted(keys)}


def _pixel_rows(inputs: ImageInputs) -> list[int]:
    """`pixel_values` rows per image (crops or patches)."""
    if "image_crops" in inputs:
        return [int(c) for c in inputs["image_crops"].tolist()]
    if "image_grid" in inputs:
        return [int(h) * int(w) for h, w in inputs["image_grid"].view(-1, 2).tolist()]
    return [1] * int(inputs["pixel_values"].shape[0])


def split_image_inputs(inputs: ImageInputs) -> list[ImageInputs]:
    if not inputs:
        return []
    out, start = [], 0
    for i, n in enumerate(_pixel_rows(inputs)):
        one = {"pixel_values": inputs["pixel_values"][start:start + n]}  # [crops or patches, 3, s, s]
        for k, v in inputs.items():
            if k != "pixel_values":
                one[k] = v[i:i + 1]  # the per-image keys: one row each
        out.append(one)
        start += n
    assert start == inputs["pixel_values"].shape[0], (start, inputs["pixel_values"].shape)
    return out


def image_key(one: ImageInputs) -> str:
    h = hashlib.blake2b(digest_size=20)
    for k in sorted(one):
        t = one[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def span_tokens(vlm: Any, inputs: ImageInputs) -> list[int]:
    if not inputs:
        return []
    res = getattr(vlm, "resolution", None)
    if res is None or res.mode == "fixed":
        return [int(vlm.tokens_per_image)] * int(inputs["pixel_values"].shape[0])
    sizes = inputs["image_sizes"].view(-1, 2).tolist()  # (height, width) per image
    return [res.layout(int(w), int(h), len(sizes)).tokens for h, w in sizes]


class ImageCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> torch.Tensor | None:
        rows = self.entries.get(key)
        if rows is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return rows

    def put(self, key: str, rows: torch.Tensor) -> None:
        size = rows.numel() * rows.element_size()
        if key in self.entries or size > self.max_bytes:
            return
        self.entries[key] = rows.detach()
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)  # the least recently used
            self.bytes -= old.numel() * old.element_size()
            self.evictions += 1

    def stats(self) -> dict:
        return dict(hits=self.hits, misses=self.misses, evictions=self.evictions, entries=len(self.entries),
                    bytes=self.bytes, max_bytes=self.max_bytes)
