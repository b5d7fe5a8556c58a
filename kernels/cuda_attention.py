"""Autograd wrapper around the CUDA C++ flash attention extension (`kernels/csrc/`).

Contract
--------
`cuda_attention(q, k, v, causal=False, scale=None)`: q `[B, Hq, Tq, D]`, k/v `[B, Hkv, Tk, D]` CUDA
tensors (fp32/fp16/bf16, D <= 128, Hq % Hkv == 0) -> `[B, Hq, Tq, D]`, differentiable in q, k, v.
Causal with `Tq != Tk` is bottom-right aligned. Arbitrary masks and packed (varlen) inputs are the
dispatcher's job (`kernels/attention.py`): it loops over packed sequences and sends masks elsewhere.
The extension is built on first use by `kernels.cuda_ext.load()`.
"""

from __future__ import annotations

import math

import torch

from . import cuda_ext


class _CudaFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        ext = cuda_ext.load()
        out, lse = ext.fwd(q, k, v, causal, scale)  # [B, Hq, Tq, D], [B, Hq, Tq] fp32
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = cuda_ext.load().bwd(dout, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def cuda_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    if q.device.type != "cuda":
        raise RuntimeError(f"cuda attention needs CUDA tensors, got q on {q.device}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _CudaFlashAttention.apply(q, k, v, bool(causal), scale)
