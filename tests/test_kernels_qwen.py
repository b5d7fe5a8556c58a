"""A tiny Qwen model gives the same logits (and gradients) with attn_impl="triton" as with "torch"."""

import pytest
import torch

triton_attention = pytest.importorskip("qwenvl_lab.kernels.triton_attention")
tiny_qwen = pytest.importorskip("tests.tiny_qwen")
qwen = pytest.importorskip("qwenvl_lab.qwen")


def _pair(arch: str):
    """Two models with identical weights, one per attention implementation."""
    cfg_t = tiny_qwen.tiny_qwen_config(arch, attn_impl="torch")
    cfg_k = tiny_qwen.tiny_qwen_config(arch, attn_impl="triton")
    m_t = qwen.QWenLMHeadModel(cfg_t).eval()
    with torch.no_grad():  # non-trivial weights so attention differences would show up
        for p in m_t.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m_k = qwen.QWenLMHeadModel(cfg_k).eval()
    m_k.load_state_dict(m_t.state_dict())
    return m_t, m_k


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts calls reaching the Triton kernels, so a silent fallback to SDPA cannot pass."""
    calls = []
    for name in ("triton_attention", "triton_varlen_attention"):
        fn = getattr(triton_attention, name)
        monkeypatch.setattr(triton_attention, name, lambda *a, _fn=fn, **kw: calls.append(1) or _fn(*a, **kw))
    return calls


@pytest.mark.parametrize("arch", ["qwen1", "qwen2"])
def test_logits_and_grads_match(arch, triton_calls):
    m_t, m_k = _pair(arch)
    ids = torch.randint(0, m_t.config.vocab_size, (2, 19))
    out_t = m_t(input_ids=ids, labels=ids)
    out_k = m_k(input_ids=ids, labels=ids)
    assert out_t.logits.shape == (2, 19, m_t.config.vocab_size)
    torch.testing.assert_close(out_k.logits, out_t.logits, rtol=0, atol=1e-4)
    assert len(triton_calls) == m_k.config.num_hidden_layers
    out_t.loss.backward()
    out_k.loss.backward()
    grads_t = dict(m_t.named_parameters())
    for name, p in m_k.named_parameters():
        torch.testing.assert_close(p.grad, grads_t[name].grad, rtol=0, atol=1e-4, msg=name)


def test_left_padded_batch_matches(triton_calls):
    m_t, m_k = _pair("qwen1")
    ids = torch.randint(0, m_t.config.vocab_size, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :5] = 0  # left padding on the second row
    lt = m_t(input_ids=ids, attention_mask=mask).logits
    lk = m_k(input_ids=ids, attention_mask=mask).logits
    # Padding positions are meaningless; compare the real tokens.
    torch.testing.assert_close(lk[0], lt[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(lk[1, 5:], lt[1, 5:], rtol=0, atol=1e-4)
    assert triton_calls


def test_packed_sequences_match(triton_calls):
    m_t, m_k = _pair("qwen2")
    cu = torch.tensor([0, 6, 17, 20], dtype=torch.int32)
    ids = torch.randint(0, m_t.config.vocab_size, (1, 20))
    lt = m_t(input_ids=ids, cu_seqlens=cu).logits
    lk = m_k(input_ids=ids, cu_seqlens=cu).logits
    torch.testing.assert_close(lk, lt, rtol=0, atol=1e-4)
    assert triton_calls
    # Packing really isolates sequences: the middle one alone gives the same logits.
    alone = m_t(input_ids=ids[:, 6:17]).logits
    torch.testing.assert_close(lt[:, 6:17], alone, rtol=0, atol=1e-4)


def test_kv_cache_decode_matches(triton_calls):
    m_t, m_k = _pair("qwen2")
    ids = torch.randint(0, m_t.config.vocab_size, (1, 12))
    logits = []
    for m in (m_t, m_k):
        first = m(input_ids=ids[:, :9], use_cache=True)
        # A 3-token chunk on top of the cache: causal with Tq < Tk (bottom-right aligned).
        logits.append(m(input_ids=ids[:, 9:], past_key_values=first.past_key_values, use_cache=True).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)
    assert triton_calls
