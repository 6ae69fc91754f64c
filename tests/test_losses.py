"""Losses against values computed by hand (math module only, no torch in the expectation)."""

import math

import pytest
import torch

from iterate.train import losses


def _ppo(logp, old, adv, mask, agg="token_mean"):
    """PPO's clipped surrogate (one range, 0.2), aggregated."""
    return losses.aggregate(losses.clipped_surrogate(logp, old, adv, 0.2, 0.2), mask, agg)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bradley_terry_hand_values():
    rc = torch.tensor([2.0, 0.0, -1.0])
    rr = torch.tensor([1.0, 0.0, 1.0])
    # -log sigmoid(1) = log(1 + e^-1) = 0.31326; -log sigmoid(0) = log 2; -log sigmoid(-2) = 2.12693
    expected = [0.3132617, math.log(2), 2.1269280]
    assert losses.bradley_terry(rc, rr).tolist() == pytest.approx(expected, abs=1e-6)


def test_bradley_terry_gradient_pushes_margin_up():
    rc = torch.tensor([0.5], requires_grad=True)
    rr = torch.tensor([0.5], requires_grad=True)
    losses.bradley_terry(rc, rr).sum().backward()
    assert rc.grad.item() == pytest.approx(-0.5)  # -(1 - sigmoid(0))
    assert rr.grad.item() == pytest.approx(0.5)


# policy chosen/rejected, ref chosen/rejected: h = (-1 - -2) - (-3 - -2.5) = 1.5
PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.5))


def test_dpo_sigmoid_hand_value():
    loss, cr, rr = losses.dpo(PC, PR, RC, RR, beta=0.1)
    assert loss.item() == pytest.approx(-logsig(0.15), abs=1e-6)  # 0.62096
    assert loss.item() == pytest.approx(0.6209, abs=1e-4)
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.05)


def test_cdpo_label_smoothing_hand_value():
    loss, _, _ = losses.dpo(PC, PR, RC, RR, beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(-0.8 * logsig(0.15) - 0.2 * logsig(-0.15), abs=1e-6)


def test_ipo_hand_value():
    loss, _, _ = losses.dpo(PC, PR, RC, RR, beta=0.1, loss="ipo")
    assert loss.item() == pytest.approx((1.5 - 5.0) ** 2)  # (h - 1/(2 beta))^2 = 12.25


def test_hinge_hand_values():
    loss, _, _ = losses.dpo(PC, PR, RC, RR, beta=0.1, loss="hinge")
    assert loss.item() == pytest.approx(1 - 0.15)
    loss, _, _ = losses.dpo(PC, PR, RC, RR, beta=1.0, loss="hinge")
    assert loss.item() == 0.0  # margin beyond 1: no loss


def test_dpo_unknown_loss():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        losses.dpo(PC, PR, RC, RR, beta=0.1, loss="kto")


def test_nll_masks_prompt_and_padding():
    token_logps = torch.tensor([[-9.0, -1.0, -2.0, -9.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert losses.nll(token_logps, mask).tolist() == pytest.approx([1.5, 1.0])


# ---- PPO / ReMax, by hand -------------------------------------------------------------------


def test_kl_penalty_k1_k3_hand_values():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    assert losses.kl_penalty(logp, ref, "k1").flatten().tolist() == pytest.approx([0.5, -1.0])
    # k3 with log(q/p) = -0.5: e^-0.5 - 1 + 0.5 = 0.10653; with +1.0: e - 1 - 1 = 0.71828
    assert losses.kl_penalty(logp, ref, "k3").flatten().tolist() == pytest.approx(
        [0.1065307, 0.7182818], abs=1e-6
    )


def test_shaped_rewards_put_the_score_on_the_last_response_token():
    kl = torch.tensor([[0.0, 1.0, 2.0, 9.0], [1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    r = losses.shaped_rewards(torch.tensor([3.0, -1.0]), kl, mask, kl_coef=0.1)
    assert r.flatten().tolist() == pytest.approx(
        [0.0, -0.1, -0.2 + 3.0, 0.0, -0.1, -0.1 - 1.0, 0.0, 0.0]
    )


def test_gae_hand_values():
    # one sequence, 3 tokens, gamma 0.9, lambda 0.8
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.4, 0.3]])
    m = torch.ones(1, 3)
    adv, ret = losses.gae(r, v, m, gamma=0.9, lam=0.8)
    d2 = 1.0 - 0.3  # 0.7 (no value after the last token)
    d1 = 0.0 + 0.9 * 0.3 - 0.4  # -0.13
    d0 = 0.0 + 0.9 * 0.4 - 0.5  # -0.14
    a2 = d2
    a1 = d1 + 0.72 * a2  # 0.374
    a0 = d0 + 0.72 * a1  # 0.12928
    assert adv.flatten().tolist() == pytest.approx([a0, a1, a2])
    assert ret.flatten().tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3])


def test_gae_skips_prompt_and_padding_positions():
    r = torch.tensor([[9.0, 0.0, 1.0, 9.0]])
    v = torch.tensor([[9.0, 0.4, 0.3, 9.0]])
    m = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    adv, _ = losses.gae(r, v, m, gamma=1.0, lam=1.0)
    # a2 = 1 - 0.3 = 0.7; a1 = 0 + 0.3 - 0.4 + 0.7 = 0.6; masked positions stay 0
    assert adv.flatten().tolist() == pytest.approx([0.0, 0.6, 0.7, 0.0])


def test_ppo_clipped_policy_loss_hand_values():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    m = torch.ones(1, 3)
    # A>0, r=1.5: max(-1.5, -1.2) = -1.2; A>0, r=0.5: max(-0.5, -0.8) = -0.5;
    # A<0, r=1.1: max(2.2, 2.2) = 2.2
    loss = _ppo(logp, old, adv, m)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)


def test_clipped_value_loss_hand_values():
    v = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[2.0, 1.0]])
    m = torch.ones(1, 2)
    # token 0: (1-2)^2 = 1; clipped V = 0.2 -> (0.2-2)^2 = 3.24; 0.5*max = 1.62.
    # token 1: 0.5*1 = 0.5
    per_token = losses.value_loss(v, old, ret, clip=0.2)
    assert per_token[0].tolist() == pytest.approx([1.62, 0.5])
    assert losses.aggregate(per_token, m, "token_mean").item() == pytest.approx((1.62 + 0.5) / 2)


