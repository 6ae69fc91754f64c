"""Losses and the quantities the update rules build them from, as pure functions of
rewards, log-probs and values. Every function has a hand-computed test.

Shapes: ``(B,)`` for sequence-level quantities, ``(B, T)`` for per-token ones with a
``mask (B, T)`` of response tokens. The losses return one value per example ``(B,)``
(``dpo`` also the implicit rewards of chosen and rejected); ``kl_penalty``,
``shaped_rewards``, ``gae``, ``kl_to_go`` and ``remax_weights`` per-token ``(B, T)``
tensors; ``whiten`` a list of 1-D tensors; ``adaptive_kl_coef`` a float.
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
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
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


# ---- on-policy RL (PPO, ReMax) -------------------------------------------------------------


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate on sampled tokens, shape (B, T).

    ``k1 = log p - log q``; ``k3 = (q/p - 1) - log(q/p)`` (Schulman 2020), always >= 0.
    """
    log_ratio = ref_logps - logps
    if kind == "k1":
        return -log_ratio
    if kind == "k3":
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}: k1 | k3")


def shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards (B, T): ``-kl_coef * kl_t`` on every response token, plus the
    sequence score on the last one (Ziegler et al. 2019; InstructGPT eq. 2)."""
    rewards = -kl_coef * kl * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    return rewards + last * scores[:, None]


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` (V after the last token is 0);
    ``A_t = delta_t + gamma lam A_{t+1}``. Returns (advantages, returns = A + V), (B, T),
    zero outside ``mask``.
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, a, next_adv)
    return adv, (adv + values) * mask


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def batch_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums scaled so that their mean is the mean over all the batch's tokens,
    shape (B,). Unlike a per-sequence mean, every token weighs the same: dividing each
    sequence by its own length would turn a policy-gradient advantage A into A / length, a
    systematic pull towards long responses whenever advantages are mostly negative (as
    ReMax's are when greedy beats sampling)."""
    return (x * mask).sum(-1) * x.shape[0] / mask.sum().clamp(min=1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Per-token losses to per-sequence ones (B,) whose mean is the batch loss:
    ``token_mean`` (``batch_token_mean``) or ``sequence_mean`` (each sequence's own mean)."""
    if how == "token_mean":
        return batch_token_mean(per_token, mask)
    if how == "sequence_mean":
        return _masked_mean(per_token, mask)
    raise ValueError(f"unknown loss aggregation {how!r}")


def ppo_policy_loss(
    logps, old_logps, advantages, mask, clip: float, agg: str = "token_mean"
) -> torch.Tensor:
    """Clipped surrogate (Schulman et al. 2017, eq. 7), per token, then ``aggregate`` (B,):
    ``max(-A r, -A clip(r, 1-eps, 1+eps))`` with ``r = exp(logp - old_logp)``."""
    ratio = (logps - old_logps).exp()
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    return aggregate(per_token, mask, agg)


def value_loss(
    values, old_values, returns, mask, clip: float, agg: str = "token_mean"
) -> torch.Tensor:
    """Clipped value loss, ``0.5 max((V - R)^2, (clip(V, V_old +- eps) - R)^2)`` per token, then
    ``aggregate`` (B,)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return aggregate(per_token, mask, agg)


def remax_advantage(
    sample_rewards: torch.Tensor, greedy_rewards: torch.Tensor, clip: float
) -> torch.Tensor:
    """ReMax (Li et al. 2023, Algorithm 1): the greedy response's reward is the baseline;
    rewards are clipped to [-clip, clip] first. Shape (B,)."""
    return sample_rewards.clamp(-clip, clip) - greedy_rewards.clamp(-clip, clip)


def kl_to_go(kl: torch.Tensor) -> torch.Tensor:
    """Per-token KL summed from each token to the end of its response (ReMax's return-to-go
    of the KL penalty): ``out[:, t] = sum_{t' >= t} kl[:, t']``. (B, T) -> (B, T)."""
    return kl.flip(-1).cumsum(-1).flip(-1)


def remax_weights(
    adv: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor
) -> torch.Tensor:
    """ReMax's per-token weight of a response's log-prob: its advantage (B,) less
    ``kl_coef`` times the KL still to come from that token on (``kl_to_go``). (B, T)."""
    return (adv[:, None] - kl_coef * kl_to_go(kl)) * mask


def whiten(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-token values of a whole step (1-D tensors, one per example) shifted and scaled
    to mean 0 and standard deviation 1 over all the step's tokens together."""
    flat = torch.cat(values)
    mean, std = flat.mean(), flat.std(unbiased=False)
    return [(v - mean) / (std + 1e-8) for v in values]


def adaptive_kl_coef(coef: float, kl: float, target: float, n_steps: int, horizon: float) -> float:
    """Ziegler et al. 2019, section 2.2: the KL coefficient after a batch of ``n_steps``
    rollouts whose mean KL was ``kl``: ``coef * (1 + e * n_steps / horizon)`` with the
    proportional error ``e = clip(kl / target - 1, -0.2, 0.2)``."""
    err = max(-0.2, min(0.2, kl / target - 1))
    return coef * (1 + err * n_steps / horizon)
