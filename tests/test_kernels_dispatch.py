"""The attention dispatcher: impl selection, errors, and the fallback to SDPA when a build fails."""

import importlib
import importlib.util
import logging

import pytest
import torch
from qwenvl_lab.kernels import _log, cuda_ext, selftest
from qwenvl_lab.kernels.attention import attention, eager_attention
from qwenvl_lab.kernels.prepare import prepare_attention

# `kernels.attention` the attribute is the function; the module is fetched by name.
attn_mod = importlib.import_module("qwenvl_lab.kernels.attention")


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch, tmp_path):
    _log.reset()
    selftest.reset()  # auto's verified choices are per process: each test starts without one
    monkeypatch.setenv("QWENVL_KERNEL_CACHE", str(tmp_path / "ext"))
    # Whatever the CUDA build did earlier in the session, these tests start from "not built".
    monkeypatch.setattr(cuda_ext, "_module", None)
    monkeypatch.setattr(cuda_ext, "_failure", None)


def _qkv(b=2, hq=4, hkv=2, t=9, d=16):
    # CPU tensors even under the GPU check's QWENVL_TEST_DEVICE=cuda: these tests check the CPU dispatch
    # (and force the GPU branches on it with stand-ins).
    cpu = dict(device="cpu")
    return torch.randn(b, hq, t, d, **cpu), torch.randn(b, hkv, t, d, **cpu), torch.randn(b, hkv, t, d, **cpu)


def _failing_build(*args, **kwargs):
    raise RuntimeError("Error building extension 'qwenvl_flash_attn':\n[1/3] nvcc ...\nnvcc fatal: boom")


@pytest.mark.parametrize("impl", ["torch", "eager", "auto"])
def test_cpu_impls_match_eager(impl):
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, causal=True, impl=impl), eager_attention(q, k, v, causal=True),
                               rtol=0, atol=1e-5)


def test_auto_on_cpu_logs_choice_once(caplog):
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="qwenvl_lab.kernels.attention"):
        attention(q, k, v, impl="auto")
        attention(q, k, v, impl="auto")
    msgs = [r.getMessage() for r in caplog.records if "impl=auto" in r.getMessage()]
    assert msgs == ["attention impl=auto -> torch (tensors are not on a GPU)"]


def test_unknown_impl_and_cuda_without_gpu_raise(monkeypatch):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        attention(q, k, v, impl="flash")
    with pytest.raises(RuntimeError, match="impl='cuda' needs CUDA tensors"):
        attention(q, k, v, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="impl='triton' needs CUDA tensors"):
        attention(q, k, v, impl="triton")
    with pytest.raises(ValueError, match="not both"):
        attention(q, k, v, attention_mask=torch.ones(2, 1, 9, 9, dtype=torch.bool),
                  cu_seqlens=torch.tensor([0, 9], dtype=torch.int32))


def test_failing_cuda_build_falls_back_to_sdpa(monkeypatch, caplog):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", _failing_build)
    monkeypatch.setattr(attn_mod, "_is_gpu", lambda t: True)  # pretend the tensors live on a GPU
    sdpa_calls = []
    monkeypatch.setitem(attn_mod._IMPL_FNS, "torch",
                        lambda *a, **kw: sdpa_calls.append(1) or attn_mod.sdpa_attention(*a, **kw))
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger="qwenvl_lab.kernels.attention"):
        out = attention(q, k, v, causal=True, impl="cuda")
        attention(q, k, v, causal=True, impl="cuda")
    assert sdpa_calls == [1, 1]
    torch.testing.assert_close(out, eager_attention(q, k, v, causal=True), rtol=0, atol=1e-5)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "qwenvl_lab.kernels.attention"]
    assert len(warnings) == 1, warnings  # logged once
    assert "falling back to torch (SDPA)" in warnings[0] and "nvcc fatal: boom" in warnings[0]


