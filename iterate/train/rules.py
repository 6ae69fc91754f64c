"""The update rules' table: the one place that says what a rule is. Torch-free, so the loop,
the validation, the report and the run inspector read it without importing a rule's code.

A row names the rule's module (``run(cfg, paths, i, policy, reference)`` -> the update
stage's ``_DONE`` info), the stages it reads between the prompts and its update, the update
settings it reads beyond the shared ones (its stage's identity: a knob added for one rule
does not invalidate finished runs of the others), what its pairs stage keeps, and what its
model card says of its samples. Adding a rule: one module in ``iterate/stages/update/``, its
settings in ``UpdateConfig``, one YAML in ``conf/update/`` and one row here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

# the stages between prompts and update of the rules that learn from best-of-n samples
PAIR_STAGES = ("generate", "label", "pairs")


@dataclass(frozen=True)
class Rule:
    name: str
    module: str  # iterate.stages.update.<module>: its run(...)
    stages: tuple[str, ...] = ()  # () for the on-policy rules: they sample inside the update
    keys: tuple[str, ...] = ()  # the update settings it reads beyond the shared ones
    keep: str | None = None  # pair rules: "pair" (chosen and rejected) or "best" (one)
    samples: str = ""  # the model card's words for its samples ({n}, {pairs}, {group} filled in)
    groups: bool = False  # an on-policy rule that compares a group of samples per prompt
    # a group rule's advantage (iterate.stages.update.group): "group" (GRPO's), "others"
    # (RLOO's leave-one-out) or "returns" (REINFORCE++'s whitened returns to go)
    advantage: str = ""

    @property
    def kl_in_reward(self) -> bool:
        """A group rule that takes ``kl_coef``'s KL from its rewards (else, GRPO, from
        ``kl_loss_coef`` in its loss)."""
        return "kl_coef" in self.keys

    @property
    def on_policy(self) -> bool:
        """It samples from the policy under training inside its update."""
        return not self.stages

    def run(self, *args, **kwargs) -> dict:
        return importlib.import_module(f"iterate.stages.update.{self.module}").run(*args, **kwargs)


RL_KEYS = (  # PPO's and ReMax's
    "kl_coef",
    "kl_estimator",
    "reward_clip",
    "loss_agg",
    "rollout_correction",
    "tis_cap",
)
# the group rules' (iterate.stages.update.group)
GROUP_KEYS = (
    "group_size",
    "clip_low",
    "clip_high",
    "num_iterations",
    "reward_clip",
    "loss_agg",
    "drop_equal_groups",
    "refill_rounds",
    "mask_truncated",
    "overlong_buffer",
    "sync_every",
    "rollout_correction",
    "tis_cap",
)

RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule(
            "dpo",
            "dpo",
            PAIR_STAGES,
            keys=("loss", "beta", "label_smoothing", "nll_coef", "group_by_length"),
            keep="pair",
            samples="best-of-{n} samples, pairs by `{pairs}`",
        ),
        Rule(
            "raft",
            "raft",
            PAIR_STAGES,
            keys=("group_by_length",),
            keep="best",
            samples="best-of-{n} samples, the best response of each prompt",
        ),
        Rule(
            "ppo",
            "ppo",
            keys=(
                *RL_KEYS,
                "ppo_epochs",
                "clip_range",
                "value_clip",
                "vf_coef",
                "gamma",
                "lam",
                "adaptive_kl",
                "target_kl",
                "kl_horizon",
                "value_head",
                "value_layers",
                "sync_every",
            ),
            samples="one rollout per prompt and step",
        ),
        Rule(
            "remax",
            "remax",
            keys=(*RL_KEYS, "sync_every"),
            samples="one rollout per prompt and step, and a greedy one",
        ),
        Rule(
            "grpo",
            "group",
            keys=(*GROUP_KEYS, "scale_rewards", "kl_loss_coef"),
            groups=True,
            advantage="group",
            samples="a group of {group} rollouts per prompt and step",
        ),
        Rule(
            "rloo",
            "group",
            keys=(*GROUP_KEYS, "kl_coef", "kl_estimator"),
            groups=True,
            advantage="others",
            samples="a group of {group} rollouts per prompt and step",
        ),
        Rule(
            "reinforce_pp",
            "group",
            keys=(*GROUP_KEYS, "kl_coef", "kl_estimator"),
            groups=True,
            advantage="returns",
            samples="a group of {group} rollouts per prompt and step",
        ),
    )
}


def rule(name: object) -> Rule:
    """The row of ``update.name`` (an enum member or its string)."""
    return RULES[str(name)]


def between(name: object, refresh: bool) -> tuple[str, ...]:
    """The stages an iteration runs between its prompts and its update: the rule's, with the
    reward model's refresh (``reward``) before labelling when asked."""
    extra = ("reward",) if refresh else ()
    return tuple(x for s in rule(name).stages for x in (extra if s == "label" else ()) + (s,))


def unread(update) -> list[str]:
    """The settings of ``update`` (an ``UpdateConfig``) that only other rules read, set to
    something other than their default: what the chosen rule would ignore without a word."""
    import dataclasses

    defaults = {
        f.name: f.default
        for f in dataclasses.fields(update)
        if f.default is not dataclasses.MISSING
    }
    theirs = {k for r in RULES.values() for k in r.keys} - set(rule(update.name).keys)
    return sorted(k for k in theirs if k in defaults and getattr(update, k) != defaults[k])
