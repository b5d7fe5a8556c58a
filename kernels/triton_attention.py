"""Flash attention forward + backward in Triton (tiled, online softmax, fp32 accumulation).

Contract
--------
`triton_attention(q, k, v, causal=False, attention_mask=None, scale=None)` — padded layout:
  q `[B, Hq, Tq, D]`, k/v `[B, Hkv, Tk, D]` -> `[B, Hq, Tq, D]`; `attention_mask` optional bool
  `[B, 1|Hq, Tq, Tk]` (True = may attend; it can also be a broadcastable view).
`triton_varlen_attention(q, k, v, cu_seqlens, causal=False, scale=None)` — packed layout:
  q `[total, Hq, D]`, k/v `[total, Hkv, D]`, `cu_seqlens` int32 `[n + 1]` -> `[total, Hq, D]`.

* Differentiable in q, k, v (a `torch.autograd.Function`; the mask and `cu_seqlens` get no gradient).
* Causal with `Tq != Tk` is bottom-right aligned: query i sees key j iff `j <= i + Tk - Tq`.
* GQA: q head h reads kv head `h // (Hq // Hkv)`; dk/dv sum over the q heads of a group in-kernel.
* A query row with no visible key returns 0 (and contributes no gradient).
* Head dim <= 128 (padded to a power of two >= 16 inside the kernel by masked loads);
  fp32 (dots in full IEEE precision, no TF32), fp16 and bf16 (fp32 accumulation).
* Runs on CUDA tensors, or on CPU tensors when `TRITON_INTERPRET=1` was set before triton was
  imported (how the tests run it; slow, so keep shapes tiny there).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _visible(offs_m, cols, q_len, k_len, MASK, mask_base, smq, smk, CAUSAL: tl.constexpr,
             HAS_MASK: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: may query row offs_m attend to key cols (bounds, causal, user mask)."""
    ok = (offs_m[:, None] < q_len) & (cols[None, :] < k_len)
    if CAUSAL:
        # Bottom-right alignment: the last query sits at the last key.
        ok = ok & (cols[None, :] <= offs_m[:, None] + (k_len - q_len))
    if HAS_MASK:
        m = tl.load(MASK + mask_base + offs_m[:, None] * smq + cols[None, :] * smk, mask=ok, other=0)
        ok = ok & (m != 0)
    return ok


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """tl.dot; with DOT_F32 both operands go to fp32 first (the interpreter's bf16 dot is wrong)."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first token, length) of sequence b for q and k; padded layout starts every sequence at 0."""
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        k_len = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k
    return q_start, q_len, k_start, k_len


