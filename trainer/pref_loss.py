"""Preference losses over per-sequence log-probabilities: DPO (sigmoid, with label smoothing), IPO, the
`rpo_alpha` NLL term, SimPO and ORPO. Pure tensor functions; nothing here runs a model.

Contract
--------
Inputs are per pair (`[B]` each): the policy's summed log-probabilities of the chosen and rejected answers
(`chosen_logps`, `rejected_logps`, fp32), their answer token counts (`chosen_counts`, `rejected_counts`) and,
for the reference-based losses, the reference's summed log-probabilities (`ref_chosen`, `ref_rejected`).
`preference_loss(kind, ...) -> PrefLoss(loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)`
returns the batch loss (a scalar) and the per-pair quantities trl logs under `rewards/*` and `logps/*`.

With `delta = (chosen_logps - ref_chosen) - (rejected_logps - ref_rejected)` and `avg_x = logps_x / count_x`:
* `sigmoid` (DPO, Rafailov et al. 2023; conservative DPO for `label_smoothing` e > 0):
  `-(1 - e) log sigmoid(beta delta) - e log sigmoid(-beta delta)`; at step 0 (policy == reference) it is ln 2.
* `ipo` (Azar et al. 2023, eq. 17, with trl's per-token normalisation of each log-ratio):
  `(delta_avg - 1 / (2 beta))^2`, `delta_avg = (chosen_logps - ref_chosen) / n_c - (rejected_logps - ref_rejected) / n_r`.
* `rpo_alpha` (Pang et al. 2024) adds `rpo_alpha * NLL` to `sigmoid` / `ipo` / `simpo`, NLL being the mean
  negative log-likelihood per chosen answer token over the batch (trl 1.16's `sft` term).
* `simpo` (Meng et al. 2024, reference-free): `-(1 - e) log sigmoid(beta (avg_c - avg_r) - gamma)
  - e log sigmoid(-(beta (avg_c - avg_r) - gamma))` (trl's CPOTrainer `simpo`).
* `orpo` (Hong et al. 2024, reference-free): `NLL - beta * mean log sigmoid(log_odds)`,
  `log_odds = (avg_c - avg_r) - (log(1 - exp(avg_c)) - log(1 - exp(avg_r)))`, beta being the paper's lambda.
Rewards: `beta * (logps - ref)` for sigmoid / ipo (trl's DPOTrainer); `beta * avg` for simpo / orpo (trl's CPO /
ORPO trainers), and `logps/*` are the sums (sigmoid / ipo) or the per-token averages (simpo / orpo) the loss used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KINDS = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
LN2 = math.log(2.0)


@dataclass
class PrefLoss:
    loss: torch.Tensor  # scalar
    chosen_rewards: torch.Tensor  # [B], detached
    rejected_rewards: torch.Tensor  # [B], detached
    chosen_logps: torch.Tensor  # [B], detached: what the loss compared (sums or per-token averages)
    rejected_logps: torch.Tensor  # [B]


def smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """[B] logits -> [B] `-(1 - e) log sigmoid(x) - e log sigmoid(-x)` (e = probability the label is flipped)."""
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_sigmoid(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """[B] log-ratio differences -> [B] DPO losses."""
    return smoothed_sigmoid_loss(beta * delta, label_smoothing)


def ipo(delta_avg: torch.Tensor, beta: float) -> torch.Tensor:
    """[B] per-token log-ratio differences -> [B] IPO losses (beta is the paper's tau)."""
    return (delta_avg - 1.0 / (2.0 * beta)) ** 2


def simpo(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float, gamma: float,
          label_smoothing: float = 0.0) -> torch.Tensor:
    """[B] per-token average log-probs -> [B] SimPO losses (target reward margin `gamma`)."""
    return smoothed_sigmoid_loss(beta * (avg_chosen - avg_rejected) - gamma, label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (two branches split at -ln 2)."""
    return torch.where(x < -LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor) -> torch.Tensor:
    """[B] per-token average log-probs -> [B] log odds ratio of chosen over rejected."""
    return (avg_chosen - avg_rejected) - (log1mexp(avg_chosen) - log1mexp(avg_rejected))


def chosen_nll(chosen_logps: torch.Tensor, chosen_counts: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per chosen answer token over the batch (a scalar)."""
    return -chosen_logps.sum() / chosen_counts.sum().clamp(min=1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # fp64 stays fp64 (parity tests)


def _check(kind: str, ref_chosen, ref_rejected) -> None:
    if kind not in KINDS:
        raise ValueError(f"preference loss {kind!r}; valid: {', '.join(KINDS)}")
    if kind not in REFERENCE_FREE and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"preference loss {kind!r} needs the reference log-probabilities")


def preference_loss(
    kind: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_counts: torch.Tensor,
    rejected_counts: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    rpo_alpha: float = 0.0,
    simpo_gamma: float = 0.5,
) -> PrefLoss:
    """The batch loss and logged quantities for `kind` (see the module docstring); all `[B]` inputs."""
    _check(kind, ref_chosen, ref_rejected)
    chosen_logps, rejected_logps = _at_least_fp32(chosen_logps), _at_least_fp32(rejected_logps)
    n_c = chosen_counts.to(chosen_logps).clamp(min=1)  # [B]
    n_r = rejected_counts.to(chosen_logps).clamp(min=1)
    if kind in REFERENCE_FREE:
        avg_c, avg_r = chosen_logps / n_c, rejected_logps / n_r  # [B]
        if kind == "simpo":
            loss = simpo(avg_c, avg_r, beta, simpo_gamma, label_smoothing).mean()
            loss = loss + rpo_alpha * chosen_nll(chosen_logps, n_c) if rpo_alpha else loss
        else:
            loss = chosen_nll(chosen_logps, n_c) - beta * F.logsigmoid(orpo_log_odds(avg_c, avg_r)).mean()
        return PrefLoss(loss, beta * avg_c.detach(), beta * avg_r.detach(), avg_c.detach(), avg_r.detach())
    ratio_c = chosen_logps - ref_chosen.to(chosen_logps)  # [B]
    ratio_r = rejected_logps - ref_rejected.to(chosen_logps)
    if kind == "sigmoid":
        loss = dpo_sigmoid(ratio_c - ratio_r, beta, label_smoothing).mean()
    else:
        loss = ipo(ratio_c / n_c - ratio_r / n_r, beta).mean()
    if rpo_alpha:
        loss = loss + rpo_alpha * chosen_nll(chosen_logps, n_c)
    return PrefLoss(loss, beta * ratio_c.detach(), beta * ratio_r.detach(),
                    chosen_logps.detach(), rejected_logps.detach())


def reward_metrics(out: PrefLoss) -> dict[str, float]:
    """trl's metric names, means over the batch's pairs."""
    margins = out.chosen_rewards - out.rejected_rewards
    return {
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
        "rewards/margins": margins.mean().item(),
        "logps/chosen": out.chosen_logps.mean().item(),
        "logps/rejected": out.rejected_logps.mean().item(),
    }
