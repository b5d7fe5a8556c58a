"""Supervised-only, chunked loss: same loss and gradients as the full-logits path (qwen and hf LMs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from qwenvl_lab.core.loss import shift_targets, supervised_loss
from qwenvl_lab.dataset import Collator

from tests.tiny_opt import assert_same_grads, grads, sample_items, tiny_vlm


def _run(vlm, batch, **kw):
    vlm.zero_grad(set_to_none=True)
    out = vlm(**batch, **kw)
    out.loss.backward()
    return out, grads(vlm)


@pytest.mark.parametrize("backend", ["qwen", "hf"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_sparse_loss_and_grads_equal_full_logits(tmp_path, monkeypatch, backend, tied, fused):
    import qwenvl_lab.core.loss as loss_module

    monkeypatch.setattr(loss_module, "FUSED", fused)
    vlm = tiny_vlm(tmp_path, backend=backend, tied=tied)
    vlm.train()
    # Small chunks, so several chunks (and a ragged last one) run.
    vlm.loss_chunk_size = 5  # the VLM computes the loss for every LM backbone
    batch = Collator(pad_id=0)(sample_items(vlm, [1, 0, 2]))
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert n_targets > 10  # more than two chunks

    rows_seen = []
    hook = vlm.lm.get_output_embeddings().register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape))
    sparse, g_sparse = _run(vlm, batch)
    hook.remove()
    # Checkpointed path: the head only ever saw chunks of <= 5 target rows (forward + recompute in
    # backward), never [B, T]. Fused path: the module is never called (its weight is used chunk by chunk).
    if fused:
        assert rows_seen == []
    else:
        assert rows_seen and all(s[0] <= 5 and len(s) == 2 for s in rows_seen), rows_seen

    full, g_full = _run(vlm, batch, return_logits=True)
    torch.testing.assert_close(sparse.loss, full.loss, rtol=0, atol=1e-5)
    assert_same_grads(g_sparse, g_full)
    assert any("lm_head" in n or "embed" in n or "wte" in n for n in g_sparse)

    # First principles: mean of -log p(label t+1 | prefix t) over target positions.
    logits = full.logits.detach()
    logp = logits[:, :-1].float().log_softmax(-1)
    tgt = batch["labels"][:, 1:]
    keep = tgt != -100
    manual = -logp[keep].gather(-1, tgt[keep][:, None]).mean()
    torch.testing.assert_close(sparse.loss.detach(), manual, rtol=0, atol=1e-5)
    # Lazy logits: reading them after the fact gives the full-path logits.
    torch.testing.assert_close(sparse.logits.detach(), logits, rtol=0, atol=1e-5)


def test_supervised_loss_matches_cross_entropy_with_packed_boundaries():
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(8, 17, bias=True)
    hidden = torch.randn(1, 12, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 17, (1, 12), generator=g)
    labels[0, [0, 4, 7]] = -100
    cu = torch.tensor([0, 5, 9, 12], dtype=torch.int32)
    loss = supervised_loss(hidden, head, labels, cu_seqlens=cu, chunk_size=2)
    loss.backward()
    g_sparse = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = None
    head.zero_grad()
    # Independent reference: per packed sequence, position t predicts t+1 inside the sequence only.
    logits = head(hidden)[0]
    terms = []
    for a, b in [(0, 5), (5, 9), (9, 12)]:
        for t in range(a, b - 1):
            if labels[0, t + 1] != -100:
                terms.append(F.cross_entropy(logits[t][None], labels[0, t + 1][None]))
    ref = torch.stack(terms).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6)
    for a, b in zip(g_sparse, (hidden.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # The boundary targets (label of the next sequence's first token) are dropped by the one shift.
    t = shift_targets(labels, cu)
    assert t[0, 4] == -100 and t[0, 8] == -100 and labels[0, 9] != -100


def test_no_target_gives_connected_zero():
    head = torch.nn.Linear(4, 9)
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    loss = supervised_loss(hidden, head, torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert head.weight.grad is not None and hidden.grad is not None


def _head_case(seed: int, frozen_head: bool):
    """A 23-row linear head (frozen or training), hidden states `[3, 9, 6]` and labels with ignored positions."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(6, 23, bias=True)
    head.requires_grad_(not frozen_head)
    hidden = torch.randn(3, 9, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 23, (3, 9), generator=g)
    labels[labels % 3 == 0] = -100
    return head, hidden, labels


