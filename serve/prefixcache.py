"""A bounded LRU cache of finished requests' KV, so a request that starts like a recent one (the next turn
of a chat: the same conversation, the answer, a new question) prefills only the tokens after the match.

Contract:
- `prompt_key(prompt_ids, image_token_id, image_keys, span_tokens) -> LongTensor [T]`: the prompt as the
  cache compares it. Text tokens keep their ids (>= 0); each placeholder position becomes a negative id made
  from its image's content key (`serve.imagecache.image_key`, which includes the resolution settings) and
  its offset in the span. Placeholder ids are the same for every image, so ids alone would let a different
  image match; with the content in the key, the same text with a different image matches only up to its
  first placeholder. `image_keys` / `span_tokens` are per image, in span order, and must cover every
  placeholder (ValueError otherwise).
- `PrefixCache(max_bytes, min_tokens=16)`: `lookup(key) -> (entry, n)`: the entry with the longest common
  prefix with `key` and that length (`(None, 0)` when none shares a first token); the caller uses at most
  `len(key) - 1` of it (one token must run to give the next-token logits), and nothing when that is below
  `min_tokens` (a few template tokens are not worth a prefill of their own: rows with a cached prefix are
  prefilled one at a time, new rows together); `count(reused)` records a request's hit or miss.
  `insert(key, cache, n_bytes)`: `cache` a one-row KV cache (`serve.kvcache.copy_row`) holding exactly
  `len(key)` positions, `n_bytes` its size; an entry whose key is a prefix of the new one is dropped (the new
  one answers every lookup it did), and a new key that is a prefix of an existing entry only refreshes that
  entry. Least recently used entries are evicted until the bytes are within
  `max_bytes`; `max_bytes=0` keeps nothing. `stats() -> dict` (hits, misses, cached_tokens, evictions,
  entries, bytes, max_bytes). Used from the engine thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

_ID_SPACE = 1 << 62


def prompt_key(prompt_ids: list[int], image_token_id: int, image_keys: list[str],
               span_tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor(prompt_ids, dtype=torch.long)  # [T]
    slots = (ids == image_token_id).nonzero().flatten()  # [n_slots]
    if len(image_keys) != len(span_tokens) or sum(span_tokens) != len(slots):
        raise ValueError(f"{len(slots)} placeholders but {len(image_keys)} image key(s) for spans {span_tokens}")
    codes = []
    for key, n in zip(image_keys, span_tokens):
        base = int(key[:15], 16)  # 60 bits of the content digest
        codes.append((base + torch.arange(n, dtype=torch.long)) % _ID_SPACE)  # [n]: offset in the span
    if codes:
        ids[slots] = -1 - torch.cat(codes)  # negative: never a text token
    return ids


@dataclass(eq=False)
class Entry:
    key: torch.Tensor  # [T]
    cache: Any  # one row, T positions
    bytes: int


def _lcp(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return n if len(diff) == 0 else int(diff[0])


class PrefixCache:
    def __init__(self, max_bytes: int, min_tokens: int = 16) -> None:
        if max_bytes < 0 or min_tokens < 1:
            raise ValueError(f"max_bytes must be >= 0 and min_tokens >= 1, got {max_bytes}, {min_tokens}")
        self.max_bytes, self.min_tokens = int(max_bytes), int(min_tokens)
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, least recent first
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.cached_tokens = 0

    def lookup(self, key: torch.Tensor) -> tuple[Entry | None, int]:
        best, n = None, 0
        for e in self.entries.values():
            m = _lcp(e.key, key)
            if m > n:
                best, n = e, m
        if best is not None:
            self.entries.move_to_end(id(best))
        return best, n

    def count(self, reused: int) -> None:
        """Record one request's outcome: `reused` positions taken from the cache (0 = a miss)."""
        if reused > 0:
            self.hits += 1
            self.cached_tokens += reused
        else:
            self.misses += 1

    def insert(self, key: torch.Tensor, cache: Any, n_bytes: int) -> None:
        if n_bytes > self.max_bytes:
            return
        for e in list(self.entries.values()):
            m = _lcp(e.key, key)
            if m == len(key):  # the new key is a prefix of (or equal to) an entry: nothing new to keep
                self.entries.move_to_end(id(e))
                return
            if m == len(e.key):  # an entry that is a prefix of the new key is superseded by it
                self._drop(e)
        entry = Entry(key.clone(), cache, n_bytes)
        self.entries[id(entry)] = entry
        self.bytes += n_bytes
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries.values())))
            self.evictions += 1

    def _drop(self, e: Entry) -> None:
        del self.entries[id(e)]
        self.bytes -= e.bytes

    def stats(self) -> dict:
        return dict(hits=self.hits, misses=self.misses, cached_tokens=self.cached_tokens,
                    evictions=self.evictions, entries=len(self.entries), bytes=self.bytes,
                    max_bytes=self.max_bytes)