def test_auto_on_gpu_without_any_verified_kernel_uses_sdpa(monkeypatch, caplog):
    """No Triton, the CUDA extension never built: auto stays on SDPA and says why (no build is attempted)."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda *a, **kw: pytest.fail("auto must not build the extension"))
    monkeypatch.setattr(attn_mod, "_is_gpu", lambda t: True)

    def no_triton():
        raise ImportError("triton attention unavailable: ModuleNotFoundError: No module named 'triton'")

    monkeypatch.setattr(attn_mod, "_load_triton", no_triton)
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="qwenvl_lab.kernels.attention"):
        assert prepare_attention(q.device, q.dtype, q.shape[-1]) == "torch"
        out = attention(q, k, v, causal=True, impl="auto")
    torch.testing.assert_close(out, eager_attention(q, k, v, causal=True), rtol=0, atol=1e-5)
    text = caplog.text
    assert "impl=auto -> torch (SDPA (triton: unavailable" in text and "No module named 'triton'" in text
    assert "cuda: unavailable: the CUDA extension is not built" in text


def test_cuda_ext_failure_message_has_log_tail_and_is_remembered(monkeypatch):
    from torch.utils import cpp_extension

    calls = []

    def failing(*a, **kw):
        calls.append(1)
        _failing_build()

    monkeypatch.setattr(cpp_extension, "load", failing)
    for _ in range(2):
        with pytest.raises(cuda_ext.CudaExtensionError, match="nvcc fatal: boom"):
            cuda_ext.load()
    assert calls == [1]  # the second call fails fast
    assert not cuda_ext.is_built()


def test_varlen_loops_match_per_sequence():
    lens = [3, 8, 5]
    cu = torch.tensor([0, 3, 11, 16], dtype=torch.int32)
    q, k, v = torch.randn(16, 2, 8), torch.randn(16, 1, 8), torch.randn(16, 1, 8)
    out = attention(q, k, v, causal=True, cu_seqlens=cu, impl="torch")
    s = 0
    for n in lens:
        ref = eager_attention(*(x[s:s + n].transpose(0, 1)[None] for x in (q, k, v)), causal=True)
        torch.testing.assert_close(out[s:s + n], ref[0].transpose(0, 1), rtol=0, atol=1e-5)
        s += n


def test_routing_when_the_cuda_kernel_is_verified(monkeypatch, caplog):
    """auto picked the (fake) CUDA kernel after its self-test: padded calls use it, masked calls go to SDPA
    (it has no mask input), packed calls loop through it; explicit impl='cuda' routes the same way."""
    import types

    from qwenvl_lab.kernels import selftest

    cuda_calls = []

    def fake_cuda_attention(q, k, v, causal=False, scale=None):
        cuda_calls.append(q.shape)
        return eager_attention(q, k, v, causal=causal, scale=scale)

    monkeypatch.setattr(attn_mod, "_is_gpu", lambda t: True)
    monkeypatch.setattr(attn_mod, "_load_cuda", lambda: types.SimpleNamespace(cuda_attention=fake_cuda_attention))
    monkeypatch.setattr(selftest, "verify", lambda *a, **kw: selftest.Choice("cuda", "cuda", "verified (test)"))
    q, k, v = _qkv(t=10)
    with caplog.at_level(logging.INFO, logger="qwenvl_lab.kernels.attention"):
        assert prepare_attention(q.device, q.dtype, q.shape[-1]) == "cuda"
        out = attention(q, k, v, causal=True, impl="auto")
    assert len(cuda_calls) == 1 and "impl=auto -> cuda (verified (test))" in caplog.text
    torch.testing.assert_close(out, eager_attention(q, k, v, causal=True), rtol=0, atol=1e-5)

    mask = torch.rand(2, 1, 10, 10, device="cpu") > 0.2
    want = eager_attention(q, k, v, causal=True, attention_mask=mask)
    for impl in ("auto", "cuda"):
        with caplog.at_level(logging.INFO, logger="qwenvl_lab.kernels.attention"):
            got = attention(q, k, v, causal=True, attention_mask=mask, impl=impl)
        assert len(cuda_calls) == 1
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert "calls with attention_mask use SDPA" in caplog.text
    # Varlen loops the packed sequences through the extension.
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device="cpu")
    qp, kp, vp = (x[0].transpose(0, 1) for x in (q, k, v))
    got = attention(qp, kp, vp, causal=True, cu_seqlens=cu, impl="auto")
    assert len(cuda_calls) == 3
    torch.testing.assert_close(got, attention(qp, kp, vp, causal=True, cu_seqlens=cu, impl="eager"),
                               rtol=0, atol=1e-5)


def test_auto_sends_unsupported_inputs_to_sdpa(monkeypatch, caplog):
    monkeypatch.setattr(attn_mod, "_is_gpu", lambda t: True)
    monkeypatch.setattr(attn_mod, "_load_cuda", lambda: pytest.fail("must not try the CUDA extension"))
    q, k, v = _qkv(d=160)
    with caplog.at_level(logging.INFO, logger="qwenvl_lab.kernels.attention"):
        out = attention(q, k, v, causal=True, impl="auto")
    assert "head dim 160 not supported" in caplog.text
    torch.testing.assert_close(out, eager_attention(q, k, v, causal=True), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mask_heads", [None, 1, 8])
def test_grouped_decode_step_matches_the_reference_without_expanding_the_cache(monkeypatch, mask_heads):
    """A one-query step with GQA (8 query heads on 2 KV heads) through SDPA folds the query heads onto their
    KV head: the same output as the fp32 reference, and no [B, Hq, Tk, D] copy of the cache."""
    A = importlib.import_module("qwenvl_lab.kernels.attention")  # the module (the package exports the function)

    dev = torch.get_default_device()  # the test device: the GPU check runs this on CUDA
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(3, 8, 1, 16, generator=g, device=dev)
    k, v = torch.randn(3, 2, 7, 16, generator=g, device=dev), torch.randn(3, 2, 7, 16, generator=g, device=dev)
    mask = None
    if mask_heads:
        mask = torch.rand(3, mask_heads, 1, 7, generator=g, device=dev) > 0.3
        mask[..., -1] = True  # every row keeps a key
    ref = A.eager_attention(q, k, v, causal=True, attention_mask=mask)
    expanded = []
    real = A._expand_kv
    monkeypatch.setattr(A, "_expand_kv", lambda t, n: expanded.append(n) or real(t, n))
    out = A.attention(q, k, v, causal=True, attention_mask=mask, impl="torch")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert expanded == [1, 1]  # keys and values went in as they are