def test_batch_token_mean_weighs_every_token_equally():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # 4 real tokens: row sums 6 and 4, scaled by B / tokens = 2 / 4; their mean is (1+2+3+4)/4
    out = losses.batch_token_mean(x, m)
    assert out.tolist() == pytest.approx([3.0, 2.0])
    assert out.mean().item() == pytest.approx(2.5)


def test_ppo_loss_aggregation_over_tokens_or_sequences():
    logp, old = torch.zeros(2, 2), torch.zeros(2, 2)  # ratio 1: the loss is -A
    adv = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    token = _ppo(logp, old, adv, m, "token_mean")
    assert token.mean().item() == pytest.approx(-(1 + 3 + 2) / 3)
    sequence = _ppo(logp, old, adv, m, "sequence_mean")
    assert sequence.tolist() == pytest.approx([-2.0, -2.0])  # (1+3)/2 and 2/1
    with pytest.raises(ValueError, match="aggregation"):
        losses.aggregate(adv, m, "sum")


def test_remax_advantage_hand_values():
    adv = losses.remax_advantage(
        torch.tensor([0.5, 3.0, -2.0]), torch.tensor([0.2, 0.9, 0.0]), clip=1.0
    )
    assert adv.tolist() == pytest.approx([0.3, 0.1, -1.0])


