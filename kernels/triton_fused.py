"""Triton RMSNorm, rotary embedding and SwiGLU (forward and backward kernels), fp32 math inside.

Contract
--------
* `rms_norm(x [..., N], w [N], eps)` -> `w * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)`, in
  the dtype torch's type promotion of (w, x) gives; differentiable in x and w.
* `apply_rotary(x [B, H, T, D], cos, sin)` with cos/sin fp32 `[B, T, D]` or `[T, D]` (halves
  duplicated, as `cat([freqs, freqs])`): rotate-half in fp32, cast back to x's dtype; differentiable
  in x (cos/sin are position tables and get no gradient).
* `swiglu(up, gate)` -> `up * silu(gate)` computed in fp32 and rounded once to the inputs' dtype;
  differentiable in both (the backward recomputes the sigmoid instead of saving it).
* CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1`. Callers go through `kernels/fused.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    # Round to x's dtype before the weight multiply, exactly like the reference.
    x_hat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * n_cols + cols, (x_hat * w).to(Y.dtype.element_ty), mask=ok)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd_kernel(DY, X, W, RSTD, DX, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    x_hat = x * rstd
    g = dy * w  # gradient w.r.t. x_hat
    # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat))
    dx = rstd * (g - x_hat * (tl.sum(g * x_hat, 0) / n_cols))
    tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=ok)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # [R, N]
        w = w.contiguous()
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, w.dtype), device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(shape[-1])
        if x2.shape[0]:
            _rms_fwd_kernel[(x2.shape[0],)](x2, w, y, rstd, shape[-1], eps, BLOCK=block)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()
        dx = torch.empty_like(x2)
        if x2.shape[0]:
            _rms_bwd_kernel[(x2.shape[0],)](dy2, x2, w, rstd, dx, x2.shape[1],
                                            BLOCK=triton.next_power_of_2(x2.shape[1]))
        # dw = sum over rows of dy * x_hat (x_hat rounded like the forward), a cheap reduction.
        x_hat = (x2.float() * rstd[:, None]).to(x2.dtype)
        dw = (dy2.float() * x_hat.float()).sum(0).to(w.dtype)
        return dx.reshape(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, w, float(eps))


@triton.jit
def _rotary_kernel(X, COS, SIN, Y, n_heads, seq_len, half, cos_batch_stride,
                   BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # one (b, h, t) row of x [B, H, T, D]
    t = row % seq_len
    b = row // (n_heads * seq_len)
    cols = tl.arange(0, BLOCK)
    ok = cols < half
    x_base = row * 2 * half
    c_base = b * cos_batch_stride + t * 2 * half
    x1 = tl.load(X + x_base + cols, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_base + half + cols, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(COS + c_base + cols, mask=ok, other=0.0)
    c2 = tl.load(COS + c_base + half + cols, mask=ok, other=0.0)
    s1 = tl.load(SIN + c_base + cols, mask=ok, other=0.0)
    s2 = tl.load(SIN + c_base + half + cols, mask=ok, other=0.0)
    if BACKWARD:
        # Transpose of the rotation below: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1.
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        # x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1).
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(Y + x_base + cols, y1.to(Y.dtype.element_ty), mask=ok)
    tl.store(Y + x_base + half + cols, y2.to(Y.dtype.element_ty), mask=ok)


def _rotary_launch(x, cos, sin, backward: bool) -> torch.Tensor:
    B, H, T, D = x.shape
    y = torch.empty_like(x)
    batch_stride = 0 if cos.dim() == 2 else T * D  # [T, D] tables are shared by the batch
    if x.numel():
        _rotary_kernel[(B * H * T,)](x, cos, sin, y, H, T, D // 2, batch_stride,
                                     BACKWARD=backward, BLOCK=triton.next_power_of_2(D // 2))
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        x, cos, sin = x.contiguous(), cos.float().contiguous(), sin.float().contiguous()
        ctx.save_for_backward(cos, sin)
        return _rotary_launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotary_launch(dy.contiguous(), cos, sin, backward=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _Rotary.apply(x, cos, sin)


@triton.jit
def _swiglu_fwd_kernel(UP, GATE, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    u = tl.load(UP + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=ok, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(Y + offs, (u * g * s).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(DY, UP, GATE, DUP, DGATE, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=ok, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(DUP + offs, (dy * g * s).to(DUP.dtype.element_ty), mask=ok)
    # d silu(g) / dg = s * (1 + g * (1 - s))
    tl.store(DGATE + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DGATE.dtype.element_ty), mask=ok)


_SWIGLU_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, up, gate):
        up, gate = up.contiguous(), gate.contiguous()
        y = torch.empty_like(up)
        n = up.numel()
        if n:
            _swiglu_fwd_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](up, gate, y, n, BLOCK=_SWIGLU_BLOCK)
        ctx.save_for_backward(up, gate)
        return y

    @staticmethod
    def backward(ctx, dy):
        up, gate = ctx.saved_tensors
        dy = dy.contiguous()
        dup, dgate = torch.empty_like(up), torch.empty_like(gate)
        n = up.numel()
        if n:
            _swiglu_bwd_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](dy, up, gate, dup, dgate, n, BLOCK=_SWIGLU_BLOCK)
        return dup, dgate


def swiglu(up: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(up, gate)
