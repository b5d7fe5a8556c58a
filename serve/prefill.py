"""Prefill planning for `serve.decode.DecodeBatch`: image rows through the image cache, the cached prefix of
a prompt, its prefill in pieces, and the KV a finished row leaves for later requests.

Contract (every function works on `serve.decode.Row` objects and changes only their prefill fields):
- `pieces_exact(vlm, n_tokens) -> bool`: whether a prompt of `n_tokens` gives the same KV when it is run
  in pieces (chunks, or after a cached prefix) as in one forward. False only for Qwen-1's dynamic NTK past
  `seq_length`, whose rotary scaling is chosen from the length of the first forward; such rows are prefilled
  whole, without the prefix cache.
- `plan_row(vlm, row, prefix_cache)`: the row's image keys (`serve.imagecache.image_key`) and spans, its
  prefix key (`serve.prefixcache.prompt_key`), and with a prefix cache its longest cached prefix, at most
  `len(prompt) - 1` positions and at least the cache's `min_tokens`: `row.cache` becomes a one-row copy of that prefix, `row.done` and
  `row.cached_tokens` its length (the hit or miss is counted).
- `encode_rows(vlm, rows, image_cache)`: for each row without `image_rows`, the placeholder rows of every
  image whose span is not wholly in `row.done` (images before it are skipped: their KV is cached): each
  image is looked up by key in `image_cache`, the misses of all rows go through the towers in one call
  (`vlm.encode_image_inputs`) and are cached.
- `chunk_rows(vlm, row, start, n) -> [n_slots, D] | None`: the image rows of the placeholders in
  `prompt[start:start + n]`.
- `store_finished(prefix_cache, cache, mask, i, row)`: row `i` of the batch (prompt + the tokens fed to
  it) is copied out of the batch's cache into the prefix cache.
"""

from __future__ import annotations

from typing import Any

import torch

from . import kvcache
from .imagecache import ImageCache, concat_image_inputs, image_key, span_tokens, split_image_inputs
from .prefixcache import PrefixCache, prompt_key


def pieces_exact(vlm: Any, n_tokens: int) -> bool:
    cfg = getattr(getattr(vlm, "lm", None), "config", None)
    if not getattr(cfg, "use_dynamic_ntk", False):
        return True
    return n_tokens <= int(cfg.seq_length)  # NTK alpha 1 for every piece and for the whole


def plan_row(vlm: Any, row: Any, prefix_cache: PrefixCache | None) -> None:
    row.spans = span_tokens(vlm, row.images)
    row.image_keys = [image_key(one) for one in split_image_inputs(row.images)]
    row.pieces = pieces_exact(vlm, len(row.prompt_ids))
    if prefix_cache is None or not row.pieces:
        return
    row.key_ids = prompt_key(row.prompt_ids, vlm.image_token_id, row.image_keys, row.spans)  # [T]
    entry, n = prefix_cache.lookup(row.key_ids)
    reuse = min(n, len(row.prompt_ids) - 1)  # one token must run to give the next-token logits
    if entry is not None and reuse >= prefix_cache.min_tokens:
        row.cache = kvcache.copy_row(entry.cache, 0, 0, reuse)  # views: the forward appends, never writes in
        row.done = row.cached_tokens = reuse
    prefix_cache.count(row.cached_tokens)


def _slots_before(vlm: Any, ids: list[int], end: int) -> int:
    tok = vlm.image_token_id
    return sum(1 for t in ids[:end] if t == tok)


def _needed(vlm: Any, row: Any) -> list[int]:
    """Indices of the row's images whose span is not wholly in its first `done` tokens; sets rows_offset."""
    before, cum = _slots_before(vlm, row.prompt_ids, row.done), 0
    for i, n in enumerate(row.spans):
        if cum + n > before:
            row.rows_offset = cum
            return list(range(i, len(row.spans)))
        cum += n
    row.rows_offset = cum
    return []


def encode_rows(vlm: Any, rows: list[Any], image_cache: ImageCache | None) -> None:
    todo = [r for r in rows if r.image_rows is None]
    found: dict[str, torch.Tensor] = {}
    misses: dict[str, tuple[dict, int]] = {}  # key -> (one image's inputs, its span)
    wanted = []
    for r in todo:
        need = _needed(vlm, r)
        parts = split_image_inputs(r.images) if need else []
        wanted.append([r.image_keys[i] for i in need])
        for i in need:
            key = r.image_keys[i]
            if key in found or key in misses:
                continue
            rows_ = image_cache.get(key) if image_cache is not None else None
            if rows_ is not None:
                found[key] = rows_
            else:
                misses[key] = (parts[i], r.spans[i])
    if misses:
        device = next(vlm.parameters()).device
        inputs = {k: v.to(device) for k, v in concat_image_inputs([p for p, _ in misses.values()]).items()}
        encoded = vlm.encode_image_inputs(**inputs)  # [n_slots of the misses, D]
        pieces = torch.split(encoded, [n for _, n in misses.values()])
        for key, piece in zip(misses, pieces):
            found[key] = piece.clone()  # its own storage: the cache must not keep the whole batch alive
            if image_cache is not None:
                image_cache.put(key, found[key])
    for r, keys in zip(todo, wanted):
        r.image_rows = torch.cat([found[k] for k in keys]) if keys else None  # [n_slots left, D]


def chunk_rows(vlm: Any, row: Any, start: int, n: int) -> torch.Tensor | None:
    a = _slots_before(vlm, row.prompt_ids, start) - row.rows_offset
    b = _slots_before(vlm, row.prompt_ids[start:], n)
    if b == 0:
        return None
    assert row.image_rows is not None and a >= 0 and a + b <= row.image_rows.shape[0], (a, b, row.rows_offset)
    return row.image_rows[a:a + b]  # [b, D]


def store_finished(prefix_cache: PrefixCache, cache: Any, mask: torch.Tensor, i: int, row: Any) -> None:
    if row.key_ids is None:
        return
    width = mask.shape[1]
    first = int(mask[i].long().argmax())  # rows are left-padded: the real columns are first..width-1
    n = len(row.prompt_ids) + len(row.fed)
    if width - first != n or not bool(mask[i, first:].all()):
        return  # a layout this function does not expect: keep nothing rather than a wrong prefix
    one = kvcache.copy_row(cache, i, first, width, clone=True)  # [1, H, n, D] per layer
    key = torch.cat([row.key_ids, torch.tensor(row.fed, dtype=torch.long)])
    prefix_cache.insert(key, one, kvcache.n_bytes(one))
