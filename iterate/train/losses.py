"""Losses and the quantities the update rules build them from, as pure functions of
rewards, log-probs and values. Every function has a hand-computed test.

Shapes: ``(B,)`` for sequence-level quantities, ``(B, T)`` for per-token ones with a
``mask (B, T)`` of response tokens. The losses return one value per example ``(B,)``
(``dpo`` also the implicit rewards of chosen and rejected); ``kl_penalty``,
``shaped_rewards``, ``gae``, ``kl_to_go``, ``remax_weights``, ``clipped_surrogate``,
``returns_to_go``, ``masked_whiten``, ``reinforce_pp_advantages`` and ``rollout_weights``
per-token ``(B, T)`` tensors; ``group_advantages`` and ``rloo_advantages`` ``(G, n)`` for G
groups of n samples; ``whiten`` a list of 1-D tensors; ``adaptive_kl_coef`` a float.
"""

from __future__ import annotations

import math

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
    - ``ipo``: IPO (Azar et al. 2023, eq. 17), ``(h - 1/(2 beta))^2``, on the log-probs as
      given: summed over the response's tokens here (the pair rules' ``logps``), as the
      paper's sequence log-likelihoods; TRL averages them over tokens instead, which makes
      ``h`` (and the fitting ``beta``) smaller by about the response length.
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


def batch_token_mean(
    x: torch.Tensor, mask: torch.Tensor, mean_tokens: float | None = None
) -> torch.Tensor:
    """Per-sequence sums over ``mean_tokens``, the mean response length of the whole batch
    (default: of these B sequences), shape (B,): their mean is the mean over all the batch's
    tokens. Unlike a per-sequence mean, every token weighs the same: dividing each sequence
    by its own length would turn a policy-gradient advantage A into A / length, a systematic
    pull towards long responses whenever advantages are mostly negative (as ReMax's are when
    greedy beats sampling). A batch split into micro-batches passes the whole batch's mean
    length, so that every token of it weighs the same, however it is split."""
    if mean_tokens is None:
        mean_tokens = mask.sum().clamp(min=1) / x.shape[0]
    return (x * mask).sum(-1) / mean_tokens


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    how: str,
    norm: float | None = None,
    mean_tokens: float | None = None,
) -> torch.Tensor:
    """Per-token losses to per-sequence ones (B,) whose mean is the batch loss:
    ``token_mean`` (``batch_token_mean``: every token of the batch weighs the same, DAPO;
    ``mean_tokens``: the whole batch's mean response length when these are a micro-batch of
    it), ``sequence_mean`` (each sequence's own mean, then the mean: the original GRPO) or
    ``token_sum_norm`` (each sequence's sum over a constant ``norm``, such as the most
    tokens a response may have: Dr. GRPO, no length in any denominator)."""
    if how == "token_mean":
        return batch_token_mean(per_token, mask, mean_tokens)
    if how == "sequence_mean":
        return _masked_mean(per_token, mask)
    if how == "token_sum_norm":
        if not norm:
            raise ValueError("token_sum_norm needs its constant norm (the most response tokens)")
        return (per_token * mask).sum(-1) / norm
    raise ValueError(
        f"unknown loss aggregation {how!r}: token_mean | sequence_mean | token_sum_norm"
    )


def clipped_surrogate(
    logps, old_logps, advantages, clip_low: float, clip_high: float
) -> torch.Tensor:
    """The clipped ratio objective per token (B, T), as a loss:
    ``max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``, ``r = exp(logp - old_logp)``;
    ``advantages`` per token (B, T) or per sequence (B,). Equal ranges are PPO's
    (Schulman et al. 2017, eq. 7); a wider upper one is DAPO's clip-higher (Yu et al. 2025),
    which leaves more room to raise unlikely tokens."""
    adv = advantages if advantages.dim() == logps.dim() else advantages[:, None]
    ratio = (logps - old_logps).exp()
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    weights: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """The group rules' loss per token (B, T), for ``aggregate``: the clipped objective
    (``clipped_surrogate``) times the rollout correction's ``weights`` (``rollout_weights``),
    plus ``kl_coef`` times ``kl``, the per-token KL to the reference (GRPO's k3 in the loss,
    ``kl_penalty``; none needed when the coefficient is 0). All (B, T) but ``advantages``
    (per token or per sequence)."""
    per_token = clipped_surrogate(logps, old_logps, advantages, clip_low, clip_high)
    if weights is not None:
        per_token = per_token * weights
    if kl_coef:
        per_token = per_token + kl_coef * kl
    return per_token


# ---- group rules (GRPO, RLOO, REINFORCE++) ------------------------------------------------


