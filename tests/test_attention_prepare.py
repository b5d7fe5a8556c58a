"""The attention implementation is resolved once, outside any forward: the GPU branch forced on the CPU.

A stand-in device check says every tensor is on a GPU and a stand-in self-test does what the real one does
first (a forward and a backward of its own); a training run with gradient checkpointing on and a generate
must resolve `auto` before the first step / decode and never run the self-test inside a (checkpointed)
forward, where its backward breaks non-reentrant checkpointing.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from qwenvl_lab.kernels import _log, selftest
from qwenvl_lab.kernels.prepare import prepare_attention

from tests.tiny_train import make_tiny_data, tiny_train_config

A = importlib.import_module("qwenvl_lab.kernels.attention")


@pytest.fixture
def forced_gpu(monkeypatch):
    """Every device counts as a GPU; the self-test is a stand-in that records its calls."""
    _log.reset()
    selftest.reset()
    calls = []

    def stand_in_verify(device, dtype, head_dim, build=False, **kw):
        key = A.verified_key(torch.device(device), dtype, head_dim)
        if key in selftest._CHOICES:  # as the real one: once per (device, dtype, head dim) and process
            return selftest._CHOICES[key]
        x = torch.randn(8, 8, requires_grad=True)
        torch.autograd.grad((x * x).sum(), x)  # the real self-test's first move: its own backward
        calls.append((str(device), dtype, int(head_dim), torch.is_grad_enabled()))
        choice = selftest._CHOICES[key] = selftest.Choice("torch", "torch", "stand-in self-test")
        return choice

    monkeypatch.setattr(A, "_is_gpu", lambda x: True)
    monkeypatch.setattr(selftest, "verify", stand_in_verify)
    monkeypatch.delenv(A.SELFTEST_ENV, raising=False)
    default = torch.get_default_device()
    torch.set_default_device("cpu")  # the CPU, also under the GPU check's QWENVL_TEST_DEVICE=cuda
    try:
        yield calls
    finally:
        torch.set_default_device(default)
        selftest.reset()
        _log.reset()


def test_training_with_checkpointing_and_generate_resolve_auto_before_any_forward(forced_gpu, tmp_path, capfd):
    from qwenvl_lab.trainer.run import train

    data = make_tiny_data(tmp_path / "data")
    cfg = tiny_train_config(tmp_path, data, gradient_checkpointing=True, max_steps=2)
    result = train(cfg)  # raised CheckpointError at the first step when auto self-tested inside the forward
    cap = capfd.readouterr()
    text = cap.out + cap.err  # the run's log handler prints
    assert forced_gpu, "the self-test never ran: auto was not resolved"
    assert {c[1] for c in forced_gpu} == {torch.float32} and len(forced_gpu) == 1  # once per device/dtype/dim
    assert text.count("attention impl=auto -> torch (stand-in self-test)") == 1, text[-3000:]
    assert "attention before the first step" in text
    assert "no kernel was self-tested" not in text  # no forward met an unresolved auto

    vlm = result.model.eval()
    vlm.gradient_checkpointing_enable()
    forced_gpu.clear()
    selftest.reset()
    img = torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()
    from PIL import Image

    answer = vlm.chat([Image.fromarray(img)], [{"role": "user", "content": "What colour is the shape?"}],
                      max_new_tokens=3)
    assert isinstance(answer, str)
    assert len(forced_gpu) == 1 and forced_gpu[0][3] is True  # resolved before decoding, with grad on


def test_an_unresolved_auto_in_a_forward_uses_sdpa_and_never_self_tests(forced_gpu, caplog):
    q = torch.randn(1, 2, 5, 16)
    with caplog.at_level(logging.INFO, logger="qwenvl_lab.kernels.attention"):
        out = A.attention(q, q, q, causal=True, impl="auto")
    assert forced_gpu == []
    torch.testing.assert_close(out, A.eager_attention(q, q, q, causal=True), rtol=0, atol=1e-5)
    assert "no kernel was self-tested for cpu / float32 / head dim 16" in caplog.text
    assert prepare_attention(q.device, q.dtype, 16) == "torch" and len(forced_gpu) == 1
    assert prepare_attention(q.device, q.dtype, 16) == "torch" and len(forced_gpu) == 1  # kept


def test_checkpointed_forward_with_the_self_test_inside_breaks_as_the_gpu_would(forced_gpu):
    """Why the resolution must sit outside: the stand-in self-test inside a non-reentrant checkpointed
    region fails the backward (what the first GPU step with gradient checkpointing used to hit)."""
    w = torch.randn(8, 8, requires_grad=True)

    def region(x):
        selftest.verify(torch.device("cpu"), torch.float32, 16)  # cached: the recompute does not run it
        return (x @ w).tanh()

    x = torch.randn(2, 8)
    out = torch.utils.checkpoint.checkpoint(region, x, use_reentrant=False)
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different number of tensors"):
        out.sum().backward()