def test_kl_to_go_sums_each_token_to_the_end_of_its_response():
    kl = torch.tensor([[0.0, 0.5, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])  # row 0: padded at the end
    got = losses.kl_to_go(kl).tolist()
    assert got[0] == pytest.approx([0.75, 0.75, 0.25, 0.0])
    assert got[1] == pytest.approx([1.0, 0.9, 0.7, 0.4])


def test_remax_weights_with_a_kl_coefficient_hand_values():
    """ReMax's per-token weight ``A - kl_coef * KL-to-go`` with a non-zero coefficient: the
    early tokens carry the KL of the tokens after them."""
    adv = torch.tensor([1.0, -1.0])
    kl = torch.tensor([[0.2, 0.4, 0.6], [0.3, 0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1: two response tokens
    weight = losses.remax_weights(adv, kl, 0.5, mask).tolist()
    assert weight[0] == pytest.approx([1 - 0.5 * 1.2, 1 - 0.5 * 1.0, 1 - 0.5 * 0.6])
    assert weight[1] == pytest.approx([-1 - 0.5 * 0.4, -1 - 0.5 * 0.1, 0.0])
    assert losses.remax_weights(adv, kl, 0.0, mask)[0].tolist() == [1.0, 1.0, 1.0]


def test_whiten_over_every_token_of_the_step_hand_values():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])
    mean, sd = 3.0, math.sqrt(2.0)  # of 1..5, population standard deviation
    out = losses.whiten([a, b])
    assert [x.tolist() for x in out] == [
        pytest.approx([(1 - mean) / sd, (2 - mean) / sd], abs=1e-6),
        pytest.approx([0.0, (4 - mean) / sd, (5 - mean) / sd], abs=1e-6),
    ]


def test_adaptive_kl_coefficient_hand_values():
    """Ziegler et al. 2019: the error is clipped to +-0.2 and scaled by steps / horizon."""
    # KL 1.5 x the target: error clipped to 0.2; 100 rollouts of a 10,000 horizon
    assert losses.adaptive_kl_coef(0.1, 3.0, 2.0, 100, 10_000) == pytest.approx(0.1 * 1.002)
    # KL 0.9 x the target: error -0.1, not clipped
    assert losses.adaptive_kl_coef(0.1, 1.8, 2.0, 100, 1_000) == pytest.approx(0.1 * 0.99)
    assert losses.adaptive_kl_coef(0.1, 0.0, 2.0, 1_000, 1_000) == pytest.approx(0.1 * 0.8)
    assert losses.adaptive_kl_coef(0.1, 2.0, 2.0, 5, 10) == pytest.approx(0.1)  # on target


# ---- group rules and the sampler/trainer mismatch ----------------------------------------


def test_group_advantages_in_each_scaling_hand_values():
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    # group 1: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1; group 2: all equal, std 0
    got = losses.group_advantages(r, "group")
    assert got[0].tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001])
    assert got[1].tolist() == [0.0, 0.0, 0.0]
    # the batch's six rewards: mean 3.5, squared deviations 6.25 2.25 0.25 2.25 2.25 2.25
    batch_std = math.sqrt(15.5 / 5)
    got = losses.group_advantages(r, "batch")
    assert got[0].tolist() == pytest.approx([-1 / (batch_std + 1e-4), 0, 1 / (batch_std + 1e-4)])
    assert losses.group_advantages(r, "none").tolist() == [[-1, 0, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="group | batch | none"):
        losses.group_advantages(r, "prompt")


def test_rloo_baseline_is_the_other_samples_mean():
    got = losses.rloo_advantages(torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 2.0]]))
    # 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2; 4 - 1, 0 - 3, 2 - 2
    assert got.tolist() == [[-1.5, 0.0, 1.5], [3.0, -3.0, 0.0]]
    with pytest.raises(ValueError, match="at least two"):
        losses.rloo_advantages(torch.tensor([[1.0]]))


def test_clip_higher_leaves_more_room_above_than_below():
    """Ratios 1.5, 0.5, 1.25 for advantages +1 and -1, clip_low 0.2, clip_high 0.28."""
    ratio = torch.tensor([[1.5, 0.5, 1.25], [1.5, 0.5, 1.25]])
    adv = torch.tensor([1.0, -1.0])
    got = losses.clipped_surrogate(ratio.log(), torch.zeros(2, 3), adv, 0.2, 0.28)
    # A=+1: max(-r, -clip(r, 0.8, 1.28)): -1.28, -0.5, -1.25 (PPO's 0.2 would give -1.2)
    # A=-1: max(r, clip(r, 0.8, 1.28)): 1.5, 0.8, 1.25
    assert got.flatten().tolist() == pytest.approx([-1.28, -0.5, -1.25, 1.5, 0.8, 1.25])
    same = losses.clipped_surrogate(ratio.log(), torch.zeros(2, 3), adv, 0.2, 0.2)
    assert same[0, 2].item() == pytest.approx(-1.2)


