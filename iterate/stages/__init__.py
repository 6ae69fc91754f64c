"""The stages of the loop, one module per folder a stage writes in the run folder:
``prompts``, ``heldout`` (and its initial samples), ``reward_model``, then per iteration
``generate``, ``reward`` (the reward-model refresh), ``label``, ``pairs``, ``update`` (a
package: one module per rule and the training loop), ``constrain`` (the KL constraint),
``evaluate`` and ``handoff``; and which of them a config's run has (``plan``).
``iterate.run.loop`` runs them in that order; each keeps the contract of
``iterate.store.stage``."""
