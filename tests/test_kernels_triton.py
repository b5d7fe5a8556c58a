"""Triton flash attention (run by the interpreter on CPU) against the eager fp32 reference.

Expectations come from `eager_attention` (plain softmax(q k^T) v) and, for varlen, from running it on
each packed sequence separately.
"""

import pytest
import torch
from qwenvl_lab.kernels.attention import attention, eager_attention

triton_attention_mod = pytest.importorskip("qwenvl_lab.kernels.triton_attention")
triton_attention = triton_attention_mod.triton_attention
triton_varlen_attention = triton_attention_mod.triton_varlen_attention

TOL = 1e-4  # the bar for fp32


def _qkv(b, hq, hkv, tq, tk, d, dtype=torch.float32):
    q = torch.randn(b, hq, tq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, tk, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, tk, d, dtype=dtype, requires_grad=True)
    return q, k, v


def _fwd_bwd(fn, q, k, v, grad_out, **kw):
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


def _assert_close(got, want, tol=TOL):
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol, f"max abs err {err} > {tol}"


CASES = {
    "non_causal": dict(b=2, hq=2, hkv=2, tq=24, tk=24, d=16, causal=False),
    "causal": dict(b=1, hq=2, hkv=2, tq=33, tk=33, d=32, causal=True),
    "causal_tq_lt_tk": dict(b=2, hq=2, hkv=2, tq=7, tk=29, d=16, causal=True),
    "causal_tq_gt_tk": dict(b=1, hq=2, hkv=2, tq=20, tk=9, d=16, causal=True),
    "gqa_causal": dict(b=1, hq=4, hkv=2, tq=19, tk=19, d=16, causal=True),
    "mqa_non_causal": dict(b=1, hq=4, hkv=1, tq=10, tk=21, d=16, causal=False),
    "head_dim_24": dict(b=1, hq=2, hkv=2, tq=17, tk=17, d=24, causal=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grads_match_eager(case):
    c = dict(CASES[case])
    causal = c.pop("causal")
    q, k, v = _qkv(**c)
    g = torch.randn(c["b"], c["hq"], c["tq"], c["d"])
    out, grads = _fwd_bwd(triton_attention, q, k, v, g, causal=causal)
    ref, ref_grads = _fwd_bwd(eager_attention, q, k, v, g, causal=causal)
    assert out.shape == (c["b"], c["hq"], c["tq"], c["d"])
    _assert_close(out, ref)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert a.shape == b.shape, name
        _assert_close(a, b)


def test_empty_causal_rows_are_zero():
    # Tq > Tk bottom-right aligned: the first Tq - Tk queries see no key, so their output is 0.
    q, k, v = _qkv(1, 2, 2, 12, 4, 16)
    out = triton_attention(q, k, v, causal=True)
    assert torch.all(out[:, :, :8] == 0)
    assert out[:, :, 8:].abs().sum() > 0


def test_explicit_scale():
    q, k, v = _qkv(1, 2, 2, 9, 9, 16)
    g = torch.randn(1, 2, 9, 16)
    out, grads = _fwd_bwd(triton_attention, q, k, v, g, causal=True, scale=0.37)
    ref, ref_grads = _fwd_bwd(eager_attention, q, k, v, g, causal=True, scale=0.37)
    _assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        _assert_close(a, b)


@pytest.mark.parametrize("heads", [1, 2])
def test_bool_mask_with_causal(heads):
    b, hq, tq, tk, d = 2, 2, 10, 18, 16
    q, k, v = _qkv(b, hq, hq, tq, tk, d)
    mask = torch.rand(b, heads, tq, tk) > 0.3
    mask[:, :, :, :3] = False  # left padding
    mask[0, :, 4] = False  # a query row with no allowed key -> 0
    g = torch.randn(b, hq, tq, d)
    out, grads = _fwd_bwd(triton_attention, q, k, v, g, causal=True, attention_mask=mask)
    ref, ref_grads = _fwd_bwd(eager_attention, q, k, v, g, causal=True, attention_mask=mask)
    _assert_close(out, ref)
    assert torch.all(out[0, :, 4] == 0)
    for a, b_ in zip(grads, ref_grads):
        _assert_close(a, b_)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_per_sequence_eager(causal):
    lens = [5, 17, 0, 1, 9]  # an empty sequence too
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    total, hq, hkv, d = sum(lens), 4, 2, 16
    q = torch.randn(total, hq, d, requires_grad=True)
    k = torch.randn(total, hkv, d, requires_grad=True)
    v = torch.randn(total, hkv, d, requires_grad=True)
    g = torch.randn(total, hq, d)
    out = triton_varlen_attention(q, k, v, cu, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), g)
    # Reference: each sequence on its own through eager attention, outputs concatenated.
    ref_parts = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))
        ref_parts.append(eager_attention(qs, ks, vs, causal=causal)[0].transpose(0, 1))
    ref = torch.cat(ref_parts)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    assert out.shape == (total, hq, d)
    _assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        _assert_close(a, b)


def test_dispatcher_triton_padded_and_varlen():
    q, k, v = _qkv(1, 2, 2, 11, 11, 16)
    _assert_close(attention(q, k, v, causal=True, impl="triton"), eager_attention(q, k, v, causal=True))
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    qp, kp, vp = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, H, D]
    out = attention(qp, kp, vp, causal=True, cu_seqlens=cu, impl="triton")
    ref = attention(qp, kp, vp, causal=True, cu_seqlens=cu, impl="eager")
    _assert_close(out, ref)


@pytest.mark.parametrize("d", [64, 80, 128])
def test_large_head_dims_forward(d):
    q, k, v = _qkv(1, 2, 2, 9, 9, d)
    _assert_close(triton_attention(q, k, v, causal=True), eager_attention(q, k, v, causal=True))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_forward_and_grads(dtype, tol):
    q, k, v = _qkv(1, 2, 2, 16, 16, 32, dtype=dtype)
    g = torch.randn(1, 2, 16, 32, dtype=dtype)
    out, grads = _fwd_bwd(triton_attention, q, k, v, g, causal=True)
    ref, ref_grads = _fwd_bwd(eager_attention, q, k, v, g, causal=True)
    assert out.dtype == dtype and all(x.dtype == dtype for x in grads)
    _assert_close(out, ref, tol)
    for a, b in zip(grads, ref_grads):
        _assert_close(a, b, 4 * tol)


def test_bad_inputs_raise():
    q, k, v = _qkv(1, 3, 2, 4, 4, 16)
    with pytest.raises(ValueError, match="multiple"):
        triton_attention(q, k, v)
    q, k, v = _qkv(1, 2, 2, 4, 4, 256)
    with pytest.raises(ValueError, match="head dim"):
        triton_attention(q, k, v)
    q, k, v = _qkv(1, 2, 2, 4, 4, 16)
    with pytest.raises(ValueError, match="attention_mask"):
        triton_attention(q, k, v, attention_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="Tk=4"):
        triton_attention(q, k, v, attention_mask=torch.ones(1, 1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="cu_seqlens"):
        triton_varlen_attention(q[0], k[0], v[0], torch.tensor([0, 2], dtype=torch.int64))
