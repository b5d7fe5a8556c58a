"""kernels.selftest and `auto` on a GPU: the decision from self-test results and timings, the real check
of the Triton kernel (interpreter on CPU), a broken kernel failing it, and the command line without CUDA."""

import importlib
import logging

import pytest
import torch
from qwenvl_lab.kernels import _log, selftest
from qwenvl_lab.kernels.attention import attention
from qwenvl_lab.kernels.prepare import prepare_attention
from qwenvl_lab.kernels.selftest import Choice, KernelResult, decide

attn_mod = importlib.import_module("qwenvl_lab.kernels.attention")
SMALL = [("causal_gqa", 1, 2, 1, 9, 9, True, False), ("padding_mask", 2, 2, 2, 8, 8, True, True)]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    _log.reset()
    selftest.reset()
    monkeypatch.delenv(attn_mod.SELFTEST_ENV, raising=False)


def _r(name, passed=True, ms=1.0, ref_ms=1.0, available=True, reason=""):
    return KernelResult(name, available, reason, passed, {}, ms if passed else None, ref_ms if passed else None)


def test_decide_needs_a_pass_and_a_speedup():
    assert decide([_r("triton", ms=2.0), _r("cuda", available=False, passed=False, reason="unavailable: x")]).impl \
        == "torch"
    slower = decide([_r("triton", ms=2.0, ref_ms=1.0)])
    assert slower.impl == "torch" and "triton: passed but 0.50x SDPA" in slower.reason
    failed = decide([_r("triton", passed=False, reason="errors above 0.04: causal_gqa 3.1e-01")])
    assert failed.impl == "torch" and "errors above" in failed.reason and failed.varlen == "torch"
    both = decide([_r("triton", ms=0.8), _r("cuda", ms=0.5)])
    assert (both.impl, both.varlen) == ("cuda", "cuda") and "2.00x SDPA" in both.reason
    assert decide([_r("triton", ms=0.98)]).impl == "torch"  # 2% is noise, not a reason to leave SDPA
    packed = decide([_r("triton", passed=False, reason="r"), _r("torch_varlen", ms=0.5)])
    assert (packed.impl, packed.varlen) == ("torch", "torch_varlen")


def test_triton_kernel_passes_the_real_self_test_on_the_interpreter():
    pytest.importorskip("qwenvl_lab.kernels.triton_attention")
    padded, varlen, masks = selftest._triton()
    ok, errors, why = selftest.check(padded, varlen, masks, torch.device("cpu"), torch.float32, 16, cases=SMALL,
                                     varlen_case=("varlen_causal", 2, 1, [3, 7, 1]))
    assert ok, why
    assert set(errors) == {"causal_gqa", "padding_mask", "varlen_causal"} and max(errors.values()) < 1e-4


def test_a_wrong_kernel_fails_and_auto_picks_the_verified_one(monkeypatch, caplog):
    from qwenvl_lab.kernels.attention import eager_attention

    def wrong(q, k, v, causal, mask):  # ignores causality: right shape, wrong numbers
        return eager_attention(q, k, v, causal=False, attention_mask=mask)

    def right(q, k, v, causal, mask):
        return eager_attention(q, k, v, causal=causal, attention_mask=mask)

    monkeypatch.setattr(selftest, "candidates", lambda build, device=None: {"triton": lambda: (wrong, None, True),
                                                               "cuda": lambda: (right, None, False)})
    monkeypatch.setattr(selftest, "bench", lambda *a, **kw: (0.5, 1.0))  # the correct one is also "faster"
    monkeypatch.setattr(attn_mod, "_is_gpu", lambda t: True)
    calls = []
    monkeypatch.setattr(attn_mod, "_load_cuda", lambda: calls.append(1) or type("M", (), {
        "cuda_attention": staticmethod(lambda q, k, v, causal=False, scale=None: right(q, k, v, causal, None))}))
    monkeypatch.setattr(selftest, "CASES", SMALL)
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 16)
    with caplog.at_level(logging.INFO, logger="qwenvl_lab.kernels.attention"):
        prepare_attention(q.device, q.dtype, 16)  # the self-test, outside any forward
        attention(q, k, v, causal=True, impl="auto")
        attention(q, k, v, causal=True, impl="auto")
    choice = selftest.verify(q.device, q.dtype, 16)
    by_name = {r.name: r for r in choice.results}
    assert not by_name["triton"].passed and "errors above" in by_name["triton"].reason
    assert by_name["cuda"].passed and choice.impl == "cuda" and calls  # the verified, faster kernel ran
    msgs = [r.getMessage() for r in caplog.records if "impl=auto" in r.getMessage()]
    assert msgs == ["attention impl=auto -> cuda (cuda passed its self-test and is 2.00x SDPA)"]  # once


def test_selftest_can_be_switched_off(monkeypatch, caplog):
    monkeypatch.setenv(attn_mod.SELFTEST_ENV, "0")
    monkeypatch.setattr(attn_mod, "_is_gpu", lambda t: True)
    monkeypatch.setattr(selftest, "verify", lambda *a, **kw: pytest.fail("must not self-test"))
    q = torch.randn(1, 2, 5, 16)
    with caplog.at_level(logging.INFO, logger="qwenvl_lab.kernels.attention"):
        attention(q, q, q, causal=True, impl="auto")
    assert "QWENVL_ATTN_SELFTEST=0" in caplog.text


def test_packed_batches_follow_the_verified_varlen_path(monkeypatch):
    from qwenvl_lab.kernels.attention import eager_attention

    monkeypatch.setattr(attn_mod, "_is_gpu", lambda t: True)
    monkeypatch.setattr(selftest, "verify", lambda *a, **kw: Choice("torch", "torch_varlen", "test"))
    used = []

    def fake_varlen(q, k, v, cu, causal, scale=None):
        used.append(int(cu.numel()))
        return attn_mod._varlen_to_padded(eager_attention, q, k, v, cu, causal, scale)

    # The self-test verifies the very function attention() calls for packed batches.
    assert selftest._torch_varlen()[1] is attn_mod.torch_varlen_attention
    monkeypatch.setattr(attn_mod, "torch_varlen_attention", fake_varlen)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = torch.randn(8, 2, 16), torch.randn(8, 1, 16), torch.randn(8, 1, 16)
    prepare_attention(q.device, q.dtype, 16)
    out = attention(q, k, v, causal=True, cu_seqlens=cu, impl="auto")
    assert used == [3]
    torch.testing.assert_close(out, attention(q, k, v, causal=True, cu_seqlens=cu, impl="eager"), rtol=0, atol=1e-5)


def test_command_line_without_cuda_says_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert selftest.main([]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out


def test_format_choice_lists_every_kernel():
    choice = decide([_r("triton", ms=0.5), _r("cuda", available=False, passed=False, reason="unavailable: not built")])
    text = selftest.format_choice(choice, "cpu", torch.bfloat16, 128)
    assert "triton       PASS" in text and "cuda         n/a" in text and "auto -> triton" in text
