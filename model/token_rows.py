"""Trainable input-embedding rows for a few chosen tokens, beside a frozen (or LoRA-adapted) embedding.

Contract:
- `TokenRows.from_embedding(embedding, ids)`: a module holding `ids` (buffer, [k]) and `weight`
  ([k, D], a parameter initialised from the embedding's current rows, in fp32 when the table is not).
- `rows(input_ids [B, T], embeds [B, T, D]) -> [B, T, D]`: `embeds` with the rows of those ids replaced
  (a new tensor; the gradient reaches `weight`). Only the input side: a token the model must learn to
  generate needs its output-head row trained too (stage `full`).
- `fold_into(embedding)`: writes the rows into the table (used by merge / export).
Why not train the whole table: its optimizer state would be vocabulary x width (about 4 GB for a 128k x
4096 table in fp32 Adam) for a handful of rows.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenRows(nn.Module):
    def __init__(self, ids: list[int], weight: torch.Tensor):
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=True)
        self.weight = nn.Parameter(weight)
        self._id_list = [int(i) for i in ids]  # a Python copy: no device sync per forward

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, ids: list[int]) -> TokenRows:
        table = embedding.weight
        bad = [i for i in ids if not 0 <= i < table.shape[0]]
        if bad:
            raise ValueError(f"trainable_tokens: ids {bad} are outside the embedding table ({table.shape[0]} rows)")
        init = table.detach()[torch.tensor(ids, device=table.device)].clone()  # [k, D]
        return cls(ids, init.float())  # trainable: fp32 master weights

    def forward(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        rows = self.weight.to(embeds.dtype)  # [k, D]
        for k, tid in enumerate(self._id_list):
            embeds = torch.where((input_ids == tid)[..., None], rows[k], embeds)  # [B, T, D]
        return embeds

    @torch.no_grad()
    def fold_into(self, embedding: nn.Embedding) -> None:
        embedding.weight[self.ids.to(embedding.weight.device)] = self.weight.to(embedding.weight.dtype)
