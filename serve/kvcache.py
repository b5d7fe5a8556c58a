"""Row-level edits of a KV cache, so that requests can join and leave a running batch.

Two cache layouts are handled by their attributes (no import of either LM):
- our Qwen LM's cache: `keys` / `values` lists of `[B, Hkv, T, D]` tensors and a per-row `ntk_alpha` `[B]`;
- a transformers `DynamicCache`: `layers`, each a plain `DynamicLayer` with `keys` / `values` `[B, H, T, D]`.

`can_merge(cache)` says whether `merge` / `crop_left` work on it (a sliding-window or quantised
transformers cache does not: the server then admits new requests only into an empty batch).
`select_rows(cache, index)` keeps batch rows `index`; `merge(a, b, pad_a, pad_b)` left-pads the time axis
of `a` by `pad_a` and of `b` by `pad_b` zero columns and concatenates the rows (a's first);
`crop_left(cache, n)` drops the first `n` time columns (padding that no remaining row needs).
`copy_row(cache, row, start, end, clone=False)` is a new one-row cache of the same kind holding row `row`'s
time columns `start:end` (copies of them with `clone`, so the result does not keep the batch's tensors alive;
views otherwise, which is safe because both layouts replace their tensors when they grow instead of writing
into them); `n_bytes(cache)` is the size of its keys and values.
Padded columns are always masked out by the attention mask the caller keeps alongside.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def _slots(cache: Any) -> list[tuple[Callable[[], torch.Tensor | None], Callable[[torch.Tensor], None]]]:
    """(get, set) for every key and value tensor of the cache, layer by layer, keys before values."""
    slots = []
    if hasattr(cache, "layers"):  # transformers: one object per layer
        for layer in cache.layers:
            for name in ("keys", "values"):
                slots.append((lambda o=layer, n=name: getattr(o, n, None),
                              lambda t, o=layer, n=name: setattr(o, n, t)))
    else:  # ours: two lists indexed by layer
        for i in range(len(cache.keys)):
            for store in (cache.keys, cache.values):
                slots.append((lambda s=store, j=i: s[j], lambda t, s=store, j=i: s.__setitem__(j, t)))
    return slots


def can_merge(cache: Any) -> bool:
    if hasattr(cache, "layers"):
        return all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)
    return isinstance(getattr(cache, "keys", None), list) and isinstance(getattr(cache, "values", None), list)


def select_rows(cache: Any, index: torch.Tensor) -> None:
    for get, put in _slots(cache):
        t = get()
        if t is not None and t.numel():
            put(t[index])
    alpha = getattr(cache, "ntk_alpha", None)
    if alpha is not None:
        cache.ntk_alpha = alpha[index.to(alpha.device)]


def crop_left(cache: Any, n: int) -> None:
    if n <= 0:
        return
    for get, put in _slots(cache):
        t = get()
        if t is not None and t.numel():
            put(t[:, :, n:])  # [B, H, T - n, D]


def merge(a: Any, b: Any, pad_a: int, pad_b: int) -> Any:
    """Rows of `b` appended to `a` (modified in place and returned); see the module docstring."""
    for (get_a, put_a), (get_b, _) in zip(_slots(a), _slots(b), strict=True):
        ta = F.pad(get_a(), (0, 0, pad_a, 0))  # [B_a, H, pad_a + T_a, D]: zeros on the left of time
        tb = F.pad(get_b(), (0, 0, pad_b, 0))
        put_a(torch.cat([ta, tb], dim=0))
    alpha_a, alpha_b = getattr(a, "ntk_alpha", None), getattr(b, "ntk_alpha", None)
    if alpha_a is not None and alpha_b is not None:
        a.ntk_alpha = torch.cat([alpha_a, alpha_b])
    return a


def copy_row(cache: Any, row: int, start: int, end: int, clone: bool = False) -> Any:
    new = copy.copy(cache)
    if hasattr(cache, "layers"):  # transformers: a copy of each layer object, tensors set below
        new.layers = [copy.copy(layer) for layer in cache.layers]
    else:  # ours: a fresh cache of the same class (its constructor takes the number of layers)
        new = type(cache)(len(cache.keys))
    for (get, _), (_, put) in zip(_slots(cache), _slots(new), strict=True):
        t = get()[row:row + 1, :, start:end]  # [1, H, end - start, D]
        put(t.clone() if clone else t)
    alpha = getattr(cache, "ntk_alpha", None)
    if alpha is not None:
        new.ntk_alpha = alpha[row:row + 1].clone()
    return new


def n_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (get() for get, _ in _slots(cache)) if t is not None)
