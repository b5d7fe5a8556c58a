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
- `DecodeBatch(vlm, image_cache=None, prefix_cache=None)`: `start(rows)` queues rows for prefill
  (`serve.prefill.plan_row`: image keys and spans, and with a prefix cache the longest cached prefix of the
  prompt, copied into the row's own one-row cache); `prefill(budget=None) -> (joined, failed)` runs one
  piece of prefill work: the pending rows that start from nothing and fit `budget` tokens together
  (left-padded, one forward), or the next chunk of at most `budget` tokens of the first pending row on its
  own cache (the rest of the prompt after a cached prefix, or a prompt longer than `budget`); a row whose
  prompt is done joins the running rows: the KV caches are left-padded to one length and concatenated.
  Image rows come from `vlm.encode_image_inputs` through the image cache and reach the forward as its
  `image_rows`, sliced to the placeholders of each piece, so a chunk may start or end inside a span.
  A group that fails is retried row by row; only a row that cannot be prefilled is returned as failed.
  `add(rows)` = `start` + `prefill()` until those rows joined (raises the first failure). Rows whose
  images have different key sets (a bug: one model has one mode) raise ValueError.
  `next_tokens() -> [token per row]` picks from each row's pending logits; `advance(tokens, keep)` drops
  the rows whose `keep` is False (their prompt + fed tokens go to the prefix cache,
  `serve.prefill.store_finished`) and runs one forward step for the others (callers append accepted tokens
  to `Row.tokens`; `Row.fed` records what was fed). `Row.cached_tokens`: prompt tokens taken from the cache.
  Positions are `cumsum(mask) - 1`, so padding never shifts a row: a row's greedy tokens are the ones
  `vlm.chat` gives (bit-identical when it runs alone and whole; equal up to float rounding in a batch, in
  chunks or after a cached prefix).
With our Qwen LM the decode steps run as its `generate` does: the running rows' KV cache is static
(`qwen.cache.QWenCache.max_length` set to every row's remaining tokens whenever rows join or leave, so the
steps write in place), and where `generate` screens its greedy argmax (`qwen.generation.ScreenedHead`: an
fp32 head on a CPU with fbgemm) the forward keeps the last hidden states (`keep_hidden`) and greedy rows
take the screened argmax (the fp32 argmax), sampling rows their logits.
Both LM backends work (our Qwen LM and a transformers causal LM) as long as the cache is one that
`serve.kvcache` can edit; otherwise `can_merge` is False and callers add rows only to an empty batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.loss import decode_logits
from ..qwen.generation import ScreenedHead, left_pad, process_logits
from . import kvcache
from .imagecache import ImageCache, concat_image_inputs  # noqa: F401 (concat_image_inputs: re-exported)
from .prefill import chunk_rows, encode_rows, plan_row, store_finished
from .prefixcache import PrefixCache


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


@dataclass(eq=False)
class Row:
    prompt_ids: list[int]
    images: ImageInputs | torch.Tensor | None  # see the module docstring; a dict after __post_init__
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    # Prefill state (serve.prefill): the row's own one-row cache while its prompt is prefilled in pieces,
    # how many prompt tokens it holds, how many of those came from the prefix cache, the image rows of the
    # spans still to run (from the placeholder `rows_offset` on), and the tokens fed after the prompt.
    cache: Any = field(default=None, repr=False)
    done: int = 0
    cached_tokens: int = 0
    image_keys: list[str] | None = None
    spans: list[int] = field(default_factory=list)
    key_ids: torch.Tensor | None = field(default=None, repr=False)
    image_rows: torch.Tensor | None = field(default=None, repr=False)
    rows_offset: int = 0
    fed: list[int] = field(default_factory=list)
    solo: bool = False  # prefill alone (a group it was in failed)
    pieces: bool = True  # may be prefilled in chunks / from a cached prefix (exact for this LM and length)

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
    def __init__(self, vlm: Any, image_cache: ImageCache | None = None,
                 prefix_cache: PrefixCache | None = None) -> None:
        self.vlm = vlm
        self.device = next(vlm.parameters()).device
        vlm.prepare_attention()  # resolved once here, never inside the decode steps' forwards
        self.image_cache, self.prefix_cache = image_cache, prefix_cache
        self.rows: list[Row] = []
        self.pending: list[Row] = []  # started, prompt not yet (wholly) prefilled
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, T] 1 = real token (in the cache or pending input)
        # Per row, what the next token is picked from: fp32 logits [B, V], or with the screened greedy head
        # the last hidden states [B, D] (logits computed only for sampling rows).
        self.logits: torch.Tensor | None = None
        self.can_merge = True  # False once a cache type is met that kvcache cannot edit
        self.head, self.screen = screened_head(vlm, self.device)
        # Our Qwen LM's cache preallocated and written in place between membership changes, as its generate.
        self.static = getattr(getattr(vlm, "backbone", None), "name", None) == "qwen"

    def __len__(self) -> int:
        return len(self.rows)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, image_rows: torch.Tensor | None,
                 cache: Any) -> tuple[torch.Tensor, Any]:
        T = input_ids.shape[1]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # [B, T]; padding never shifts a row
        kw: dict[str, Any] = {} if image_rows is None else {"image_rows": image_rows}  # [n_slots, D]
        if self.screen is not None:
            kw["keep_hidden"] = True
        out = self.vlm(input_ids=input_ids, attention_mask=mask, **kw,
                       past_key_values=cache, use_cache=True, position_ids=positions, logits_to_keep=1)
        if self.screen is not None:
            assert out.hidden_states is not None, "keep_hidden=True gave no hidden states"
            return out.hidden_states[:, -1], out.past_key_values  # [B, D]
        return out.logits[:, -1].float(), out.past_key_values  # [B, V]

    # ----- prefill -----------------------------------------------------------------------------------
    def start(self, rows: list[Row]) -> None:
        """Queue `rows` for prefill: keys, spans and the cached prefix are found now (serve.prefill)."""
        for r in rows:
            plan_row(self.vlm, r, self.prefix_cache if self.can_merge else None)
        self.pending += rows

    def drop_pending(self, row: Row) -> None:
        self.pending.remove(row)
        row.cache = None

    def _fresh(self, r: Row, budget: int | None) -> bool:
        """Prefilled from nothing in one forward, possibly with other such rows."""
        whole = budget is None or len(r.prompt_ids) <= budget or not r.pieces or not self.can_merge
        return r.cache is None and r.done == 0 and whole

    def _group(self, budget: int | None) -> list[Row]:
        first = self.pending[0]
        if not self._fresh(first, budget) or first.solo:
            return [first]
        group = [first]
        for r in self.pending[1:]:
            if not self._fresh(r, budget) or r.solo:
                continue
            width = max(len(x.prompt_ids) for x in [*group, r])
            if budget is not None and width * (len(group) + 1) > budget:
                break
            group.append(r)
        return group

    @torch.no_grad()
    def prefill(self, budget: int | None = None) -> tuple[list[Row], list[tuple[Row, Exception]]]:
        """One piece of prefill work of at most about `budget` tokens (None: no limit): new rows from
        nothing together (left-padded), or the next chunk of the first pending row's prompt on its own cache.
        Returns the rows that joined the batch and the rows that failed (a group that fails is split: its
        rows are retried one by one, so only a row that cannot be prefilled fails)."""
        if not self.pending:
            return [], []
        group = self._group(budget)
        try:
            if self._fresh(group[0], budget):
                self._prefill_fresh(group)
                return group, []
            return self._prefill_chunk(group[0], budget), []
        except Exception as e:
            if len(group) > 1:
                for r in group:
                    r.solo = True
                return [], []
            self.drop_pending(group[0])
            return [], [(group[0], e)]

    def _prefill_fresh(self, rows: list[Row]) -> None:
        ids, mask = left_pad([r.prompt_ids for r in rows], self.vlm.pad_token_id)  # [n, T] each
        ids, mask = ids.to(self.device), mask.to(self.device)
        encode_rows(self.vlm, rows, self.image_cache)
        parts = [r.image_rows for r in rows if r.image_rows is not None]
        image_rows = torch.cat(parts) if parts else None  # [n_slots of every row, D]
        logits, cache = self._forward(ids, mask, image_rows, None)
        self._join(rows, cache, mask, logits)

    def _prefill_chunk(self, row: Row, budget: int | None) -> list[Row]:
        encode_rows(self.vlm, [row], self.image_cache)
        left = len(row.prompt_ids) - row.done
        n = left if budget is None or not row.pieces else min(left, max(1, budget))
        ids = torch.tensor([row.prompt_ids[row.done:row.done + n]], device=self.device)  # [1, n]
        mask = torch.ones(1, row.done + n, dtype=torch.long, device=self.device)  # [1, cache + n]
        logits, row.cache = self._forward(ids, mask, chunk_rows(self.vlm, row, row.done, n), row.cache)
        row.done += n
        if row.done < len(row.prompt_ids):
            return []
        cache, row.cache = row.cache, None
        self._join([row], cache, mask, logits)
        return [row]

    def _join(self, rows: list[Row], cache: Any, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Prefilled rows (their cache, mask [n, T] and next-token logits [n, V]) join the running batch."""
        for r in rows:
            self.pending.remove(r)
            r.image_rows = None  # no longer needed (the cache keeps their images' rows)
        if not self.rows:
            self.rows, self.cache, self.mask, self.logits = list(rows), cache, mask, logits
            self.can_merge = kvcache.can_merge(cache)
            self._size_cache()
            return
        if not self.can_merge:
            raise RuntimeError("this LM's KV cache cannot take new rows mid-batch; add rows to an empty batch")
        t_old, t_new = self.mask.shape[1], mask.shape[1]
        t = max(t_old, t_new)
        self.cache = kvcache.merge(self.cache, cache, t - t_old, t - t_new)
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (t - t_old, 0)),
                               torch.nn.functional.pad(mask, (t - t_new, 0))])  # [B_old + n, t]
        self.logits = torch.cat([self.logits, logits])
        self.rows += rows
        self._size_cache()

    def _size_cache(self) -> None:
        """Make our Qwen cache static for the running rows: room for every row's remaining tokens, so the
        decode steps write in place (`qwen.cache.QWenCache`: its buffer is rebuilt once after rows change)."""
        if not self.static or not self.rows or not hasattr(self.cache, "max_length") or hasattr(self.cache, "layers"):
            return
        left = max(r.params.max_tokens - len(r.tokens) for r in self.rows)  # [B, T] grows by one per step
        self.cache.max_length = self.mask.shape[1] + max(left, 0) + 1

    def add(self, rows: list[Row]) -> None:
        """Prefill `rows` now (whole prompts, together where possible) and append them to the batch; the
        first row that cannot be prefilled raises (the others stay in the batch)."""
        if not rows:
            return
        if self.rows and not self.can_merge:
            raise RuntimeError("this LM's KV cache cannot take new rows mid-batch; add rows to an empty batch")
        self.start(rows)
        while any(r in self.pending for r in rows):
            _, failed = self.prefill()
            if failed:
                for r in [r for r in rows if r in self.pending]:
                    self.drop_pending(r)
                raise failed[0][1]

    # ----- decode ------------------------------------------------------------------------------------
    def next_tokens(self) -> list[int]:
        """One token per row from its pending logits (greedy rows share one argmax), or from its hidden
        state through the screened head (greedy rows: the fp32 argmax, as `vlm.generate` picks it)."""
        if self.screen is not None:
            return self._screened_tokens()
        greedy = self.logits.argmax(dim=-1).tolist()  # [B]
        return [g if r.params.temperature <= 0 else sample_token(self.logits[i], r.params, r.generator)
                for i, (r, g) in enumerate(zip(self.rows, greedy))]

    def _screened_tokens(self) -> list[int]:
        hidden = self.logits.float()  # [B, D]
        greedy = [i for i, r in enumerate(self.rows) if r.params.temperature <= 0]
        out = [0] * len(self.rows)
        if greedy:
            screen = ScreenedHead.for_head(self.head)  # rebuilt only if the weight changed
            for i, t in zip(greedy, screen.argmax(hidden[greedy], self.head.weight).tolist()):
                out[i] = t
        for i, r in enumerate(self.rows):
            if r.params.temperature > 0:
                logits = decode_logits(self.logits[i:i + 1, None], self.head)[0, 0].float()  # [V]
                out[i] = sample_token(logits, r.params, r.generator)
        return out

    @torch.no_grad()
    def advance(self, tokens: list[int], keep: list[bool]) -> None:
        """Drop the rows whose `keep` is False and feed `tokens` to the rest (one forward step). Callers
        record accepted tokens in `Row.tokens` themselves (a stop token is picked but never recorded).
        A dropped row's KV (prompt + the tokens fed to it) goes to the prefix cache."""
        if not all(keep):
            if self.prefix_cache is not None and self.can_merge:
                for i, (r, k) in enumerate(zip(self.rows, keep)):
                    if not k:
                        store_finished(self.prefix_cache, self.cache, self.mask, i, r)
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
            self._size_cache()
        for r, t in zip(self.rows, tokens):
            r.fed.append(t)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        nxt = torch.tensor(tokens, device=self.device)[:, None]  # [B, 1]
        self.logits, self.cache = self._forward(nxt, self.mask, None, self.cache)


def screened_head(vlm: Any, device: torch.device) -> tuple[Any, ScreenedHead | None]:
    """(output head, its screen) where `vlm.generate` picks greedy tokens with `qwen.generation.ScreenedHead`
    (our Qwen LM, a plain fp32 head on a CPU with fbgemm), else (None, None)."""
    bb = getattr(vlm, "backbone", None)
    if getattr(bb, "name", None) != "qwen" or not bb.plain_head(vlm.lm):
        return None, None
    head = bb.output_head(vlm.lm)
    if not ScreenedHead.usable(head, device):
        return None, None
    return head, ScreenedHead.for_head(head)
