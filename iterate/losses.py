"""Losses as pure functions of rewards and log-probs. Each returns a per-example tensor.

Shapes: ``(B,)`` for sequence-level quantities; ``(B, T)`` for per-token ones with a
``mask (B, T)`` of response tokens. Every function has a hand-computed test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Reward-model loss ``-log sigmoid(r_chosen - r_rejected)``, shape (B,).

    Bradley & Terry (1952); InstructGPT (Ouyang et al. 2022) eq. 1.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def dpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO family losses on summed sequence log-probs, all of shape (B,).

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))

    - ``sigmoid``: DPO (Rafailov et al. 2023, eq. 7), ``-log sigmoid(beta h)``; with
      ``label_smoothing`` eps it is conservative DPO (cDPO):
      ``-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    - ``ipo``: IPO (Azar et al. 2023, eq. 17), ``(h - 1/(2 beta))^2``.
    - ``hinge``: SLiC-style hinge (Zhao et al. 2023), ``max(0, 1 - beta h)``.

    Returns (losses, chosen_rewards, rejected_rewards); the implicit rewards are
    ``beta * (log pi - log ref)``, detached.
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}: sigmoid | ipo | hinge")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per response token, shape (B,). Used by RAFT (SFT on
    the best of n) and as DPO's optional NLL term (RPO, Pang et al. 2024)."""
    return -(token_logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)