def group_advantages(rewards: torch.Tensor, scale: str, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024): each reward less its group's mean, for rewards
    (G, n) of G groups of n samples of one prompt, scaled by the group's standard deviation
    (``group``: the original), the whole batch's (``batch``: less noise from small groups),
    or not at all (``none``: Dr. GRPO, Liu et al. 2025, whose point is that dividing by a
    group's std favours the prompts that are too easy or too hard). Standard deviations are
    unbiased (n - 1), as TRL's and verl's are; ``eps`` keeps a group of equal rewards at 0.
    (G, n)."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if scale == "group":
        return centred / (rewards.std(-1, keepdim=True) + eps)
    if scale == "batch":
        return centred / (rewards.std() + eps)
    if scale == "none":
        return centred
    raise ValueError(f"unknown advantage scaling {scale!r}: group | batch | none")


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO's advantages (Ahmadian et al. 2024): each reward less the mean of the other
    n - 1 rewards of its group, for rewards (G, n) (n >= 2). (G, n)."""
    n = rewards.shape[-1]
    if n < 2:
        raise ValueError("RLOO needs at least two samples per prompt")
    others = (rewards.sum(-1, keepdim=True) - rewards) / (n - 1)
    return rewards - others


def returns_to_go(per_token: torch.Tensor) -> torch.Tensor:
    """Undiscounted returns: ``out[:, t] = sum_{t' >= t} x[:, t']``. (B, T)."""
    return per_token.flip(-1).cumsum(-1).flip(-1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``x`` shifted and scaled to mean 0 and standard deviation 1 over the masked tokens of
    the whole batch (the variance over tokens, not unbiased); 0 outside ``mask``. (B, T)."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def reinforce_pp_advantages(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): per-token rewards, the KL penalty on every token and the
    score on the last (``shaped_rewards``), summed to the end (``returns_to_go``), whitened
    over the batch's tokens (``masked_whiten``): no critic, no group baseline. (B, T)."""
    return masked_whiten(returns_to_go(shaped_rewards(scores, kl, mask, kl_coef)), mask)


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO's soft over-length punishment (Yu et al. 2025, eq. 13), per response (B,): 0 up
    to ``max_tokens - buffer`` tokens, then falling linearly to -1 at ``max_tokens``, -1
    beyond (a response cut at ``max_tokens``, which a sampler stops, gets -1)."""
    start = max_tokens - buffer
    return ((start - lengths.to(torch.float64)) / buffer).clamp(-1.0, 0.0)


# ---- the sampler/trainer mismatch ----------------------------------------------------------


def rollout_weights(
    trainer_logps: torch.Tensor,
    sampler_logps: torch.Tensor,
    mask: torch.Tensor,
    how: str,
    cap: float,
) -> torch.Tensor:
    """Per-token weights (B, T) correcting for sampling with other numerics than the
    trainer's (vLLM's kernels, precision): ``tis``, truncated importance sampling, the
    ratio ``pi_trainer / pi_sampler`` of each sampled token capped at ``cap`` (Yao et al.
    2025); ``mask``, 1 where that ratio is within ``cap`` and its inverse, else 0; ``none``,
    1. Constants (no gradient); 0 outside ``mask``."""
    if how == "none":
        return mask.clone()
    ratio = (trainer_logps - sampler_logps).detach().exp()
    if how == "tis":
        return ratio.clamp(max=cap) * mask
    if how == "mask":
        return ((ratio <= cap) & (ratio >= 1 / cap)).to(mask.dtype) * mask
    raise ValueError(f"unknown rollout correction {how!r}: none | tis | mask")


def mismatch(
    trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[float, float, float]:
    """How far the sampler's log-probs of its own tokens are from the trainer's, over the
    masked tokens: the mean k3 estimate of KL(sampler || trainer) per token, the largest
    ratio either way (``max(p/q, q/p)``), and the share of tokens whose ratio is past
    ``cap`` either way (what ``rollout_weights`` truncates or masks)."""
    log_ratio = (trainer_logps - sampler_logps).detach()
    k3 = (log_ratio.exp() - 1 - log_ratio) * mask
    worst = (log_ratio.abs() * mask).max().exp()
    past = ((log_ratio.abs() > math.log(cap)).to(mask.dtype) * mask).sum()
    n = mask.sum().clamp(min=1)
    return float(k3.sum() / n), float(worst), float(past / n)


def value_loss(values, old_values, returns, clip: float) -> torch.Tensor:
    """Clipped value loss per token (B, T), ``0.5 max((V - R)^2, (clip(V, V_old +- eps) -
    R)^2)``, for ``aggregate``."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def remax_advantage(
    sample_rewards: torch.Tensor, greedy_rewards: torch.Tensor, clip: float
) -> torch.Tensor:
    """ReMax (Li et al. 2023, Algorithm 1): the greedy response's reward is the baseline;
    rewards are clipped to [-clip, clip] first. Shape (B,)."""
    return sample_rewards.clamp(-clip, clip) - greedy_rewards.clamp(-clip, clip)


def kl_to_go(kl: torch.Tensor) -> torch.Tensor:
    """Per-token KL summed from each token to the end of its response (ReMax's return-to-go
    of the KL penalty, ``returns_to_go``). (B, T) -> (B, T)."""
    return returns_to_go(kl)


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