@triton.jit
def _fwd_kernel(Q, K, V, OUT, LSE, MASK, CU_Q, CU_K,
                sqb, sqh, sqt, skb, skh, skt, slb, slh, smb, smh, smq, smk,
                seqlen_q, seqlen_k, n_rep, scale, head_dim,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hk = h // n_rep
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    if pid_m * BLOCK_M >= q_len:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_base = b * sqb + h * sqh + q_start * sqt
    k_base = b * skb + hk * skh + k_start * skt
    mask_base = b * smb + h * smh
    row_ok = offs_m < q_len
    q = tl.load(Q + q_base + offs_m[:, None] * sqt + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = k_len
    if CAUSAL:
        # Keys beyond the last row's causal limit are invisible to the whole block.
        hi = tl.minimum(k_len, (pid_m + 1) * BLOCK_M + (k_len - q_len))
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < k_len) & d_ok[None, :]
        k = tl.load(K + k_base + cols[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        v = tl.load(V + k_base + cols[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, DOT_F32) * scale  # [BM, BN]
        ok = _visible(offs_m, cols, q_len, k_len, MASK, mask_base, smq, smk, CAUSAL, HAS_MASK)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, DOT_F32)
        m_i = m_new
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    tl.store(OUT + q_base + offs_m[:, None] * sqt + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), 0.0)
    tl.store(LSE + b * slb + h * slh + q_start + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, MASK, CU_Q, CU_K,
                   sqb, sqh, sqt, skb, skh, skt, slb, slh, smb, smh, smq, smk,
                   seqlen_q, seqlen_k, n_rep, scale, head_dim,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hk = h // n_rep
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    if pid_m * BLOCK_M >= q_len:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < q_len
    q_base = b * sqb + h * sqh + q_start * sqt
    k_base = b * skb + hk * skh + k_start * skt
    mask_base = b * smb + h * smh
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + q_start + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + b * slb + h * slh + q_start + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, (pid_m + 1) * BLOCK_M + (k_len - q_len))
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < k_len) & d_ok[None, :]
        k = tl.load(K + k_base + cols[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + k_base + cols[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, DOT_F32) * scale  # [BM, BN]
        ok = _visible(offs_m, cols, q_len, k_len, MASK, mask_base, smq, smk, CAUSAL, HAS_MASK)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # the forward's probabilities, rebuilt
        dp = _dot(do, tl.trans(v), PRECISION, DOT_F32)  # [BM, BN]
        ds = p * (dp - delta[:, None])  # softmax backward
        dq += _dot(ds.to(k.dtype), k, PRECISION, DOT_F32)
    tl.store(DQ + q_base + offs_m[:, None] * sqt + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=qd_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, MASK, CU_Q, CU_K,
                     sqb, sqh, sqt, skb, skh, skt, slb, slh, smb, smh, smq, smk,
                     seqlen_q, seqlen_k, n_rep, scale, head_dim,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n, b, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    if pid_n * BLOCK_N >= k_len:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    k_base = b * skb + hk * skh + k_start * skt
    kv_mask = (offs_n[:, None] < k_len) & d_ok[None, :]
    k = tl.load(K + k_base + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
    v = tl.load(V + k_base + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        # The first query that can see key pid_n * BLOCK_N is i = j - (k_len - q_len).
        lo = tl.maximum(0, pid_n * BLOCK_N - (k_len - q_len)) // BLOCK_M * BLOCK_M
    # Every q head of this kv head's group contributes to dk/dv (GQA), summed here without atomics.
    for r in range(0, n_rep):
        h = hk * n_rep + r
        q_base = b * sqb + h * sqh + q_start * sqt
        l_base = b * slb + h * slh + q_start
        mask_base = b * smb + h * smh
        for start_m in range(lo, q_len, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < q_len
            qd_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=qd_mask, other=0.0)
            do = tl.load(DO + q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=qd_mask, other=0.0)
            lse = tl.load(LSE + l_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + l_base + offs_m, mask=row_ok, other=0.0)
            s = _dot(q, tl.trans(k), PRECISION, DOT_F32) * scale  # [BM, BN]
            ok = _visible(offs_m, offs_n, q_len, k_len, MASK, mask_base, smq, smk, CAUSAL, HAS_MASK)
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dv += _dot(tl.trans(p).to(do.dtype), do, PRECISION, DOT_F32)  # [BN, BD]
            dp = _dot(do, tl.trans(v), PRECISION, DOT_F32)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds).to(q.dtype), q, PRECISION, DOT_F32)
    tl.store(DK + k_base + offs_n[:, None] * skt + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + k_base + offs_n[:, None] * skt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


def _blocks(head_dim: int, dtype: torch.dtype, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D). Tiles sized so shared memory stays under ~100 KB (sm_86/89 limit)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreting():
        return 16, 16, block_d  # the interpreter runs numpy per program: small tiles keep it quick
    if backward and dtype == torch.float32 and block_d > 64:
        return 16, 16, block_d  # fp32 D=128 backward keeps five fp32 tiles in shared memory
    if backward or dtype == torch.float32 or block_d > 64:
        return 32, 32, block_d
    return 64, 64, block_d


def _precision(dtype: torch.dtype) -> tuple[str, bool]:
    """(tl.dot input_precision, upcast-before-dot): full fp32 for fp32 inputs, never TF32."""
    if interpreting() and dtype == torch.bfloat16:
        return "ieee", True
    return ("ieee" if dtype == torch.float32 else "tf32"), False


class _Geometry:
    """Strides and sizes shared by the three kernels, for the padded or the packed layout."""

    def __init__(self, q, k, cu_seqlens, max_seqlen):
        self.varlen = cu_seqlens is not None
        if self.varlen:  # q [total, H, D]: no batch stride, sequences start at cu_seqlens[b]
            self.batch = cu_seqlens.numel() - 1
            self.hq, self.hkv, self.d = q.shape[1], k.shape[1], q.shape[2]
            self.sq = (0, q.stride(1), q.stride(0))
            self.sk = (0, k.stride(1), k.stride(0))
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if self.batch else 0
            self.tq = self.tk = max_seqlen
        else:  # q [B, H, T, D]
            self.batch, self.hq, self.tq, self.d = q.shape
            self.hkv, self.tk = k.shape[1], k.shape[2]
            self.sq = (q.stride(0), q.stride(1), q.stride(2))
            self.sk = (k.stride(0), k.stride(1), k.stride(2))

    def lse_buffer(self, q: torch.Tensor) -> torch.Tensor:
        # padded: [B, Hq, Tq]; packed: [Hq, total] (token stride 1 in both).
        if self.varlen:
            return torch.empty(self.hq, q.shape[0], device=q.device, dtype=torch.float32)
        return torch.empty(self.batch, self.hq, self.tq, device=q.device, dtype=torch.float32)

    def lse_strides(self, lse: torch.Tensor) -> tuple[int, int]:
        return (0, lse.stride(0)) if self.varlen else (lse.stride(0), lse.stride(1))


def _mask_args(mask: torch.Tensor | None, g: _Geometry, device) -> tuple:
    if mask is None:
        return torch.empty(1, dtype=torch.uint8, device=device), (0, 0, 0, 0)
    mask = mask.expand(g.batch, mask.shape[1], g.tq, g.tk)
    strides = [mask.stride(i) for i in range(4)]
    if mask.shape[1] == 1:
        strides[1] = 0  # one mask shared by every head
    return mask.view(torch.uint8), tuple(strides)


def _check(q, k, v, mask, cu_seqlens):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in DTYPES:
            raise TypeError(f"triton attention: {name} dtype {t.dtype} not in {DTYPES}")
        if t.device != q.device or t.dtype != q.dtype:
            raise ValueError(f"triton attention: {name} must share q's device and dtype")
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError("triton attention needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    ndim = 3 if cu_seqlens is not None else 4
    if q.dim() != ndim or k.dim() != ndim or k.shape != v.shape:
        raise ValueError(f"triton attention: expected {ndim}-d q/k/v with k.shape == v.shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    hq, hkv, d = q.shape[-3 if ndim == 4 else 1], k.shape[-3 if ndim == 4 else 1], q.shape[-1]
    if hq % hkv != 0 or k.shape[-1] != d:
        raise ValueError(f"triton attention: Hq={hq} must be a multiple of Hkv={hkv} and head dims equal")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"triton attention: head dim {d} > {MAX_HEAD_DIM}")
    if mask is not None:
        b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
        if (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, b)
                or mask.shape[1] not in (1, hq) or tuple(mask.shape[2:]) != (tq, tk)):
            raise ValueError(f"triton attention: attention_mask must be bool [B={b}, 1|Hq={hq}, Tq={tq}, "
                             f"Tk={tk}], got {mask.dtype} {tuple(mask.shape)}")
    if cu_seqlens is not None and (cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1):
        raise ValueError("triton attention: cu_seqlens must be an int32 [n + 1] tensor")


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, mask, cu_seqlens, max_seqlen):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        g = _Geometry(q, k, cu_seqlens, max_seqlen)
        out = torch.empty_like(q)
        lse = g.lse_buffer(q)
        mask_t, ms = _mask_args(mask, g, q.device)
        cu = cu_seqlens if cu_seqlens is not None else torch.empty(1, dtype=torch.int32, device=q.device)
        bm, bn, bd = _blocks(g.d, q.dtype, backward=False)
        prec, dot_f32 = _precision(q.dtype)
        grid = (triton.cdiv(max(g.tq, 1), bm), g.batch, g.hq)
        _fwd_kernel[grid](q, k, v, out, lse, mask_t, cu, cu, *g.sq, *g.sk, *g.lse_strides(lse), *ms,
                          g.tq, g.tk, g.hq // g.hkv, scale, g.d,
                          CAUSAL=causal, HAS_MASK=mask is not None, VARLEN=g.varlen,
                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=prec, DOT_F32=dot_f32)
        ctx.save_for_backward(q, k, v, out, lse, mask_t, cu)
        ctx.meta = (causal, scale, mask is not None, g, ms)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask_t, cu = ctx.saved_tensors
        causal, scale, has_mask, g, ms = ctx.meta
        dout = dout.contiguous()
        # delta_i = sum_d dO * O per query row, stored in the lse layout.
        delta = (dout.float() * out.float()).sum(-1)  # [B, Hq, Tq] or [total, Hq]
        delta = delta.t().contiguous() if g.varlen else delta.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        bm, bn, bd = _blocks(g.d, q.dtype, backward=True)
        prec, dot_f32 = _precision(q.dtype)
        common = dict(CAUSAL=causal, HAS_MASK=has_mask, VARLEN=g.varlen, BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_D=bd, PRECISION=prec, DOT_F32=dot_f32)
        args = (*g.sq, *g.sk, *g.lse_strides(lse), *ms, g.tq, g.tk, g.hq // g.hkv, scale, g.d)
        _bwd_dq_kernel[(triton.cdiv(max(g.tq, 1), bm), g.batch, g.hq)](
            q, k, v, dout, dq, lse, delta, mask_t, cu, cu, *args, **common)
        _bwd_dkdv_kernel[(triton.cdiv(max(g.tk, 1), bn), g.batch, g.hkv)](
            q, k, v, dout, dk, dv, lse, delta, mask_t, cu, cu, *args, **common)
        return dq, dk, dv, None, None, None, None, None


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Padded layout: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> [B, Hq, Tq, D]."""
    _check(q, k, v, attention_mask, None)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, bool(causal), scale, attention_mask, None, None)


def triton_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Packed layout: q [total, Hq, D], k/v [total, Hkv, D], cu_seqlens int32 [n+1] -> [total, Hq, D]."""
    _check(q, k, v, None, cu_seqlens)
    if cu_seqlens.device != q.device:
        cu_seqlens = cu_seqlens.to(q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, bool(causal), scale, None, cu_seqlens, max_seqlen)
