"""ReMax (Li et al. 2023): REINFORCE with the greedy response's reward as the baseline.

For each prompt, one sampled and one greedy response from the current policy, both scored
by the frozen reward model; advantage = clip(r_sample) - clip(r_greedy). The per-token KL
penalty against the reference is added as a return-to-go, so token t's weight is
``A - kl_coef * sum_{t' >= t} kl_t'``. No value model.
"""

from __future__ import annotations

import torch

from iterate.config import Config
from iterate.stages.update import rl
from iterate.stages.update.common import Example
from iterate.store.paths import Paths
from iterate.train import losses, models


def prepare(ctx: rl.Context, prompts: rl.Prompts, seed: int) -> list[Example]:
    """The sampled and the greedy rollout, the advantage, and the reference's log-probs."""
    uc = ctx.cfg.update
    sample = ctx.rollout(prompts, seed)
    greedy = ctx.rollout(prompts, seed, greedy=True)
    scores = (torch.tensor([e.rollout["score"] for e in x]) for x in (sample, greedy))
    adv = losses.remax_advantage(*scores, uc.reward_clip).tolist()
    for e, g, a in zip(sample, greedy, adv, strict=True):
        e.rollout.update(greedy_score=g.rollout["score"], advantage=a)
    for mb in rl.micro_batches(ctx, sample):
        ids, mask, resp = ctx.batch(mb)
        for e, ref in zip(mb, rl.rows(ctx.ref_logps(ids, mask, resp), resp)):
            e.rollout["ref_logps"] = ref
    return sample


def loss(ctx: rl.Context, model, mb: list[Example]) -> tuple[torch.Tensor, dict]:
    uc = ctx.cfg.update
    ids, mask, resp = ctx.batch(mb)
    lp = models.token_logps(model, ids, mask) * resp
    kl = (
        losses.kl_penalty(
            lp.detach(), rl.grid([e.rollout["ref_logps"] for e in mb], resp), str(uc.kl_estimator)
        )
        * resp
    )
    adv = torch.tensor([e.rollout["advantage"] for e in mb], device=lp.device)
    weight = losses.remax_weights(adv, kl, uc.kl_coef, resp)
    weights, mismatch = rl.correction(ctx, lp.detach(), mb, resp)
    per_example = rl.aggregate(ctx, -weight.detach() * lp * weights, mb, resp)
    return per_example, {
        **mismatch,
        "entropy": rl.token_mean(-lp, resp),
        "reward": sum(e.rollout["score"] for e in mb) / len(mb),
        "greedy_reward": sum(e.rollout["greedy_score"] for e in mb) / len(mb),
        "advantage": adv.mean().item(),
        "kl": kl.sum(-1).mean().item(),
    }


ON_POLICY = rl.OnPolicy(prepare, loss)


def run(cfg: Config, paths: Paths, i: int, policy: str, reference: str) -> dict:
    return rl.run_on_policy(cfg, paths, i, policy, reference, ON_POLICY)
