"""Update rules: one module each; this dict is the only registry."""

from iterate.update import dpo, ppo, raft, remax

RULES = {"dpo": dpo.run, "raft": raft.run, "ppo": ppo.run, "remax": remax.run}
