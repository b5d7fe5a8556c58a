"""The Qwen LM's KV cache: `QWenCache`, shared by the decoder (qwen/modeling.py) and generation
(qwen/generation.py), which import it from here (neither imports the other for it).

Per layer k/v `[B, Hkv, T, D]`, plus Qwen-1's NTK alpha `[B]` fixed at prefill. With `max_length` it is
static: each layer's buffer is allocated once at `[B, Hkv, max_length, D]` and every step writes in place; it
grows like the dynamic one if a step would overflow it.
"""

from __future__ import annotations

import torch


class QWenCache:
    """Per-layer keys/values `[B, Hkv, T, D]` and the per-row NTK alpha `[B]` fixed at prefill.

    `max_length`: preallocate each layer's buffer to that many positions and write in place (a static
    cache); `keys[i]` / `values[i]` are then views of the filled part (lists replaced from outside, e.g.
    rows selected by serve/kvcache.py, are noticed and copied into a new buffer at the next update)."""

    def __init__(self, num_layers: int, max_length: int | None = None):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.ntk_alpha: torch.Tensor | None = None
        self.max_length = max_length
        self._bufs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = 0 if self.keys[layer] is None else self.keys[layer].shape[2]
        n = past + k.shape[2]
        if self.max_length is None or n > self.max_length:
            if self.keys[layer] is not None:
                k = torch.cat([self.keys[layer], k], dim=2)  # [B, Hkv, T_cache + T, D]
                v = torch.cat([self.values[layer], v], dim=2)
            self.keys[layer], self.values[layer], self._bufs[layer] = k, v, None
            return k, v
        if self._bufs[layer] is not None and past and self.keys[layer].data_ptr() != self._bufs[layer][0].data_ptr():
            self._bufs[layer] = None  # the rows were edited from outside (serve/kvcache.py): rebuild the buffer
        if self._bufs[layer] is None:
            B, H, _, D = k.shape
            kb = k.new_empty(B, H, self.max_length, D)  # [B, Hkv, max_length, D], filled as tokens come
            vb = v.new_empty(B, H, self.max_length, D)
            if past:
                kb[:, :, :past], vb[:, :, :past] = self.keys[layer], self.values[layer]
            self._bufs[layer] = (kb, vb)
        kb, vb = self._bufs[layer]
        kb[:, :, past:n], vb[:, :, past:n] = k, v
        self.keys[layer], self.values[layer] = kb[:, :, :n], vb[:, :, :n]
        return self.keys[layer], self.values[layer]
