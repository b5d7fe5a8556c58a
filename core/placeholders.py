"""The placeholder rule, one implementation for the whole project: image rows replace the embeddings at
the image-placeholder positions. `QWenModel.forward` applies it for its `image_features` argument, and
the VLM applies it for every LM backbone (model/model.py).

Contract:
- `embed_with_placeholders(embedding, input_ids [B, T], image_token_id) -> [B, T, D]` looks ids up with
  the placeholder ids replaced by 0 first, because a placeholder id may lie outside the embedding table
  (its rows are overwritten anyway).
- `scatter_image_features(input_ids [B, T], embeds [B, T, D], features [n, D] | None, image_token_id)`:
  the rows of `features`, in order, replace `embeds` wherever `input_ids == image_token_id` (row-major:
  sample 0's placeholders first), in a copy (the caller's tensor is never modified). The number of
  placeholders must equal the number of rows, else a ValueError gives both numbers and the per-sample
  placeholder counts. Autograd reaches both the text embeddings and the features.
"""

from __future__ import annotations

import torch
from torch import nn


def embed_with_placeholders(embedding: nn.Module, input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B, T] ids -> [B, T, D] embeddings; placeholder ids are looked up as id 0."""
    return embedding(input_ids.masked_fill(input_ids == image_token_id, 0))


def scatter_image_features(
    input_ids: torch.Tensor, embeds: torch.Tensor, features: torch.Tensor | None, image_token_id: int
) -> torch.Tensor:
    """Return `embeds` with the placeholder positions replaced by `features` rows, in order."""
    mask = input_ids == image_token_id  # [B, T]
    n_slots = int(mask.sum())
    n_rows = 0 if features is None else features.shape[0]
    if features is not None and (features.dim() != 2 or features.shape[-1] != embeds.shape[-1]):
        raise ValueError(f"image features must be [n_placeholders_total, {embeds.shape[-1]}] (the LM's width), "
                         f"got {tuple(features.shape)}")
    if n_slots != n_rows:
        raise ValueError(
            f"{n_slots} image placeholder tokens (id {image_token_id}, per sample {mask.sum(dim=1).tolist()}) "
            f"but {n_rows} rows of image features; the <image> expansion and tokens_per_image disagree"
        )
    if n_rows == 0:
        return embeds
    out = embeds.clone()
    out[mask] = features.to(embeds.dtype)  # [n_slots, D] -> positions in row-major order
    return out
