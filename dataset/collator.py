"""`Collator`: dynamic padding of `VLMDataset` items into one batch.

`Collator(pad_id, padding_side="right", pad_to_multiple_of=None)(items) -> Batch` with
- `input_ids` LongTensor [B, T] (T = longest item, rounded up to `pad_to_multiple_of`), padded with `pad_id`;
- `attention_mask` LongTensor [B, T], 1 on real tokens, 0 on padding;
- `labels` LongTensor [B, T], -100 on padding;
- `pixel_values` FloatTensor [n_images_total, 3, H, W]: every item's rows concatenated in sample order
  (rows of item 0, then item 1, ...), or None when no item has an image;
- `image_counts` LongTensor [B]: images (image spans) per item;
- variable resolution modes (items from `VLMDataset(resolution=...)`): `pixel_values` holds every image's
  crops or patches ([sum rows, 3, s, s], item after item), and each per-image key the items carry
  (`IMAGE_KEYS`: `image_sizes` [n, 2], `image_crops` [n], `image_grid` [n, 2]) is concatenated in the same
  sample order ([n_images_total, ...]); `image_counts` still counts images, not rows;
- `image_features` FloatTensor [n_images_total, T, C], only when the items come from a feature cache
  (`VLMDataset(feature_cache=...)`): the cached tower outputs in the same order (`pixel_values` is None).
`Batch` is a dict holding exactly those keys (so `model(**batch)` works) with two attributes outside the
dict: `ids` (sample ids) and `skipped` (skip records made in the worker that built the batch; hand them to
`VLMDataset.absorb`).
"""

from __future__ import annotations

import torch

from .rendering import IGNORE_INDEX

# visual/pixels.py's META_KEYS (dataset/ sits below visual/, so it is spelled here; a test holds them equal).
IMAGE_KEYS = ("image_sizes", "image_crops", "image_grid")


def gather_images(items: list[dict], who: str) -> tuple[list[int], dict[str, torch.Tensor | None]]:
    """Images per item and the batch's image tensors, concatenated in item order: `pixel_values` (None when
    no item has one), `image_features` (feature cache) and each per-image key present (IMAGE_KEYS).

    An item's image count is its pixel rows in fixed mode (one row per span: checked against `n_images`)
    and its `n_images` when it carries per-image keys (rows are crops / patches then; each key must have
    one row per image)."""
    pix = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
    feats = [it["image_features"] for it in items if it.get("image_features") is not None]
    if pix and feats:
        raise ValueError(f"{who}: a batch mixes pixel_values and cached image_features")
    rows_of = "image_features" if feats else "pixel_values"
    counts = []
    for it in items:
        rows = 0 if it.get(rows_of) is None else int(it[rows_of].shape[0])
        keys = [k for k in IMAGE_KEYS if it.get(k) is not None]
        n = int(it.get("n_images", rows))
        for k in keys:
            if int(it[k].shape[0]) != n:
                raise ValueError(f"{who}: item {it.get('id')}: {k} has {it[k].shape[0]} rows for {n} images")
        if not keys and rows != n:
            raise ValueError(f"{who}: item {it.get('id')}: {rows} image rows, {n} spans")
        counts.append(n)
    out: dict[str, torch.Tensor | None] = {"pixel_values": torch.cat(pix) if pix else None}  # [rows, 3, H, W]
    if feats:
        out["image_features"] = torch.cat(feats)  # [n_images_total, T, C]
    for k in IMAGE_KEYS:
        parts = [it[k] for it in items if it.get(k) is not None]
        if parts:
            out[k] = torch.cat(parts)  # [n_images_total, ...]
    return counts, out


class Batch(dict):
    """The model inputs; `ids` and `skipped` ride along as attributes (they survive pickling)."""

    ids: list
    skipped: list


class Collator:
    def __init__(self, pad_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"Collator: padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_id, self.padding_side, self.multiple = int(pad_id), padding_side, pad_to_multiple_of

    def __call__(self, items: list[dict]) -> Batch:
        assert items, "Collator: empty batch"
        T = max(len(it["input_ids"]) for it in items)
        if self.multiple:
            T = -(-T // self.multiple) * self.multiple
        B = len(items)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)  # [B, T]
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((B, T), dtype=torch.long)  # [B, T]
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            assert len(it["labels"]) == n, f"item {it.get('id')}: {n} ids, {len(it['labels'])} labels"
            sl = slice(0, n) if self.padding_side == "right" else slice(T - n, T)
            input_ids[b, sl] = it["input_ids"]
            labels[b, sl] = it["labels"]
            attention_mask[b, sl] = 1
        counts, images = gather_images(items, "Collator")
        batch = Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            pixel_values=images.pop("pixel_values"),  # [n_images_total (fixed) | sum rows, 3, H, W]
            image_counts=torch.tensor(counts, dtype=torch.long),  # [B]
        )
        batch.update(images)  # image_features [n_images_total, T, C]; per-image keys [n_images_total, ...]
        batch.ids = [it.get("id") for it in items]
        batch.skipped = [rec for it in items for rec in it.get("skipped", [])]
        return batch
