"""Padding-free packing: several rendered samples per row, attention isolated per sample.

* `first_fit_decreasing(lengths, capacity, image_tokens=None, image_capacity=None) -> list[list[int]]`: bins
  of positions into `lengths`, each summing to <= capacity (and its image tokens to <= image_capacity); a
  single sample above either gets a bin of its own.
* `PackingSampler(lengths, max_length, batch_size=1, seed=0, megabatch_size=512, image_tokens=None,
  max_image_tokens=None)`: yields PACKS (lists of dataset indices); with `image_tokens` (per sample:
  `VLMDataset.image_tokens`) and `max_image_tokens`, no pack holds more image tokens than that (trainer/run.py
  gives max_batch_image_tokens / packs per micro-batch, so a micro-batch stays within max_batch_image_tokens;
  a sample alone above it was downscaled or skipped by the dataset's own budget). The packs are fixed at
  construction (seeded shuffle, then first-fit-decreasing over the `lengths` of each megabatch of
  `megabatch_size` samples; `lengths` = `VLMDataset.lengths`, exact after `validate()`), so `len()` is stable across epochs; each epoch (`set_epoch`) shuffles their order,
  with the pack holding the most tokens first (an out-of-memory shows at step 1). The count is padded by
  repeating packs to a multiple of `batch_size` (the global batch, in packs).
* `PackedDataset(dataset)`: `dataset[pack] -> [dataset[i] for i in pack]`, so a `DataLoader(PackedDataset(ds),
  sampler=PackingSampler(...), batch_size=B, collate_fn=PackingCollator())` hands the collator B packs.
* `PackingCollator()(items_or_packs) -> Batch`: takes a list of packs (lists of items) or a plain list of
  items (then all of them form one row) and returns, all samples back to back in ONE row:
  - `input_ids` [1, total], `labels` [1, total] (each sample's first label is set to -100: no position
    predicts it, so `labels[..., 1:] != -100` counts exactly the targets of the unpacked samples);
  - `position_ids` [1, total], restarting at 0 for every sample;
  - `cu_seqlens` int32 [n_samples + 1] (sample boundaries; `kernels.attention` never attends across
    them and `core.loss.shift_targets` never predicts across them);
  - `pixel_values` [n_images_total, 3, H, W] in sample order (or None), or `image_features`
    [n_images_total, T, C] for items from a feature cache;
  - per-image keys (variable resolution modes: `image_sizes`, `image_crops`, `image_grid`) concatenated in
    sample order, as `Collator` does;
  - `image_counts` [1] (images in the row, as the VLM checks per row).
  No `attention_mask` (the qwen LM takes either a mask or `cu_seqlens`). Attributes outside the dict:
  `ids`, `skipped` (as `Collator`), `sample_image_counts` (per sample) and `pack_sizes` (samples per pack).
Only the qwen LM backend takes packed batches (the VLM refuses `cu_seqlens` for the hf backend).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from .collator import Batch, gather_images
from .rendering import IGNORE_INDEX


def first_fit_decreasing(lengths: Sequence[int], capacity: int, image_tokens: Sequence[int] | None = None,
                         image_capacity: int | None = None) -> list[list[int]]:
    """Bins of positions (longest first into the first bin with room); each bin's sum <= capacity, and with
    `image_tokens` / `image_capacity` each bin's image tokens <= image_capacity too."""
    if capacity < 1:
        raise ValueError(f"first_fit_decreasing: capacity must be >= 1, got {capacity}")
    img = [0] * len(lengths) if image_tokens is None or image_capacity is None else [int(t) for t in image_tokens]
    img_cap = image_capacity if image_capacity is not None else 0
    bins: list[list[int]] = []
    room: list[int] = []
    img_room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = int(lengths[i])
        for b, r in enumerate(room):
            if n <= r and img[i] <= img_room[b]:
                bins[b].append(i)
                room[b] -= n
                img_room[b] -= img[i]
                break
        else:  # no bin has room (or the sample alone exceeds capacity): open a new bin
            bins.append([i])
            room.append(capacity - n)
            img_room.append(img_cap - img[i])
    return bins


