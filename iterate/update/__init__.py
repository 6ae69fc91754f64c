"""Update rules: one module each; this dict is the only registry. Each rule names the
stages it needs before it: the pair rules read best-of-n pairs; PPO and ReMax roll out
inside their update and need only the prompts."""

from typing import NamedTuple

from iterate.paths import PAIR_STAGES
from iterate.update import dpo, ppo, raft, remax


class Rule(NamedTuple):
    run: object  # run(cfg, paths, i, policy, reference) -> the update stage's _DONE info
    stages: tuple[str, ...]  # the stages between prompts and update


RULES = {
    "dpo": Rule(dpo.run, PAIR_STAGES),
    "raft": Rule(raft.run, PAIR_STAGES),
    "ppo": Rule(ppo.run, ()),
    "remax": Rule(remax.run, ()),
}
