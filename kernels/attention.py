"""One attention entry point for the whole codebase.

Contract
--------
`attention(q, k, v, causal=..., attention_mask=None, cu_seqlens=None, scale=None, impl="auto")`

* Padded layout: q `[B, Hq, Tq, D]`, k/v `[B, Hkv, Tk, D]` with `Hq % Hkv == 0` (GQA is handled
  here). Returns `[B, Hq, Tq, D]`.
* `causal=True` with `Tq < Tk` is bottom-right aligned: query i sits at absolute position
  `Tk - Tq + i` (a chunk fed on top of a KV cache).
* `attention_mask`: optional bool `[B, 1 or Hq, Tq, Tk]`, True = may attend. It is combined with
  `causal` when both are given.
* Variable length (`cu_seqlens` int32 `[n + 1]`): q/k/v are `[total, H, D]`, sequences are packed
  back to back and never attend across boundaries. Returns `[total, Hq, D]`.
* `impl`: `auto`, `torch` (SDPA), `eager` (reference math in fp32).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMPLS = ("auto", "torch", "eager")


def _expand_kv(k: torch.Tensor, n_rep: int) -> torch.Tensor:
    # [B, Hkv, T, D] -> [B, Hkv * n_rep, T, D]
    if n_rep == 1:
        return k
    return k.repeat_interleave(n_rep, dim=1)


def _full_mask(
    tq: int, tk: int, causal: bool, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Bool mask [.., Tq, Tk] (True = attend) combining causality and the caller's mask."""
    if not causal:
        return attention_mask
    offset = tk - tq
    qpos = torch.arange(tq, device=device)[:, None] + offset
    kpos = torch.arange(tk, device=device)[None, :]
    causal_mask = kpos <= qpos  # [Tq, Tk]
    if attention_mask is None:
        return causal_mask
    return attention_mask & causal_mask


def eager_attention(q, k, v, causal=False, attention_mask=None, scale=None):
    """Reference attention in fp32: softmax(q k^T * scale + mask) v. Padded layout only."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    mask = _full_mask(q.shape[2], k.shape[2], causal, attention_mask, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A fully masked row (e.g. a left-padding query) gives NaN; define its output as zero.
    probs = torch.nan_to_num(probs, nan=0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)


def sdpa_attention(q, k, v, causal=False, attention_mask=None, scale=None):
    """torch SDPA; uses its own causal path when there is no extra mask and Tq == Tk."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
    tq, tk = q.shape[2], k.shape[2]
    if attention_mask is None and (not causal or tq == tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    mask = _full_mask(tq, tk, causal, attention_mask, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # Rows with no key to attend to come back as NaN from SDPA; zero them like the reference.
    if attention_mask is not None:
        empty = ~mask.any(dim=-1, keepdim=True)  # [B, 1|H, Tq, 1]
        out = out.masked_fill(empty, 0.0)
    return out


def _varlen_to_padded(fn, q, k, v, cu_seqlens, causal, scale):
    """Run a padded-layout implementation one packed sequence at a time."""
    outs = []
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        # [T, H, D] -> [1, H, T, D]
        qs, ks, vs = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        outs.append(fn(qs, ks, vs, causal=causal, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


_IMPL_FNS = {"torch": sdpa_attention, "eager": eager_attention}
_logged_choice: set[str] = set()


def _resolve(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; valid: {', '.join(IMPLS)}")
    if impl == "auto":
        impl = "torch"
        if "auto" not in _logged_choice:
            _logged_choice.add("auto")
            log.info("attention impl=auto -> torch (SDPA)")
    return impl


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    fn = _IMPL_FNS[_resolve(impl)]
    if cu_seqlens is not None:
        if attention_mask is not None:
            raise ValueError("attention: give either attention_mask or cu_seqlens, not both")
        return _varlen_to_padded(fn, q, k, v, cu_seqlens, causal, scale)
    return fn(q, k, v, causal=causal, attention_mask=attention_mask, scale=scale)
