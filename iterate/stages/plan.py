"""Which stages a run of a config has, from the rule table (``iterate.train.rules``) and the
reward (``iterate.rewards``): the loop runs them and the run inspector lists them, from this
one answer. Torch-free."""

from __future__ import annotations

from iterate import rewards
from iterate.config import Config
from iterate.train.rules import between


def between_stages(cfg: Config) -> tuple[str, ...]:
    """The stages an iteration runs between its prompts and its update: the rule's, with the
    reward model's refresh before labelling where the reward refreshes."""
    return between(cfg.update.name, rewards.refreshes(cfg))


def run_stages(cfg: Config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The stages a run of ``cfg`` has, by name and in the loop's order: (those before
    iteration 0, those of each iteration). The reward model's training when the run trains
    one (any kind that is a model: a Bradley-Terry model, a pairwise model, a judge), the
    held-out set and the initial policy's samples of it; then per iteration the prompts, the
    rule's stages with the refresh where asked, the update, the KL constraint where asked,
    the evaluation and the handoff."""
    before = ("reward_model",) if rewards.trains_model(cfg) else ()
    constrain = ("constrain",) if cfg.handoff.constrain else ()
    each = ("prompts", *between_stages(cfg), "update", *constrain, "evaluate", "handoff")
    return (*before, "heldout", "initial_samples"), each
