"""Fused RMSNorm and rotary embedding behind a switch, with torch references.

Contract
--------
* `rms_norm(x [..., N], weight [N], eps, impl="auto")` = `weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps))
  .to(x.dtype)` — Qwen's semantics: normalise in fp32, cast back, then multiply by the weight.
* `apply_rotary(x [B, H, T, D], cos, sin, impl="auto")`, cos/sin fp32 `[B, T, D]` or `[T, D]` with
  duplicated halves: `x_fp32 * cos + rotate_half(x_fp32) * sin` cast back to x's dtype, where
  `rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])` (GPT-NeoX style).
* `impl`: `torch` (reference, runs anywhere), `triton` (`kernels/triton_fused.py`; CUDA tensors, or
  CPU tensors under `TRITON_INTERPRET=1`; raises otherwise), `auto` (Triton for CUDA tensors when it
  imports, else torch; a failed import is logged once and falls back to torch).
* Both are differentiable in every implementation (rotary: in x only).
"""

from __future__ import annotations

import logging
import os

import torch

from kernels._log import log_once

log = logging.getLogger(__name__)

FUSED_IMPLS = ("auto", "torch", "triton")


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if cos.dim() == 3:  # [B, T, D] -> [B, 1, T, D] to broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def _resolve(impl: str, x: torch.Tensor, op: str) -> str:
    if impl not in FUSED_IMPLS:
        raise ValueError(f"unknown {op} impl {impl!r}; valid: {', '.join(FUSED_IMPLS)}")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if impl == "torch" or (impl == "auto" and x.device.type != "cuda"):
        return "torch"
    if impl == "triton" and x.device.type != "cuda" and not interpreting:
        raise RuntimeError(f"{op} impl='triton' needs CUDA tensors (got {x.device}), or "
                           "TRITON_INTERPRET=1 set before triton is imported")
    try:
        import kernels.triton_fused  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "use the reference"
        log_once(log, f"fused:{op}", logging.WARNING, "%s impl=%s unavailable, using torch: %s", op, impl, e)
        return "torch"
    return "triton"


def _check_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rotary: x must be [B, H, T, D] with even D, got {tuple(x.shape)}")
    B, _, T, D = x.shape
    ok = {(T, D), (B, T, D)} if cos.dim() == 3 else {(T, D)}
    if tuple(cos.shape) not in ok or cos.shape != sin.shape:
        raise ValueError(f"apply_rotary: cos/sin must be [B, T, D] or [T, D] for x {tuple(x.shape)}, got "
                         f"{tuple(cos.shape)} / {tuple(sin.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    if _resolve(impl, x, "rms_norm") == "torch":
        return rms_norm_torch(x, weight, eps)
    from kernels.triton_fused import rms_norm as rms_norm_triton

    return rms_norm_triton(x, weight, eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    _check_rotary(x, cos, sin)
    if _resolve(impl, x, "apply_rotary") == "torch":
        return apply_rotary_torch(x, cos, sin)
    from kernels.triton_fused import apply_rotary as apply_rotary_triton

    if cos.dim() == 3 and cos.shape[0] != x.shape[0]:  # a [1, T, D] table: drop the batch axis
        cos, sin = cos[0], sin[0]
    return apply_rotary_triton(x, cos, sin)