def test_token_sum_norm_divides_by_a_constant_not_a_length():
    per_token = torch.tensor([[1.0, 2.0, 7.0], [3.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert losses.aggregate(per_token, mask, "token_sum_norm", norm=4).tolist() == [0.75, 0.75]
    assert losses.aggregate(per_token, mask, "sequence_mean").tolist() == [1.5, 3.0]
    with pytest.raises(ValueError, match="needs its constant"):
        losses.aggregate(per_token, mask, "token_sum_norm")


def test_masked_whiten_over_the_batchs_tokens():
    x = torch.tensor([[1.0, 3.0, 99.0]])
    got = losses.masked_whiten(x, torch.tensor([[1.0, 1.0, 0.0]]))
    assert got[0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)  # mean 2, var 1


def test_reinforce_pp_advantages_hand_values():
    """Scores 1 and 0; KL 0.1, 0.2 and 0.0 (second sequence one token long), coefficient
    0.5: per-token rewards -0.05, -0.1 + 1 and 0; returns to go 0.85, 0.9 and 0; whitened
    over the three tokens."""
    scores = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.1, 0.2], [0.0, 0.2]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    got = losses.reinforce_pp_advantages(scores, kl, mask, 0.5)
    rtg = [0.85, 0.9, 0.0]
    mean = sum(rtg) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in rtg) / 3)
    want = [(v - mean) / std for v in rtg]
    assert got.flatten().tolist() == pytest.approx([want[0], want[1], want[2], 0.0], abs=1e-6)
    assert losses.returns_to_go(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [[6.0, 5.0, 3.0]]


def test_rollout_weights_truncate_or_mask_the_trainer_sampler_ratio():
    """Trainer/sampler probabilities 0.5/0.25, 0.2/0.4, 0.6/0.5: ratios 2, 0.5, 1.2; cap 1.5
    (the mask keeps ratios within [1/1.5, 1.5])."""
    trainer = torch.tensor([[0.5, 0.2, 0.6, 0.9]]).log()
    sampler = torch.tensor([[0.25, 0.4, 0.5, 0.1]]).log()
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    tis = losses.rollout_weights(trainer, sampler, mask, "tis", 1.5)
    assert tis[0].tolist() == pytest.approx([1.5, 0.5, 1.2, 0.0])
    kept = losses.rollout_weights(trainer, sampler, mask, "mask", 1.5)
    assert kept.tolist() == [[0.0, 0.0, 1.0, 0.0]]
    assert losses.rollout_weights(trainer, sampler, mask, "none", 1.5).tolist() == mask.tolist()
    k3, worst, past = losses.mismatch(trainer, sampler, mask, 1.5)
    # r - 1 - log r for r = 2, 0.5, 1.2 (the masked 9x ratio left out); 2 and 0.5 past 1.5
    each = [r - 1 - math.log(r) for r in (2.0, 0.5, 1.2)]
    assert k3 == pytest.approx(sum(each) / 3) and worst == pytest.approx(2.0)
    assert past == pytest.approx(2 / 3)


def test_overlong_penalty_falls_from_zero_to_minus_one_over_the_buffer():
    """max_tokens 10, buffer 4: free up to 6 tokens, then -1/4 a token, -1 from 10 on."""
    got = losses.overlong_penalty(torch.tensor([3, 6, 7, 9, 10, 12]), 10, 4)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.25, -0.75, -1.0, -1.0])


# ---- a whole GRPO step, by hand ------------------------------------------------------------

REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, -1.0, 0.0, 0.5]]  # 3 prompts x 4
LENGTHS = [[3, 1, 4, 2], [2, 2, 3, 1], [4, 3, 1, 2]]  # response tokens of each sample
CLIP_LOW, CLIP_HIGH, BETA, MAX_TOKENS, EPS = 0.2, 0.28, 0.05, 5, 1e-4


def _hand_advantages(scale: str) -> list[float]:
    def std(xs):  # unbiased
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    flat = [r for g in REWARDS for r in g]
    out = []
    for g in REWARDS:
        mean = sum(g) / len(g)
        for r in g:
            div = {"group": std(g) + EPS, "batch": std(flat) + EPS, "none": 1.0}[scale]
            out.append((r - mean) / div)
    return out


