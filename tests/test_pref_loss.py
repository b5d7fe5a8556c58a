"""Preference losses (trainer/pref_loss.py) against trl 1.16's own code and the papers' formulas, on toy tensors.

trl's methods are called unbound on a small stand-in for the trainer object (only the attributes they read),
so what runs is trl's code: DPOTrainer._compute_loss (sigmoid, ipo, sft = the rpo_alpha term),
CPOTrainer.cpo_loss (sigmoid with label smoothing, simpo), ORPOTrainer.odds_ratio_loss (orpo).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from qwenvl_lab.trainer.pref_loss import LN2, preference_loss, reward_metrics

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

B, T = 3, 9


class _Acc:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _toy(seed: int = 0):
    """Per-token log-probs of a [chosen; rejected] batch, its completion mask, and the reference sums."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([3, 5, 2, 4, 6, 1])  # answer tokens of chosen 0..2 then rejected 0..2
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        mask[i, T - n:] = 1  # the answer ends each row; the first token is always prompt
    per_token = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 2  # [2B, T-1]
    per_token = per_token * mask[:, 1:]  # zero where no target
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 8
    return per_token, mask, lens, ref


def _trl_dpo(loss_types, weights, beta, per_token, mask, ref):
    out = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                          mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Acc(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=weights,
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    loss = trl_dpo.DPOTrainer._compute_loss(fake, lambda **kw: out, inputs, False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


def _ours(kind, per_token, lens, ref, **kw):
    logps = per_token.sum(1)
    ref_c, ref_r = (None, None) if ref is None else (ref[:B], ref[B:])
    return preference_loss(kind, logps[:B], logps[B:], lens[:B], lens[B:], ref_c, ref_r, **kw)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_equals_trl_dpo_and_paper(beta):
    per_token, mask, lens, ref = _toy()
    trl_loss, trl_metrics = _trl_dpo(["sigmoid"], [1.0], beta, per_token, mask, ref)
    ours = _ours("sigmoid", per_token, lens, ref, beta=beta)
    assert abs(ours.loss.item() - trl_loss.item()) < 1e-6
    metrics = reward_metrics(ours)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert abs(metrics[name] - trl_metrics[name]) < 1e-6, name
    logps = per_token.sum(1).tolist()
    paper = [-_logsig(beta * ((logps[i] - ref[i].item()) - (logps[B + i] - ref[B + i].item()))) for i in range(B)]
    assert abs(ours.loss.item() - sum(paper) / B) < 1e-6
    assert 0 < metrics["rewards/accuracies"] < 1  # the toy batch has pairs of both signs


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothed_sigmoid_equals_trl_cpo_and_paper(eps):
    """Conservative DPO: trl 1.16's DPOTrainer sigmoid has no smoothing; its CPOTrainer sigmoid computes the
    same smoothed loss of a difference, given the log-ratios in place of the log-probs."""
    per_token, _, lens, ref = _toy(1)
    beta = 0.2
    ours = _ours("sigmoid", per_token, lens, ref, beta=beta, label_smoothing=eps)
    ratio = per_token.sum(1) - ref
    fake = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=eps, accelerator=_Acc())
    trl_losses, _, _ = trl_cpo.CPOTrainer.cpo_loss(fake, ratio[:B], ratio[B:])
    assert abs(ours.loss.item() - trl_losses.mean().item()) < 1e-6
    d = (ratio[:B] - ratio[B:]).tolist()
    paper = [-(1 - eps) * _logsig(beta * x) - eps * _logsig(-beta * x) for x in d]
    assert abs(ours.loss.item() - sum(paper) / B) < 1e-6
    assert abs(ours.loss.item() - _ours("sigmoid", per_token, lens, ref, beta=beta).loss.item()) > 1e-3


def test_ipo_equals_trl_dpo_and_paper():
    per_token, mask, lens, ref = _toy(2)
    beta = 0.3
    trl_loss, _ = _trl_dpo(["ipo"], [1.0], beta, per_token, mask, ref)
    ours = _ours("ipo", per_token, lens, ref, beta=beta)
    assert abs(ours.loss.item() - trl_loss.item()) < 1e-6
    logps, n, r = per_token.sum(1).tolist(), lens.tolist(), ref.tolist()
    paper = [((logps[i] - r[i]) / n[i] - (logps[B + i] - r[B + i]) / n[B + i] - 1 / (2 * beta)) ** 2
             for i in range(B)]
    assert abs(ours.loss.item() - sum(paper) / B) < 1e-6


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_rpo_alpha_equals_trl_sft_term_and_paper(kind):
    per_token, mask, lens, ref = _toy(3)
    beta, alpha = 0.1, 0.7
    trl_loss, _ = _trl_dpo([kind, "sft"], [1.0, alpha], beta, per_token, mask, ref)
    ours = _ours(kind, per_token, lens, ref, beta=beta, rpo_alpha=alpha)
    plain = _ours(kind, per_token, lens, ref, beta=beta)
    assert abs(ours.loss.item() - trl_loss.item()) < 1e-6
    nll = -per_token[:B].sum().item() / lens[:B].sum().item()  # mean over every chosen answer token
    assert abs(ours.loss.item() - (plain.loss.item() + alpha * nll)) < 1e-6
    assert nll > 0.1


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_simpo_equals_trl_cpo_and_paper(eps):
    per_token, _, lens, _ = _toy(4)
    beta, gamma = 2.0, 0.8
    ours = _ours("simpo", per_token, lens, None, beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    avg = per_token.sum(1) / lens
    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=eps,
                           accelerator=_Acc())
    trl_losses, trl_c, trl_r = trl_cpo.CPOTrainer.cpo_loss(fake, avg[:B], avg[B:])
    assert abs(ours.loss.item() - trl_losses.mean().item()) < 1e-6
    assert torch.allclose(ours.chosen_rewards, trl_c, atol=1e-6) and torch.allclose(ours.rejected_rewards, trl_r, atol=1e-6)
    a = avg.tolist()
    paper = [-(1 - eps) * _logsig(beta * a[i] - beta * a[B + i] - gamma)
             - eps * _logsig(-(beta * a[i] - beta * a[B + i] - gamma)) for i in range(B)]
    assert abs(ours.loss.item() - sum(paper) / B) < 1e-6


def test_orpo_equals_trl_odds_ratio_and_paper():
    per_token, _, lens, _ = _toy(5)
    beta = 0.25
    ours = _ours("orpo", per_token, lens, None, beta=beta)
    avg = per_token.sum(1) / lens
    fake = SimpleNamespace(beta=beta, accelerator=_Acc())
    trl_or, trl_c, trl_r, _, _ = trl_orpo.ORPOTrainer.odds_ratio_loss(fake, avg[:B], avg[B:])
    nll = -per_token[:B].sum().item() / lens[:B].sum().item()
    assert abs(ours.loss.item() - (nll - trl_or.mean().item())) < 1e-6  # trl: loss = nll - losses.mean()
    assert torch.allclose(ours.chosen_rewards.float(), trl_c, atol=1e-6)  # trl computes ORPO in fp32
    a = avg.tolist()

    def log_odds(p):  # log(p / (1 - p)) with p = exp(average log-prob)
        return p - math.log(1 - math.exp(p))

    paper = nll - beta * sum(_logsig(log_odds(a[i]) - log_odds(a[B + i])) for i in range(B)) / B
    assert abs(ours.loss.item() - paper) < 1e-6


def test_dpo_at_policy_equal_reference_is_ln2_and_gradient_flows():
    logps = torch.tensor([-5.0, -9.0, -2.5], requires_grad=True)
    rej = torch.tensor([-4.0, -3.0, -7.5], requires_grad=True)
    counts = torch.tensor([4, 6, 2])
    out = preference_loss("sigmoid", logps, rej, counts, counts, logps.detach(), rej.detach(), beta=0.1)
    assert abs(out.loss.item() - LN2) < 1e-7
    out.loss.backward()
    assert torch.allclose(logps.grad, torch.full((3,), -0.1 * 0.5 / 3))  # d/dx -log sigmoid(beta x) at 0
    assert torch.allclose(rej.grad, torch.full((3,), 0.1 * 0.5 / 3))


def test_unknown_kind_and_missing_reference_are_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="valid: sigmoid"):
        preference_loss("kto", x, x, x, x, x, x)
    with pytest.raises(ValueError, match="needs the reference"):
        preference_loss("ipo", x, x, x, x)
