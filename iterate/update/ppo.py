"""PPO, the manual loop (Ziegler et al. 2019; Ouyang et al. 2022; Schulman et al. 2017).

Per batch of prompts: one sampled response each from the current policy, scored by the
frozen reward model; per-token KL penalty against the frozen reference added to the reward
(score on the last token); values from the value head; GAE; then ``ppo_epochs`` passes of
the clipped policy objective plus the clipped value loss. Optional adaptive KL controller.

Value head: ``policy`` (a linear head on the policy's last hidden state, trained with the
LoRA weights) or ``reference_bottom`` (a small head on the frozen reference's bottom
``value_layers`` layers, as in one public PPO setup: only the head trains).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iterate import losses
from iterate.config import Config
from iterate.paths import Paths
from iterate.update import rl

KEYS = ("kl_coef", "kl_estimator", "reward_clip", "loss_agg", "ppo_epochs", "clip_range", "value_clip", "vf_coef", "gamma",
        "lam", "adaptive_kl", "target_kl", "kl_horizon", "value_head", "value_layers")  # fmt: skip


@dataclass
class Batch:
    rollout: rl.Rollout
    old_logps: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor


def new_head(cfg: Config):
    def fn(model) -> torch.nn.Module:
        hidden = model.config.hidden_size
        if str(cfg.update.value_head) == "policy":
            return torch.nn.Linear(hidden, 1)
        return torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    return fn


def forward(cfg: Config, model, head, r: rl.Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and values, both (B, T-1) on the shifted response positions."""
    pos = (r.mask.cumsum(-1) - 1).clamp(min=0)
    if str(cfg.update.value_head) == "policy":
        out = model(input_ids=r.ids, attention_mask=r.mask, position_ids=pos, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, :-1]
        logits = out.logits[:, :-1].float()
    else:
        logits = model(input_ids=r.ids, attention_mask=r.mask, position_ids=pos).logits[:, :-1].float()
        with torch.no_grad(), model.disable_adapter():  # the frozen reference's bottom layers
            states = model(input_ids=r.ids, attention_mask=r.mask, position_ids=pos, output_hidden_states=True).hidden_states
        hidden = states[cfg.update.value_layers][:, :-1].detach()
    logps = torch.log_softmax(logits, -1).gather(-1, r.ids[:, 1:, None]).squeeze(-1)
    real = r.mask[:, 1:] * r.mask[:, :-1]
    return logps * real * r.resp, head(hidden.float()).squeeze(-1) * r.resp


def make_batch(cfg: Config):
    uc = cfg.update

    def fn(model, tok, rm, rm_tok, prompts, dev, ref_model, head, state) -> Batch:
        r = rl.rollout(cfg, model, tok, rm, rm_tok, prompts, False, dev)
        with torch.no_grad():
            old_logps, old_values = forward(cfg, model, head, r)
            ref = rl.ref_logps(model, ref_model, r)
        kl = losses.kl_penalty(old_logps, ref, str(uc.kl_estimator)) * r.resp
        scores = r.scores.clamp(-uc.reward_clip, uc.reward_clip)
        rewards = losses.shaped_rewards(scores, kl, r.resp, state["kl_coef"])
        adv, ret = losses.gae(rewards, old_values, r.resp, uc.gamma, uc.lam)
        n = r.resp.sum().clamp(min=1)
        mean = (adv * r.resp).sum() / n
        std = (((adv - mean) ** 2 * r.resp).sum() / n).sqrt()
        adv = (adv - mean) / (std + 1e-8) * r.resp  # whitened over the batch's response tokens
        if uc.adaptive_kl:  # Ziegler et al. 2019, section 2.2
            seq_kl = kl.sum(-1).mean().item()
            err = max(-0.2, min(0.2, seq_kl / uc.target_kl - 1))
            state["kl_coef"] *= 1 + err * len(prompts) / uc.kl_horizon
        return Batch(r, old_logps, old_values, adv, ret, kl)

    return fn


def step_loss(cfg: Config, model, ref_model, b: Batch, head, state) -> tuple[torch.Tensor, dict]:
    uc = cfg.update
    logps, values = forward(cfg, model, head, b.rollout)
    agg = str(uc.loss_agg)
    pg = losses.ppo_policy_loss(logps, b.old_logps, b.advantages, b.rollout.resp, uc.clip_range, agg)
    vf = losses.value_loss(values, b.old_values, b.returns, b.rollout.resp, uc.value_clip, agg)
    return pg + uc.vf_coef * vf, {
        "reward": b.rollout.scores.mean().item(), "kl": b.kl.sum(-1).mean().item(), "kl_coef": state["kl_coef"],
        "policy_loss": pg.mean().item(), "value_loss": vf.mean().item(),
    }  # fmt: skip


def run(cfg: Config, paths: Paths, i: int, policy: str, reference: str) -> dict:
    return rl.run_on_policy(cfg, paths, i, policy, reference, make_batch(cfg), step_loss, cfg.update.ppo_epochs, KEYS, new_head(cfg))
