"""Sampling a policy: the one sampler every stage and rollout goes through, vLLM or
transformers by ``generate.backend`` (``samplers``), and the vLLM engine's own process
(``engine``)."""
