"""Update rules: one module each; this dict is the only registry."""

from iterate.update import dpo, raft

RULES = {"dpo": dpo.run, "raft": raft.run}
