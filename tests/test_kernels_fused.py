"""Fused RMSNorm / rotary / SwiGLU: torch references against transformers and first principles, the Triton
kernels (interpreter) and the inductor-compiled ops against the references, forward and backward."""

import logging
import os

import pytest
import torch
from qwenvl_lab.kernels import _log, fused
from qwenvl_lab.kernels.fused import (
    apply_rotary,
    apply_rotary_torch,
    rms_norm,
    rms_norm_torch,
    swiglu,
    swiglu_torch,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

pytest.importorskip("qwenvl_lab.kernels.triton_fused")


@pytest.fixture(autouse=True)
def _fresh_log():
    _log.reset()


def _cos_sin(b, t, d, base=10000.0, offset=0):
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2).double() / d)
    pos = torch.arange(offset, offset + t).double()[None, :] + torch.arange(b).double()[:, None]  # [B, T]
    freqs = pos[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().float(), emb.sin().float()


def test_rms_norm_reference_matches_transformers():
    x = torch.randn(2, 5, 32)
    norm = Qwen2RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    torch.testing.assert_close(rms_norm_torch(x, norm.weight, 1e-6), norm(x), rtol=0, atol=1e-6)
    xh = x.half()
    torch.testing.assert_close(rms_norm_torch(xh, norm.weight.half(), 1e-6), norm.half()(xh), rtol=0, atol=0)


def test_rotary_reference_matches_transformers_and_complex_rotation():
    b, h, t, d = 2, 3, 6, 16
    x = torch.randn(b, h, t, d)
    cos, sin = _cos_sin(b, t, d)
    ours = apply_rotary_torch(x, cos, sin)
    hf, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-6)
    # First principles: (x_j + i x_{j+D/2}) * e^{i theta_j}, in float64.
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
    theta = torch.atan2(sin[..., : d // 2].double(), cos[..., : d // 2].double())[:, None]
    rz = z * torch.exp(1j * theta)
    torch.testing.assert_close(ours.double(), torch.cat([rz.real, rz.imag], -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5, 48), (7, 64), (1, 2, 3, 100)])
def test_triton_rms_norm_fwd_bwd(shape):
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(shape[-1], requires_grad=True)
    g = torch.randn(*shape)
    y = rms_norm(x, w, 1e-6, impl="triton")
    y_ref = rms_norm(x, w, 1e-6, impl="torch")
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), g)
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_rms_norm_half(dtype):
    x, w = torch.randn(4, 64, dtype=dtype), torch.randn(64, dtype=dtype)
    y, y_ref = rms_norm(x, w, 1e-6, impl="triton"), rms_norm_torch(x, w, 1e-6)
    assert y.dtype == y_ref.dtype == dtype
    # One rounding of the product may differ by an ulp (the interpreter's casts truncate).
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("table", ["batched", "shared"])
def test_triton_rotary_fwd_bwd(table):
    b, h, t, d = 2, 3, 7, 20
    x = torch.randn(b, h, t, d, requires_grad=True)
    cos, sin = _cos_sin(b, t, d, offset=3)
    if table == "shared":
        cos, sin = cos[0], sin[0]  # [T, D]
    g = torch.randn(b, h, t, d)
    y = apply_rotary(x, cos, sin, impl="triton")
    y_ref = apply_rotary(x, cos, sin, impl="torch")
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    (dx,) = torch.autograd.grad(y, x, g)
    (dx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=1e-6)


def test_triton_rotary_half_keeps_dtype():
    x = torch.randn(1, 2, 5, 32).half()
    cos, sin = _cos_sin(1, 5, 32)
    y = apply_rotary(x, cos, sin, impl="triton")
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, apply_rotary_torch(x, cos, sin), rtol=0, atol=1e-3)


def test_auto_on_cpu_uses_torch_and_bad_inputs_raise(monkeypatch, caplog):
    torch.set_default_device("cpu")  # CPU behaviour, also under the GPU check's QWENVL_TEST_DEVICE=cuda
    try:
        _auto_on_cpu_uses_torch_and_bad_inputs_raise(monkeypatch, caplog)
    finally:
        torch.set_default_device(os.environ.get("QWENVL_TEST_DEVICE") or None)


