"""Update rules: one module each (``run(cfg, paths, i, policy, reference)``), the one
training loop (``training``) and what the rules share (``common``, ``rl``). What a rule is (its
stages, settings, card words) is its row in ``iterate.train.rules``."""
