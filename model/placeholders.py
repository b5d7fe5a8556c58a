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
  (position t predicts label t+1, ignore_index -100, fp32 mean over target tokens); it calls
  `qwen.loss.full_logits_loss`, so the shift stays in one place (`qwen.loss.shift_targets`).
- Supervised-only loss for a transformers causal LM: `supports_supervised_loss(lm)` (False when the
  model post-processes its logits, e.g. Gemma-2 soft-capping, so the full path must run),
  `hf_hidden_states(lm, embeds, attention_mask, **kw) -> (hidden [B, T, D], past_key_values)` runs the
  base model only (no lm_head; peft wrappers are looked through), `hf_output_head(lm)` is the module
  mapping hidden states to logits; `supervised_loss` (from `qwen.loss`) then chunks the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen.loss import full_logits_loss, supervised_loss

__all__ = ["IGNORE_INDEX", "LOSS_CHUNK_SIZE", "causal_lm_loss", "embed_with_placeholders", "hf_hidden_states",
           "hf_output_head", "scatter_image_features", "supervised_loss", "supports_supervised_loss"]

IGNORE_INDEX = -100


LOSS_CHUNK_SIZE = 1024  # rows of [rows, V] logits alive at once in the supervised-only loss
# Config attributes with which a transformers LM changes its logits after lm_head.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; `labels` are unshifted, -100 is ignored."""
    return full_logits_loss(logits, labels)


def _unwrap_peft(lm: nn.Module) -> nn.Module:
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def supports_supervised_loss(lm: nn.Module) -> bool:
    """True when `lm`'s logits are exactly `get_output_embeddings()(base model hidden states)`."""
    base = _unwrap_peft(lm)
    cfg = getattr(base, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if any(getattr(cfg, name, None) not in (None, 1, 1.0) for name in LOGIT_POSTPROCESSING):
        return False
    return hasattr(base, "get_decoder") and base.get_output_embeddings() is not None


def hf_output_head(lm: nn.Module) -> nn.Module:
    return _unwrap_peft(lm).get_output_embeddings()


def hf_hidden_states(lm: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kw):
    """The base model's last hidden states `[B, T, D]` (after the final norm) and its cache."""
    decoder = _unwrap_peft(lm).get_decoder()
    out = decoder(inputs_embeds=embeds, attention_mask=attention_mask, **kw)
    return out.last_hidden_state, getattr(out, "past_key_values", None)


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
