"""Labelling: our batched, length-sorted scoring (``scoring.Scorer``) vs one response at
a time through a transformers ``pipeline`` (the public GSHF scripts' way), alternating
rounds on the same responses and model; and beside them, in the same rounds, a reward
function (the toy world's gold judge through ``rewards.FunctionReward``), so a user can
see whether a function reward is ever the bottleneck."""

from __future__ import annotations

import random
import statistics
import time

import torch

from iterate import rewards
from iterate.rewards import scorer as scoring


def responses(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, response) pairs from the toy world's SFT mixture: realistic lengths."""
    from iterate.toy import world

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ins = rng.choice(world.INSTRUCTIONS)
        out.append((ins.prompt, world.sample_response(ins, rng)[1]))
    return out


def measure(path: str, n: int, batch_size: int, rounds: int, seed: int) -> dict:
    from transformers import pipeline

    model, tok = scoring.load_model(path)
    scorer = scoring.Scorer(model, tok, 512, batch_size)
    pairs = responses(n, seed)
    seqs = [scorer.encode(p, r) for p, r in pairs]
    # the pipeline gets the same conversation as text; the template already holds BOS
    texts = [tok.decode(s) for s in seqs]
    pipe = pipeline(
        "text-classification",
        model=model,
        tokenizer=tok,
        function_to_apply="none",
        device=model.device,
    )

    def ours() -> list[float]:
        return scorer.score([p for p, _ in pairs], [r for _, r in pairs], desc="bench label")

    def one_at_a_time() -> list[float]:
        with torch.no_grad():
            return [pipe(t, batch_size=1)[0]["score"] for t in texts]

    gold = rewards.FunctionReward(rewards.GOLD, batch_size)

    def function() -> list[float]:
        return gold.score([p for p, _ in pairs], [r for _, r in pairs], desc="bench function")

    a, b = ours(), one_at_a_time()  # warm-up, and both must give the same rewards
    agree = max(abs(x - y) for x, y in zip(a, b))
    function()  # warm-up: imports the function's module
    times: dict[str, list[float]] = {"batched": [], "pipeline": [], "function": []}
    for _ in range(rounds):
        for name, fn in (("batched", ours), ("pipeline", one_at_a_time), ("function", function)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    batched, single = statistics.median(times["batched"]), statistics.median(times["pipeline"])
    return {
        "responses": n,
        "batched_samples_per_s": n / batched,
        "pipeline_samples_per_s": n / single,
        "ratio": single / batched,
        "function_samples_per_s": n / statistics.median(times["function"]),
        "max_abs_reward_difference": agree,
        "mean_tokens": sum(map(len, seqs)) / n,
    }