def _auto_on_cpu_uses_torch_and_bad_inputs_raise(monkeypatch, caplog):
    x, w = torch.randn(2, 8), torch.randn(8)
    assert x.device.type == "cpu"
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_torch(x, w, 1e-5))
    with pytest.raises(ValueError, match="unknown rms_norm impl"):
        rms_norm(x, w, 1e-5, impl="cuda")
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(4), 1e-5)
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rotary(torch.randn(1, 2, 5, 8), torch.randn(6, 8), torch.randn(6, 8))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        rms_norm(x, w, 1e-5, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # A broken Triton install makes the switch fall back to torch with the reason logged.
    monkeypatch.setitem(__import__("sys").modules, "qwenvl_lab.kernels.triton_fused", None)
    with caplog.at_level(logging.WARNING, logger="qwenvl_lab.kernels.fused"):
        y = rms_norm(x, w, 1e-5, impl="triton")
    torch.testing.assert_close(y, rms_norm_torch(x, w, 1e-5))
    assert "unavailable, using torch" in caplog.text


def test_swiglu_reference_matches_transformers_mlp_activation():
    from transformers.activations import ACT2FN

    up, gate = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    torch.testing.assert_close(swiglu_torch(up, gate), up * ACT2FN["silu"](gate), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(3, 5, 48), (1000,), (2, 1500)])
def test_triton_swiglu_fwd_bwd(shape):
    up = torch.randn(*shape, requires_grad=True)
    gate = (torch.randn(*shape) * 4).requires_grad_()  # large |gate| exercises both sigmoid tails
    g = torch.randn(*shape)
    y, y_ref = swiglu(up, gate, impl="triton"), swiglu(up, gate, impl="torch")
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    grads = torch.autograd.grad(y, (up, gate), g)
    grads_ref = torch.autograd.grad(y_ref, (up, gate), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_swiglu_shape_mismatch_raises():
    with pytest.raises(ValueError, match="swiglu"):
        swiglu(torch.randn(2, 4), torch.randn(2, 5))


def test_compile_impl_matches_reference_fwd_bwd():
    """impl="compile" (inductor's generated kernels) against the eager references, fp32, within 1e-5, on the
    test device (the CPU here, CUDA under the GPU check)."""
    torch._dynamo.reset()
    fused._PROBED.clear()
    x = torch.randn(2, 3, 7, 16, requires_grad=True)
    cos, sin = _cos_sin(2, 7, 16)
    w = torch.randn(16, requires_grad=True)
    up, gate = torch.randn(2, 7, 24, requires_grad=True), torch.randn(2, 7, 24, requires_grad=True)
    cases = [
        ("rms_norm", lambda impl: rms_norm(x, w, 1e-6, impl=impl), (x, w)),
        ("apply_rotary", lambda impl: apply_rotary(x, cos, sin, impl=impl), (x,)),
        ("swiglu", lambda impl: swiglu(up, gate, impl=impl), (up, gate)),
    ]
    for op, call, wrt in cases:
        y, y_ref = call("compile"), call("torch")
        assert fused._PROBED[(op, x.device.type, torch.float32)], f"{op}: the compiled path fell back"
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5, msg=op)
        g = torch.randn_like(y)
        for a, b in zip(torch.autograd.grad(y, wrt, g), torch.autograd.grad(y_ref, wrt, g)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=op)


def test_compile_impl_falls_back_when_compiling_fails(monkeypatch, caplog):
    fused._PROBED.clear()
    monkeypatch.setitem(fused._COMPILED, "swiglu", lambda *a: (_ for _ in ()).throw(RuntimeError("no compiler")))
    up, gate = torch.randn(4, 8), torch.randn(4, 8)
    with caplog.at_level(logging.WARNING, logger="qwenvl_lab.kernels.fused"):
        y = swiglu(up, gate, impl="compile")
    torch.testing.assert_close(y, swiglu_torch(up, gate))
    assert "impl=compile failed" in caplog.text and "no compiler" in caplog.text
    fused._PROBED.clear()
