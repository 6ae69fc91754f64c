"""PPO, the manual loop (Ziegler et al. 2019; Ouyang et al. 2022; Schulman et al. 2017).

Per optimiser step's prompts: one sampled response each from the current policy, scored by
the frozen reward model; per-token KL penalty against the frozen reference added to the
reward (score on the last token); values from the value head; GAE; advantages whitened over
the step's tokens; then ``ppo_epochs`` passes of the clipped policy objective plus the
clipped value loss. Optional adaptive KL controller.

Value head: ``policy`` (a linear head on the policy's last hidden state, trained with the
LoRA weights) or ``reference_bottom`` (a small head on the frozen reference's bottom
``value_layers`` layers, as in one public PPO setup: only the head trains). The head is
carried to the next iteration: an iteration starts from the head saved by the update that
made its starting policy.
"""

from __future__ import annotations

import torch

from iterate.config import Config
from iterate.stages.update import rl
from iterate.stages.update.common import Example
from iterate.store.paths import Paths
from iterate.train import losses, models


def new_head(cfg: Config, model) -> torch.nn.Module:
    hidden = model.config.hidden_size
    if str(cfg.update.value_head) == "policy":
        return torch.nn.Linear(hidden, 1)
    return torch.nn.Sequential(
        torch.nn.Linear(hidden, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )


def forward(ctx: rl.Context, model, ids, mask, resp) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and values, both (B, T-1) on the shifted response positions."""
    uc = ctx.cfg.update
    on_policy = str(uc.value_head) == "policy"
    out = models.forward(model, ids, mask, hidden_states=on_policy)
    if on_policy:
        hidden = out.hidden_states[-1][:, :-1]
    else:  # the frozen reference's bottom layers: its own model, or the adapter-disabled policy
        with models.reference_of(model, ctx.ref_model) as ref:
            states = models.forward(ref, ids, mask, hidden_states=True).hidden_states
        hidden = states[uc.value_layers][:, :-1].detach()
    logps = models.token_logps(model, ids, mask, out=out)
    return logps * resp, ctx.head(hidden.float()).squeeze(-1) * resp


def prepare(ctx: rl.Context, prompts: rl.Prompts, seed: int) -> list[Example]:
    """Roll out, then with the policy as it is now: old log-probs, values, the KL-shaped
    rewards and GAE per micro-batch; advantages whitened over the whole step."""
    uc = ctx.cfg.update
    examples = ctx.rollout(prompts, seed)
    seq_kl = []
    for mb in rl.micro_batches(ctx, examples):
        ids, mask, resp = ctx.batch(mb)
        old_logps, old_values = forward(ctx, ctx.model, ids, mask, resp)
        kl = (
            losses.kl_penalty(old_logps, ctx.ref_logps(ids, mask, resp), str(uc.kl_estimator))
            * resp
        )
        scores = torch.tensor([e.rollout["score"] for e in mb], device=ctx.dev).clamp(
            -uc.reward_clip, uc.reward_clip
        )
        rewards = losses.shaped_rewards(scores, kl, resp, ctx.state["kl_coef"])
        adv, ret = losses.gae(rewards, old_values, resp, uc.gamma, uc.lam)
        seq_kl += kl.sum(-1).tolist()
        for e, *values in zip(
            mb, *(rl.rows(x, resp) for x in (old_logps, old_values, adv, ret, kl))
        ):
            e.rollout.update(
                zip(("old_logps", "old_values", "advantages", "returns", "kl"), values)
            )
    for e, a in zip(examples, losses.whiten([e.rollout["advantages"] for e in examples])):
        e.rollout["advantages"] = a
    if uc.adaptive_kl:  # Ziegler et al. 2019, section 2.2
        ctx.state["kl_coef"] = losses.adaptive_kl_coef(
            ctx.state["kl_coef"],
            sum(seq_kl) / len(seq_kl),
            uc.target_kl,
            len(prompts),
            uc.kl_horizon,
        )
    return examples


def loss(ctx: rl.Context, model, mb: list[Example]) -> tuple[torch.Tensor, dict]:
    uc = ctx.cfg.update
    ids, mask, resp = ctx.batch(mb)
    logps, values = forward(ctx, model, ids, mask, resp)
    old_logps, old_values, adv, ret, kl = (
        rl.grid([e.rollout[k] for e in mb], resp)
        for k in ("old_logps", "old_values", "advantages", "returns", "kl")
    )
    per_token = losses.clipped_surrogate(logps, old_logps, adv, uc.clip_range, uc.clip_range)
    weights, mismatch = rl.correction(ctx, old_logps, mb, resp)
    pg = rl.aggregate(ctx, per_token * weights, mb, resp)
    vf = rl.aggregate(ctx, losses.value_loss(values, old_values, ret, uc.value_clip), mb, resp)
    ratio = (logps.detach() - old_logps).exp()
    return pg + uc.vf_coef * vf, {
        **mismatch,
        "entropy": rl.token_mean(-logps, resp),
        "clip_frac": rl.token_mean(((ratio - 1).abs() > uc.clip_range).float(), resp),
        "reward": sum(e.rollout["score"] for e in mb) / len(mb),
        "kl": kl.sum(-1).mean().item(),
        "kl_coef": ctx.state["kl_coef"],
        "policy_loss": pg.mean().item(),
        "value_loss": vf.mean().item(),
    }


ON_POLICY = rl.OnPolicy(prepare, loss, passes=lambda cfg: cfg.update.ppo_epochs, new_head=new_head)


def previous_head(paths: Paths, i: int, policy: str) -> str | None:
    """The value head saved by the update that made ``policy`` (None for the initial one)."""
    for j in reversed(range(i)):
        if str(paths.handoff_policy(j)) == policy:
            head = paths.value_head(j)
            return str(head) if head.exists() else None
    return None


def run(cfg: Config, paths: Paths, i: int, policy: str, reference: str) -> dict:
    return rl.run_on_policy(
        cfg, paths, i, policy, reference, ON_POLICY, head_init=previous_head(paths, i, policy)
    )