def _hand_step(adv, lp, old, ref, agg):
    """The step's loss and its gradient by each log-prob, token by token: the clipped
    objective max(-A r, -A clip(r, 1 - low, 1 + high)) (its gradient -A r where the
    unclipped branch is the larger, else 0), plus BETA x k3 = e^(ref - lp) - (ref - lp) - 1
    (gradient 1 - e^(ref - lp)), each token weighed by the aggregation."""
    lengths = [n for g in LENGTHS for n in g]
    total, b = sum(lengths), len(lengths)
    loss, grad = 0.0, [[0.0] * len(row) for row in lp]
    for s, n in enumerate(lengths):
        w = {
            "token_mean": 1 / total,
            "sequence_mean": 1 / (b * n),
            "token_sum_norm": 1 / (b * MAX_TOKENS),
        }[agg]
        for t in range(n):
            a, r = adv[s], math.exp(lp[s][t] - old[s][t])
            unclipped, clipped = -a * r, -a * min(max(r, 1 - CLIP_LOW), 1 + CLIP_HIGH)
            d = ref[s][t] - lp[s][t]
            loss += w * (max(unclipped, clipped) + BETA * (math.exp(d) - d - 1))
            grad[s][t] = w * ((-a * r if unclipped >= clipped else 0.0) + BETA * (1 - math.exp(d)))
    return loss, grad


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean", "token_sum_norm"])
def test_a_grpo_step_equals_a_hand_computation(scale, agg):
    """Three prompts of four samples (one group of equal rewards), responses of 1-4 tokens,
    old log-probs off by up to 0.4 (ratios past both clip ranges), a k3 KL in the loss: the
    step's loss and its gradient by every log-prob equal the token-by-token computation, for
    each advantage scaling and each aggregation; padding gets no gradient."""
    import random

    rng = random.Random(0)
    lengths = [n for g in LENGTHS for n in g]
    width = max(lengths)
    lp = [[-rng.uniform(0.1, 3.0) for _ in range(width)] for _ in lengths]
    old = [[x + rng.choice([-0.4, -0.1, 0.0, 0.1, 0.4]) for x in row] for row in lp]
    ref = [[x + rng.uniform(-0.5, 0.5) for x in row] for row in lp]
    adv = _hand_advantages(scale)
    want_loss, want_grad = _hand_step(adv, lp, old, ref, agg)

    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    logps = f64(lp).requires_grad_()
    mask = f64([[1.0 if t < n else 0.0 for t in range(width)] for n in lengths])
    advantages = losses.group_advantages(f64(REWARDS), scale).flatten()
    assert advantages.tolist() == pytest.approx(adv, abs=1e-12)
    per_token = losses.clipped_policy_loss(
        logps * mask,
        f64(old) * mask,
        advantages,
        CLIP_LOW,
        CLIP_HIGH,
        kl=losses.kl_penalty(logps * mask, f64(ref) * mask, "k3"),
        kl_coef=BETA,
    )
    loss = losses.aggregate(per_token, mask, agg, norm=MAX_TOKENS).mean()
    loss.backward()
    assert loss.item() == pytest.approx(want_loss, abs=1e-12)
    assert logps.grad.tolist() == [pytest.approx(g, abs=1e-12) for g in want_grad]
    assert advantages[4:8].abs().max() == 0  # the equal group teaches nothing


def test_token_mean_over_micro_batches_is_the_steps_token_mean():
    """Split into micro-batches, each sequence's sum over the step's mean response length
    (``mean_tokens``) adds up, as the training loop sums them, to the mean over all the
    step's tokens; each micro-batch's own token mean would weigh a short micro-batch's
    tokens more."""
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    step_mean = 21.0 / 6  # six tokens
    mean_tokens = 6 / 3
    halves = (slice(0, 1), slice(1, 3))
    parts = [
        losses.aggregate(per_token[s], mask[s], "token_mean", mean_tokens=mean_tokens)
        for s in halves
    ]
    assert (torch.cat(parts).sum() / 3).item() == pytest.approx(step_mean)
    own = [losses.aggregate(per_token[s], mask[s], "token_mean") for s in halves]
    assert (torch.cat(own).sum() / 3).item() == pytest.approx(4.0)  # not 3.5
