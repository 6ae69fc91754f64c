"""Benchmarks: where an iteration's time goes, and how close each stage is to the machine.

``python -m iterate.bench`` (Hydra-configured, ``conf/bench.yaml``) runs the sections in
``sections`` and writes ``runs/bench/<name>/results.json``; ``--quick`` is the CI smoke
mode (tiny sizes, one round). Every comparison but the iteration's is measured side by side
in one process, alternating the two contenders round by round, so a noisy machine still
gives a true ratio:

- ``generation``: vLLM vs transformers ``generate`` on the same model, prompts and sampling
  (best-of-n, a fixed number of new tokens), tokens/s and their ratio, and the FLOP
  efficiency ``2 x matmul parameters x tokens / s`` over the matmul rate measured in the
  same process and dtype (a lower bound: prompt prefill and attention scores not counted);
- ``labelling``: our batched, length-sorted reward scoring vs one response at a time
  through a transformers ``pipeline`` (what the public GSHF scripts do);
- ``update``: a DPO step on cached reference log-probs vs one that recomputes them, seconds
  per step, and each one's peak RSS in a process of its own; the same for a PPO and a
  ReMax update stage (peak RSS);
- ``iteration``: wall time per stage of a toy iteration and the fixed overheads (engine
  start or weight load, model loads, saves, merge) as a share of it, with the engine kept
  across iterations and restarted per iteration.
"""
