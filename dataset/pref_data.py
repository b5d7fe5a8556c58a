"""Preference pairs -> token ids -> batches of [chosen..., rejected...] with each pair's images given once.

- `render_pair(pair, fmt, tokens_per_image, max_length=None, image_token_id=None, system_prompt=None)
  -> RenderedPair`: the prompt is rendered once (dataset/rendering.py `render` with a generation prompt, every
  label -100: earlier assistant turns are context, only the final answer is labelled) and each answer after it
  (`render_answer`: the answer's tokens and its end-of-turn token labelled). A pair whose longer side exceeds
  `max_length` raises `BadSampleError(kind "too_long")`: it is skipped, never truncated (an image span is
  never cut).
- `PrefDataset(paths, fmt, image_processor, tokens_per_image, image_folder=None, max_length=None, ...)`:
  reads every file (dataset/pref_formats.py), renders every pair up front; bad rows and over-long pairs are
  skipped, each logged as one line naming file, position, id and reason, and counted (`skip_report()`).
  `strict=True` raises the first one instead; `absorb(records)` takes the skips met in DataLoader workers. An item is `{"chosen_input_ids" [Tc], "chosen_labels" [Tc],
  "rejected_input_ids" [Tr], "rejected_labels" [Tr], "pixel_values" [n_images, 3, H, W] | None, "n_images",
  "id", "skipped"}`; an image that fails to load mid-run skips the pair (the next one is taken, the skip is
  carried in `skipped`).
- `PairCollator(pad_id)(items) -> Batch`: `input_ids` / `attention_mask` / `labels` `[2B, T]`, rows
  `[chosen_1..chosen_B, rejected_1..rejected_B]` (right padding); `pixel_values` `[sum n_images, 3, H, W]`:
  each PAIR's images once, pair after pair; `image_counts` `[B]`: images per pair (not per row: the model
  side encodes them once and places the rows in both sides). `batch.ids` the pair ids, `batch.skipped`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from .collator import Batch
from .images import load_image
from .pref_formats import PrefPair, read_pairs
from .rendering import IGNORE_INDEX, Rendered, render, render_answer
from .sample import BadSampleError, Sample, describe_source

logger = logging.getLogger(__name__)


@dataclass
class RenderedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the answer's ids only (after the prompt)
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    n_images: int

    @property
    def longest(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def render_pair(pair: PrefPair, fmt, tokens_per_image, max_length: int | None = None,
                image_token_id: int | None = None, system_prompt: str | None = None) -> RenderedPair:
    """The pair's prompt rendered once, then each answer (see the module docstring)."""
    prompt: Rendered = render(Sample(pair.id, pair.prompt, list(pair.images), source=pair.source), fmt,
                              tokens_per_image, add_generation_prompt=True, image_token_id=image_token_id,
                              system_prompt=system_prompt)
    c_ids, c_labels = render_answer(pair.chosen, fmt)
    r_ids, r_labels = render_answer(pair.rejected, fmt)
    out = RenderedPair(prompt.input_ids, c_ids, c_labels, r_ids, r_labels, prompt.n_images)
    if max_length is not None and out.longest > max_length:
        raise BadSampleError(f"{describe_source(pair.source)} (id {pair.id!r}): too long: {out.longest} tokens "
                             f"> max_length {max_length} (pairs are skipped, never truncated)", "too_long")
    return out


