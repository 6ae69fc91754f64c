"""The group rules: GRPO (Shao et al. 2024, with DAPO's and Dr. GRPO's fixes), RLOO
(Ahmadian et al. 2024) and REINFORCE++ (Hu 2025). One rollout and one loss, the rules
differing only in their advantages (``losses``):

- per prompt, ``update.group_size`` responses from the policy under training (one request
  with n, through the run's sampler), scored by the run's reward;
- ``grpo``: each reward less its group's mean, scaled by the group's std, the batch's, or
  not at all (``scale_rewards``); a k3 KL to the reference in the loss
  (``kl_loss_coef``; 0: no reference pass);
- ``rloo``: the sequence's KL to the reference (``kl_coef``) taken from its reward, then
  each reward less the mean of the other samples of its group;
- ``reinforce_pp``: the per-token KL penalty in the reward (``kl_coef``), returns to go,
  whitened over the batch's tokens in the loss;
- the loss: the clipped ratio objective with its own lower and upper ranges (``clip_low``,
  ``clip_high``), aggregated over tokens as ``loss_agg`` says (``token_sum_norm`` divides
  by ``generate.max_tokens``), for ``num_iterations`` optimiser passes per rollout; the
  ratio's old log-probs are the trainer's, taken before the first pass; the sampler/trainer
  mismatch measured and, with ``rollout_correction``, corrected (``rl.correction``).

Groups whose rewards are all equal carry no signal: they are counted, and with
``drop_equal_groups`` left out of the step, which ``refill_rounds`` further rollouts of
other prompts may fill again. A group with a reward the reward could not give
(None, NaN) is left out and counted. With ``mask_truncated`` a response cut at
``generate.max_tokens`` is left out of the loss; with ``overlong_buffer`` a response near
that limit has a soft penalty added to its reward (DAPO).
"""

from __future__ import annotations

import math

import torch

from iterate.config import Config
from iterate.stages.update import rl
from iterate.stages.update.common import Example
from iterate.store import seeds
from iterate.store.paths import Paths
from iterate.train import losses, models
from iterate.train.rules import rule


def advantages(ctx: rl.Context, examples: list[Example], n: int) -> None:
    """Each example's advantage (``rollout["advantages"]``: per token), by its rule."""
    uc, how = ctx.cfg.update, rule(ctx.cfg.update.name).advantage
    scores = torch.tensor([e.rollout["score"] for e in examples], dtype=torch.float64)
    scores = scores.clamp(-uc.reward_clip, uc.reward_clip)
    if uc.overlong_buffer:  # DAPO: a soft penalty on responses near or at the length limit
        lengths = torch.tensor([len(e.chosen) for e in examples])
        scores = scores + losses.overlong_penalty(
            lengths, ctx.cfg.generate.max_tokens, uc.overlong_buffer
        )
    # per token, for rloo and reinforce_pp (none without a KL term: kl_coef 0, no reference)
    kl = [e.rollout.get("kl", torch.zeros(len(e.chosen))) for e in examples]
    if how == "returns":  # whitened over the tokens in the loss (mask_truncated leaves some out)
        resp = torch.nn.utils.rnn.pad_sequence(
            [torch.full((len(e.chosen),), float(e.rollout["in_loss"])) for e in examples],
            batch_first=True,
        )
        grid = torch.nn.utils.rnn.pad_sequence(kl, batch_first=True).to(torch.float64)
        adv = losses.reinforce_pp_advantages(scores, grid, resp.to(torch.float64), uc.kl_coef)
        for e, a in zip(examples, adv, strict=True):
            e.rollout["advantages"] = a[: len(e.chosen)].float()
        return
    if how == "others":
        scores = scores - uc.kl_coef * torch.tensor(
            [float(k.sum()) for k in kl], dtype=scores.dtype
        )
        adv = losses.rloo_advantages(scores.view(-1, n)).flatten()
    else:
        adv = losses.group_advantages(scores.view(-1, n), str(uc.scale_rewards)).flatten()
    for e, a in zip(examples, adv.tolist(), strict=True):
        e.rollout["advantages"] = torch.full((len(e.chosen),), a)