def _head_calls(head, fn):
    """fn()'s result and the row counts of each call of the head module during it."""
    calls = []
    hook = head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        return fn(), calls
    finally:
        hook.remove()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_both_gradient_paths_match_plain_cross_entropy(monkeypatch, fused, frozen_head):
    """The fused nn.Linear path and the checkpointed path (any other head) against F.cross_entropy."""
    import qwenvl_lab.core.loss as loss_module

    monkeypatch.setattr(loss_module, "FUSED", fused)
    head, hidden, labels = _head_case(7, frozen_head)
    loss, calls = _head_calls(head, lambda: supervised_loss(hidden, head, labels, chunk_size=4))
    assert calls == ([] if fused else [4] * (len(calls) - 1) + calls[-1:]) and (fused or max(calls) <= 4)
    loss.backward()
    got = [hidden.grad.clone()] + ([] if frozen_head else [head.weight.grad.clone(), head.bias.grad.clone()])
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    logits = head(hidden)[:, :-1]
    tgt = labels[:, 1:]
    ref = F.cross_entropy(logits.reshape(-1, 23), tgt.reshape(-1), ignore_index=-100)
    ref.backward()
    want = [hidden.grad] + ([] if frozen_head else [head.weight.grad, head.bias.grad])
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if frozen_head:
        assert head.weight.grad is None or not head.weight.requires_grad


@pytest.mark.parametrize("frozen_head", [False, True])
def test_fused_head_under_bf16_autocast_matches_autocast_cross_entropy(frozen_head):
    """Under CPU bf16 autocast (fp32 weights, bf16 logits) the fused head's loss equals cross-entropy on the
    same bf16 logits upcast, and its gradients (made in bf16 straight from the fp32 softmax) match autograd's
    over several chunks (the first chunk makes the weight gradient, the later ones add to it)."""
    head, hidden, labels = _head_case(11, frozen_head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = supervised_loss(hidden, head, labels, chunk_size=4)
    loss.backward()
    got = [hidden.grad.clone()] + ([] if frozen_head else [head.weight.grad.clone(), head.bias.grad.clone()])
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(hidden)[:, :-1]
        assert logits.dtype == torch.bfloat16
        ref = F.cross_entropy(logits.float().reshape(-1, 23), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    want = [hidden.grad] + ([] if frozen_head else [head.weight.grad, head.bias.grad])
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6)  # the same bf16 logits, the same fp32 softmax
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)  # bf16 matmuls, rounded in another order


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_sequence_logps_paths_match_log_softmax_gather(monkeypatch, fused, frozen_head):
    """Per-sequence log-probs through a frozen nn.Linear head (per-row gradients made in forward, no [c, V]
    kept), a training head and any other head (checkpointed chunks), against log_softmax + gather."""
    import qwenvl_lab.core.loss as loss_module

    monkeypatch.setattr(loss_module, "FUSED", fused)
    head, hidden, labels = _head_case(3, frozen_head)
    weights = torch.tensor([0.5, -2.0, 1.5])  # a different upstream gradient per sequence
    (logps, counts), calls = _head_calls(head, lambda: loss_module.sequence_logps(hidden, head, labels, chunk_size=4))
    if fused and frozen_head:
        assert calls == []  # the weight is used directly, chunk by chunk
    else:
        assert calls and max(calls) <= 4  # the head module, per chunk (recomputed in backward)
    (logps * weights).sum().backward()
    got = [logps.detach(), hidden.grad.clone()] + ([] if frozen_head else [head.weight.grad.clone()])
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    tgt = labels[:, 1:]
    keep = tgt != -100
    tok = torch.log_softmax(head(hidden)[:, :-1], -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * keep
    ref = tok.sum(1)
    (ref * weights).sum().backward()
    want = [ref.detach(), hidden.grad] + ([] if frozen_head else [head.weight.grad])
    assert counts.tolist() == keep.sum(1).tolist()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with torch.no_grad():  # the reference pass: no gradient anywhere, the same values
        torch.testing.assert_close(loss_module.sequence_logps(hidden, head, labels, chunk_size=2)[0], ref.detach(),
                                   rtol=0, atol=1e-5)
