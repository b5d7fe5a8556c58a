"""The placeholder rule for LMs that only take `inputs_embeds` (the "hf" backend).

Contract (the same rule `qwen.QWenModel` applies inside its own forward):
- `scatter_image_features(input_ids [B, T], embeds [B, T, D], features [n, D], image_token_id)`:
  the rows of `features`, in order, replace `embeds` wherever `input_ids == image_token_id`
  (row-major: sample 0's placeholders first). The count of placeholders must equal the count of
  rows, else a ValueError gives both numbers and the per-sample placeholder counts.
- `embed_with_placeholders(embedding, input_ids, image_token_id)` looks ids up in `embedding` with the
  placeholder ids replaced by 0 first, because a placeholder id may lie outside the embedding table
  (its rows are overwritten anyway).
- `causal_lm_loss(logits [B, T, V], labels [B, T])`: the rule of `qwen.QWenLMHeadModel`'s loss
  (position t predicts label t+1, ignore_index -100, fp32 mean over target tokens). qwen keeps its
  scatter and loss inside its forward (not exposed as functions), so the hf path uses these; a test
  checks both paths give the same logits and loss on the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; `labels` are unshifted, -100 is ignored."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be [B, T] = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    shift_logits = logits[:, :-1].float()  # [B, T-1, V]: position t predicts token t+1
    shift_labels = labels[:, 1:]  # [B, T-1]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def embed_with_placeholders(embedding: nn.Module, input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B, T] ids -> [B, T, D] embeddings; placeholder ids are looked up as id 0."""
    safe_ids = input_ids.masked_fill(input_ids == image_token_id, 0)
    return embedding(safe_ids)


def scatter_image_features(
    input_ids: torch.Tensor, embeds: torch.Tensor, features: torch.Tensor | None, image_token_id: int
) -> torch.Tensor:
    """Return `embeds` with the placeholder positions replaced by `features` rows, in order."""
    mask = input_ids == image_token_id  # [B, T]
    n_slots = int(mask.sum())
    n_rows = 0 if features is None else features.shape[0]
    if n_slots != n_rows:
        per_sample = mask.sum(dim=1).tolist()
        raise ValueError(
            f"image placeholders ({n_slots}, id {image_token_id}, per sample {per_sample}) != image feature "
            f"rows ({n_rows}); the <image> expansion and tokens_per_image disagree"
        )
    if n_rows == 0:
        return embeds
    assert features.shape[-1] == embeds.shape[-1], (
        f"image feature width {features.shape[-1]} != LM embedding width {embeds.shape[-1]}"
    )
    # index_put keeps autograd to both the text embeddings and the projected features.
    out = embeds.clone()
    out[mask] = features.to(embeds.dtype)  # [n_slots, D] -> positions in row-major order
    return out
