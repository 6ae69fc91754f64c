"""An instruction-following world for real models, in the manner of IFEval: prompts that
carry verifiable constraints (``prompts``) and their checkers as reward functions
(``checks``). ``experiment=instruct`` runs the loop on SmolLM2 with it (docs/real-model.md)."""