class PrefDataset(torch.utils.data.Dataset):
    def __init__(self, paths: Any, fmt, image_processor, tokens_per_image: int, image_folder: str | None = None,
                 max_length: int | None = None, image_token_id: int | None = None,
                 system_prompt: str | None = None, allow_absolute_paths: bool = False, strict: bool = False,
                 max_retries: int = 100):
        self.image_processor, self.strict, self.max_retries = image_processor, strict, max_retries
        self.pairs: list[PrefPair] = []
        self.rendered: list[RenderedPair] = []
        self.skipped: dict[tuple[str, int], dict] = {}  # (file, position) -> skip record
        for path in [paths] if isinstance(paths, str) else list(paths):
            pairs, bad = read_pairs(str(path), image_folder, allow_absolute_paths)
            for pos, err in bad:
                self._skip(str(path), pos, err)
            for pair in pairs:
                try:
                    r = render_pair(pair, fmt, tokens_per_image, max_length, image_token_id, system_prompt)
                except BadSampleError as err:
                    self._skip(pair.source[0], pair.source[1], err)
                    continue
                self.pairs.append(pair)
                self.rendered.append(r)
        if self.skipped:
            logger.warning("PrefDataset: %d pair(s) skipped: %s", len(self.skipped),
                           dict(Counter(r["kind"] for r in self.skipped.values())))
        if not self.pairs:
            raise BadSampleError(f"PrefDataset: no usable preference pair in {paths} "
                                 f"({len(self.skipped)} skipped, see the lines above)", "no_data")

    def _skip(self, path: str, pos: int, err: BadSampleError) -> dict:
        if self.strict:
            raise err
        logger.warning("%s", err)  # one line: file, position, id and reason
        rec = {"file": path, "position": pos, "kind": err.kind, "reason": str(err)}
        self.skipped[(path, pos)] = rec
        return rec

    def absorb(self, records: list[dict]) -> None:
        """Skip records made in DataLoader workers (carried by the batches), counted once per pair."""
        for rec in records:
            self.skipped.setdefault((rec["file"], rec["position"]), rec)

    def skip_report(self) -> dict:
        rows = list(self.skipped.values())
        return {"pairs": len(self.pairs), "skipped": len(rows), "by_kind": dict(Counter(r["kind"] for r in rows)),
                "rows": rows}

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def lengths(self) -> list[int]:
        return [r.longest for r in self.rendered]

    def build(self, i: int) -> dict:
        pair, r = self.pairs[i], self.rendered[i]
        pix = None
        if pair.images:
            pix = self.image_processor([load_image(p) for p in pair.images])  # [n_images, 3, H, W]
        return {
            "chosen_input_ids": torch.tensor(r.prompt_ids + r.chosen_ids, dtype=torch.long),  # [Tc]
            "chosen_labels": torch.tensor([IGNORE_INDEX] * len(r.prompt_ids) + r.chosen_labels, dtype=torch.long),
            "rejected_input_ids": torch.tensor(r.prompt_ids + r.rejected_ids, dtype=torch.long),  # [Tr]
            "rejected_labels": torch.tensor([IGNORE_INDEX] * len(r.prompt_ids) + r.rejected_labels,
                                            dtype=torch.long),
            "pixel_values": pix,
            "n_images": r.n_images,
            "id": pair.id,
        }

    def __getitem__(self, i: int) -> dict:
        new_skips = []
        for attempt in range(self.max_retries + 1):
            j = (i + attempt) % len(self.pairs)
            try:
                item = self.build(j)
                item["skipped"] = new_skips
                return item
            except BadSampleError as err:  # an image missing or unreadable: skip the pair, take the next
                new_skips.append(self._skip(*self.pairs[j].source, err))
        raise BadSampleError(f"PrefDataset: {self.max_retries + 1} unusable pairs in a row from index {i}", "no_data")


class PairCollator:
    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)

    def __call__(self, items: list[dict]) -> Batch:
        assert items, "PairCollator: empty batch"
        rows = [(it["chosen_input_ids"], it["chosen_labels"]) for it in items]
        rows += [(it["rejected_input_ids"], it["rejected_labels"]) for it in items]  # [chosen...; rejected...]
        T = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)  # [2B, T]
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # [2B, T]
        mask = torch.zeros((len(rows), T), dtype=torch.long)  # [2B, T]
        for b, (ids, lab) in enumerate(rows):
            input_ids[b, :len(ids)], labels[b, :len(ids)], mask[b, :len(ids)] = ids, lab, 1
        pix = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
        for it in items:
            got = 0 if it["pixel_values"] is None else int(it["pixel_values"].shape[0])
            assert got == it["n_images"], f"pair {it['id']}: {got} image rows for {it['n_images']} images"
        batch = Batch(
            input_ids=input_ids, attention_mask=mask, labels=labels,
            pixel_values=torch.cat(pix) if pix else None,  # [sum n_images, 3, H, W]: each pair's images once
            image_counts=torch.tensor([it["n_images"] for it in items], dtype=torch.long),  # [B] per pair
        )
        batch.ids = [it["id"] for it in items]
        batch.skipped = [rec for it in items for rec in it.get("skipped", [])]
        return batch