class PackingSampler(torch.utils.data.Sampler):
    def __init__(self, lengths: Sequence[int], max_length: int, batch_size: int = 1, seed: int = 0,
                 megabatch_size: int = 512, image_tokens: Sequence[int] | None = None,
                 max_image_tokens: int | None = None):
        if not lengths:
            raise ValueError("PackingSampler: no lengths")
        if max_length < 1 or batch_size < 1 or megabatch_size < 1:
            raise ValueError(f"PackingSampler: bad max_length/batch_size/megabatch_size "
                             f"{max_length}/{batch_size}/{megabatch_size}")
        self.lengths, self.max_length = [int(n) for n in lengths], max_length
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        order = list(range(len(self.lengths)))
        random.Random(seed).shuffle(order)
        self.packs: list[list[int]] = []
        for start in range(0, len(order), megabatch_size):
            mega = order[start:start + megabatch_size]
            img = None if image_tokens is None else [image_tokens[i] for i in mega]
            for b in first_fit_decreasing([self.lengths[i] for i in mega], max_length, img, max_image_tokens):
                self.packs.append([mega[k] for k in b])
        self.n_packs = -(-len(self.packs) // batch_size) * batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def pack_tokens(self, pack: list[int]) -> int:
        return sum(self.lengths[i] for i in pack)

    def epoch_packs(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        packs = list(self.packs)
        rng.shuffle(packs)
        biggest = max(range(len(packs)), key=lambda k: self.pack_tokens(packs[k]))
        packs.insert(0, packs.pop(biggest))
        while len(packs) < self.n_packs:  # every global batch full (ranks take equal steps)
            packs += packs[: self.n_packs - len(packs)]
        return packs

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_packs()

    def __len__(self) -> int:
        return self.n_packs


class PackedDataset(torch.utils.data.Dataset):
    """Index with a pack (list of indices) to get the list of the dataset's items."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, pack):
        if isinstance(pack, int):
            return self.dataset[pack]
        return [self.dataset[i] for i in pack]


class PackingCollator:
    def __call__(self, batch: list) -> Batch:
        assert batch, "PackingCollator: empty batch"
        packs = [b if isinstance(b, list) else [b] for b in batch]
        if not any(isinstance(b, list) for b in batch):
            packs = [list(batch)]  # plain items (e.g. the evaluation loader): one row of all of them
        items = [it for p in packs for it in p]
        ids, labels, pos, bounds = [], [], [], [0]
        for it in items:
            n = len(it["input_ids"])
            if len(it["labels"]) != n or n == 0:
                raise ValueError(f"PackingCollator: item {it.get('id')}: {n} ids, {len(it['labels'])} labels")
            lab = it["labels"].clone()
            lab[0] = IGNORE_INDEX  # nothing predicts a sample's first token (see module doc)
            ids.append(it["input_ids"])
            labels.append(lab)
            pos.append(torch.arange(n))
            bounds.append(bounds[-1] + n)
        counts, images = gather_images(items, "PackingCollator")
        out = Batch(
            input_ids=torch.cat(ids)[None],  # [1, total]
            labels=torch.cat(labels)[None],  # [1, total]
            position_ids=torch.cat(pos)[None],  # [1, total]
            cu_seqlens=torch.tensor(bounds, dtype=torch.int32),  # [n_samples + 1]
            pixel_values=images.pop("pixel_values"),  # [n_images_total (fixed) | sum rows, 3, H, W]
            image_counts=torch.tensor([sum(counts)], dtype=torch.long),  # [1]: one row
        )
        out.update(images)  # image_features [n_images_total, T, C]; per-image keys [n_images_total, ...]
        out.ids = [it.get("id") for it in items]
        out.skipped = [rec for it in items for rec in it.get("skipped", [])]
        out.sample_image_counts = counts
        out.pack_sizes = [len(p) for p in packs]
        return out