def rollout_groups(ctx: rl.Context, prompts: rl.Prompts, seed: int) -> list[Example]:
    """A group per prompt, leaving out (and counting) the groups without a reward for every
    sample and, with ``drop_equal_groups``, those of equal rewards; with ``refill_rounds``,
    up to that many further rollouts of as many prompts as groups were left out, drawn from
    the iteration's prompts (seeded), to fill the step back to its size (DAPO's dynamic
    sampling). A refill draws without replacement, and never a prompt the step has already
    rolled out: a prompt twice in a step would be one group of 2n to a reward that compares a
    prompt's responses with each other (a pairwise model's or a judge's tournament) while
    its advantages are taken per n. When the pool has no prompt left the step stays short
    (``short_groups``). Each kept example's rollout counts the step's groups, and the counts
    are added to ``ctx.counts`` (the update's record)."""
    uc = ctx.cfg.update
    n, want = uc.group_size, len(prompts)
    draw = torch.Generator().manual_seed(seeds.derive("refill", seed))
    kept: list[Example] = []
    count = {"groups": 0, "unscored_groups": 0, "equal_groups": 0, "refilled_groups": 0}
    batch, rounds = prompts, 0
    used = {p for p, _ in prompts}  # the step's prompts, by text: none is drawn again
    while True:
        examples = ctx.rollout(batch, seeds.derive("refill", seed, rounds) if rounds else seed, n=n)
        groups = [examples[g : g + n] for g in range(0, len(examples), n)]
        for g in groups:
            scores = [e.rollout["score"] for e in g]
            count["groups"] += 1
            if not all(map(math.isfinite, scores)):
                count["unscored_groups"] += 1
                continue
            if len(set(scores)) == 1:
                count["equal_groups"] += 1
                if uc.drop_equal_groups:
                    continue
            kept += g
            count["refilled_groups"] += bool(rounds)
        short = want - len(kept) // n
        if short <= 0 or rounds >= uc.refill_rounds:
            break
        fresh = [k for k, (p, _) in enumerate(ctx.pool) if p not in used]
        if not fresh:
            break
        rounds += 1
        order = torch.randperm(len(fresh), generator=draw)[:short].tolist()
        batch = [ctx.pool[fresh[j]] for j in order]
        used.update(p for p, _ in batch)
    for name, k in count.items():
        ctx.counts[name] = ctx.counts.get(name, 0) + k
    for e in kept:  # with mask_truncated, a cut response teaches nothing (DAPO)
        e.rollout.update(
            count, short_groups=max(0, short), in_loss=e.rollout["stop"] or not uc.mask_truncated
        )
    return kept


def prepare(ctx: rl.Context, prompts: rl.Prompts, seed: int) -> list[Example]:
    """Roll out a group per prompt (``rollout_groups``); with the policy as it is now, the
    old log-probs (several passes) and the reference's (a KL), then the advantages."""
    uc, row = ctx.cfg.update, rule(ctx.cfg.update.name)
    n = uc.group_size
    kept = rollout_groups(ctx, prompts, seed)
    needs_ref = (uc.kl_coef if row.kl_in_reward else uc.kl_loss_coef) > 0  # a KL term at all
    for mb in rl.micro_batches(ctx, kept):
        ids, mask, resp = ctx.batch(mb)
        old = models.token_logps(ctx.model, ids, mask) * resp if uc.num_iterations > 1 else None
        ref = ctx.ref_logps(ids, mask, resp) if needs_ref else None
        if old is not None:
            for e, x in zip(mb, rl.rows(old, resp), strict=True):
                e.rollout["old_logps"] = x
        if ref is not None:
            for e, x in zip(mb, rl.rows(ref, resp), strict=True):
                e.rollout["ref_logps"] = x
            if row.kl_in_reward:  # the policy now against the reference
                now = old if old is not None else models.token_logps(ctx.model, ids, mask) * resp
                kl = losses.kl_penalty(now, ref, str(uc.kl_estimator)) * resp
                for e, x in zip(mb, rl.rows(kl, resp), strict=True):
                    e.rollout["kl"] = x
    if kept:
        advantages(ctx, kept, n)
    return kept


def loss(ctx: rl.Context, model, mb: list[Example]) -> tuple[torch.Tensor, dict]:
    uc = ctx.cfg.update
    ids, mask, resp = ctx.batch(mb)
    logps = models.token_logps(model, ids, mask) * resp
    adv = rl.grid([e.rollout["advantages"] for e in mb], resp)
    has_old = "old_logps" in mb[0].rollout
    old = rl.grid([e.rollout["old_logps"] for e in mb], resp) if has_old else logps.detach()
    ref = (
        rl.grid([e.rollout["ref_logps"] for e in mb], resp)
        if "ref_logps" in mb[0].rollout
        else None
    )
    in_loss = torch.tensor([float(e.rollout["in_loss"]) for e in mb], device=resp.device)
    resp = resp * in_loss[:, None]
    weights, metrics = rl.correction(ctx, old, mb, resp)
    kl_coef = 0.0 if rule(uc.name).kl_in_reward else uc.kl_loss_coef  # GRPO: in the loss
    kl = losses.kl_penalty(logps, ref, "k3") if kl_coef else None
    per_token = losses.clipped_policy_loss(
        logps, old, adv, uc.clip_low, uc.clip_high, weights, kl, kl_coef
    )
    per_example = rl.aggregate(ctx, per_token, mb, resp)
    if kl is not None:
        metrics["kl"] = rl.token_mean(kl * resp, resp)
    elif "kl" in mb[0].rollout:
        metrics["kl"] = sum(float(e.rollout["kl"].sum()) for e in mb) / len(mb)
    ratio = (logps.detach() - old).exp()
    low, high = ratio < 1 - uc.clip_low, ratio > 1 + uc.clip_high
    first = mb[0].rollout
    return per_example, {
        **metrics,
        "entropy": rl.token_mean(-logps, resp),
        "clip_frac": rl.token_mean((low | high).float(), resp),
        "reward": sum(e.rollout["score"] for e in mb) / len(mb),
        "advantage_abs": rl.token_mean(adv.abs(), resp),
        "equal_groups": first["equal_groups"] / max(1, first["groups"]),
        "unscored_groups": first["unscored_groups"],
        "refilled_groups": first["refilled_groups"],
        "short_groups": first["short_groups"],
    }


ON_POLICY = rl.OnPolicy(prepare, loss, passes=lambda cfg: cfg.update.num_iterations)


def run(cfg: Config, paths: Paths, i: int, policy: str, reference: str) -> dict:
    return rl.run_on_policy(cfg, paths, i, policy, reference, ON_POLICY)
