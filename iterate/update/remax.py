"""ReMax (Li et al. 2023): REINFORCE with the greedy response's reward as the baseline.

For each prompt, one sampled and one greedy response from the current policy, both scored
by the frozen reward model; advantage = clip(r_sample) - clip(r_greedy). The per-token KL
penalty against the reference is added as a return-to-go, so token t's weight is
``A - kl_coef * sum_{t' >= t} kl_t'``. No value model.
"""

from __future__ import annotations

import torch

from iterate import losses
from iterate.config import Config
from iterate.paths import Paths
from iterate.update import rl

KEYS = ("kl_coef", "kl_estimator", "reward_clip", "loss_agg")  # the update settings ReMax reads beyond the shared ones


def step_loss(cfg: Config, model, ref_model, rollouts: tuple[rl.Rollout, rl.Rollout]) -> tuple[torch.Tensor, dict]:
    uc = cfg.update
    sample, greedy = rollouts
    lp = rl.logps(model, sample)
    ref = rl.ref_logps(model, ref_model, sample)
    kl = losses.kl_penalty(lp.detach(), ref, str(uc.kl_estimator)) * sample.resp
    adv = losses.remax_advantage(sample.scores, greedy.scores, uc.reward_clip)
    kl_to_go = kl.flip(-1).cumsum(-1).flip(-1)  # sum over t' >= t
    weight = (adv[:, None] - uc.kl_coef * kl_to_go) * sample.resp
    per_example = losses.aggregate(-weight.detach() * lp, sample.resp, str(uc.loss_agg))
    return per_example, {
        "reward": sample.scores.mean().item(), "greedy_reward": greedy.scores.mean().item(),
        "advantage": adv.mean().item(), "kl": kl.sum(-1).mean().item(),
    }  # fmt: skip


def make_batch(cfg: Config):
    def fn(model, tok, rm, rm_tok, prompts, dev, ref_model, head, state):
        sample = rl.rollout(cfg, model, tok, rm, rm_tok, prompts, False, dev)
        greedy = rl.rollout(cfg, model, tok, rm, rm_tok, prompts, True, dev)
        return sample, greedy

    return fn


def run(cfg: Config, paths: Paths, i: int, policy: str, reference: str) -> dict:
    return rl.run_on_policy(cfg, paths, i, policy, reference, make_batch(cfg), step_loss, passes=1, keys=KEYS)
