"""Step-wise batched decoding over the VLM's public forward, with per-row settings and rows joining and
leaving between steps (continuous batching).

Contract:
- `SamplingParams(max_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None, ignore_eos=False)`:
  temperature 0 is greedy (argmax, exactly as `vlm.chat`); otherwise temperature, then top-k, then top-p
  filtering and a draw from the row's own `torch.Generator` (seeded with `seed`, else at random).
- `Row(prompt_ids, images, params)`: one sequence; `images` is the model's image inputs of its conversation
  (`vlm.image_inputs(images)`: `pixel_values` plus the per-image keys of the resolution mode,
  `image_sizes` / `image_crops` (anyres) or `image_grid` (native / naflex)); `{}` or None without images;
  a bare tensor is `pixel_values` alone (fixed mode). `.tokens` collects what was picked for it.
- `DecodeBatch(vlm)`: `add(rows)` prefills the new rows together (left-padded; their images through the
  towers: each image key concatenated in row order, `pixel_values` and the per-image keys alike, so every
  image keeps its crops / patches and its own size) and appends them to the running rows: the two KV
  caches are left-padded to one length and concatenated. Rows whose images have different key sets (a
  bug: one model has one mode) raise ValueError. `next_tokens() -> [token per row]` picks from each row's
  pending logits; `advance(tokens, keep)` drops the rows whose `keep` is False and runs one forward step
  for the others (callers append accepted tokens to `Row.tokens`).
  Positions are `cumsum(mask) - 1`, so padding never shifts a row: a row's greedy tokens are the ones
  `vlm.chat` gives (bit-identical when it runs alone; equal up to float rounding in a batch).
Both LM backends work (our Qwen LM and a transformers causal LM) as long as the cache is one that
`serve.kvcache` can edit; otherwise `can_merge` is False and callers add rows only to an empty batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from ..qwen.generation import left_pad, process_logits
from . import kvcache


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks, load tests)


ImageInputs = dict[str, torch.Tensor]  # `vlm.image_inputs(images)`: pixel_values + per-image keys


def as_image_inputs(images: ImageInputs | torch.Tensor | None) -> ImageInputs:
    """A Row's images as a dict: None -> {}, a bare tensor -> {"pixel_values": it} (fixed mode)."""
    if images is None:
        return {}
    if torch.is_tensor(images):
        return {"pixel_values": images}  # [n_images, 3, S, S]
    return dict(images)


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


@dataclass(eq=False)
class Row:
    prompt_ids: list[int]
    images: ImageInputs | torch.Tensor | None  # see the module docstring; a dict after __post_init__
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.images = as_image_inputs(self.images)
        if self.params.temperature > 0:
            seed = self.params.seed if self.params.seed is not None else random.SystemRandom().getrandbits(63)
            self.generator = torch.Generator().manual_seed(int(seed))


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from fp32 logits `[V]` (see SamplingParams), filtered as `vlm.chat(do_sample=True)` does."""
    if params.temperature <= 0:
        return int(logits.argmax())
    logits = process_logits(logits[None], None, params.temperature, params.top_k, params.top_p, 1.0)[0]
    return int(torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=generator))


class DecodeBatch:
    def __init__(self, vlm: Any) -> None:
        self.vlm = vlm
        self.device = next(vlm.parameters()).device
        vlm.prepare_attention()  # resolved once here, never inside the decode steps' forwards
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, T] 1 = real token (in the cache or pending input)
        self.logits: torch.Tensor | None = None  # [B, V] fp32, the pending next-token logits per row
        self.can_merge = True  # False once a cache type is met that kvcache cannot edit

    def __len__(self) -> int:
        return len(self.rows)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, images: ImageInputs,
                 cache: Any) -> tuple[torch.Tensor, Any]:
        T = input_ids.shape[1]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # [B, T]; padding never shifts a row
        out = self.vlm(input_ids=input_ids, attention_mask=mask, **images,
                       past_key_values=cache, use_cache=True, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1].float(), out.past_key_values  # [B, V]

    @torch.no_grad()
    def add(self, rows: list[Row]) -> None:
        """Prefill `rows` together and append them to the batch."""
        if not rows:
            return
        if self.rows and not self.can_merge:
            raise RuntimeError("this LM's KV cache cannot take new rows mid-batch; add rows to an empty batch")
        ids, mask = left_pad([r.prompt_ids for r in rows], self.vlm.pad_token_id)  # [n, T] each
        ids, mask = ids.to(self.device), mask.to(self.device)
        images = concat_image_inputs([r.images for r in rows])  # pixel_values [n_crops or patches, 3, s, s], ...
        images = {k: v.to(self.device) for k, v in images.items()}
        logits, cache = self._forward(ids, mask, images, None)
        if not self.rows:
            self.rows, self.cache, self.mask, self.logits = list(rows), cache, mask, logits
            self.can_merge = kvcache.can_merge(cache)
            return
        t_old, t_new = self.mask.shape[1], mask.shape[1]
        t = max(t_old, t_new)
        self.cache = kvcache.merge(self.cache, cache, t - t_old, t - t_new)
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (t - t_old, 0)),
                               torch.nn.functional.pad(mask, (t - t_new, 0))])  # [B_old + n, t]
        self.logits = torch.cat([self.logits, logits])
        self.rows += rows

    def next_tokens(self) -> list[int]:
        """One token per row from its pending logits (greedy rows share one argmax)."""
        greedy = self.logits.argmax(dim=-1).tolist()  # [B]
        return [g if r.params.temperature <= 0 else sample_token(self.logits[i], r.params, r.generator)
                for i, (r, g) in enumerate(zip(self.rows, greedy))]

    @torch.no_grad()
    def advance(self, tokens: list[int], keep: list[bool]) -> None:
        """Drop the rows whose `keep` is False and feed `tokens` to the rest (one forward step). Callers
        record accepted tokens in `Row.tokens` themselves (a stop token is picked but never recorded)."""
        if not all(keep):
            index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=self.device)
            self.rows = [r for r, k in zip(self.rows, keep) if k]
            tokens = [t for t, k in zip(tokens, keep) if k]
            if not self.rows:
                self.cache = self.mask = self.logits = None
                return
            kvcache.select_rows(self.cache, index)
            self.mask = self.mask[index]
            # Columns that are padding in every remaining row are dropped (a finished long prompt).
            first = int(self.mask.any(dim=0).long().argmax())
            if first > 0 and self.can_merge:
                kvcache.crop_left(self.cache, first)
                self.mask = self.mask[:, first:]
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        nxt = torch.tensor(tokens, device=self.device)[:, None]  # [B, 1]
        self.logits, self.cache = self._forward(nxt, self.mask, {}, self.cache)
